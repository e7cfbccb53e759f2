"""Prefect flows: one stage per module, wiring tasks together and nothing else."""

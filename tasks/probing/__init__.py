"""Evaluation protocols for backbones: frozen-embedding probes beside honest baselines, and the probe gate.

``protocols`` (pure arrays: kNN, logistic probes, few-shot, label fractions, bootstrap intervals),
``embeddings`` (what is probed, cached by model, data and preprocessing digest), ``scoring`` (every
protocol for every backbone: the long-format table and the gate), ``report`` (CSV, plot, MLflow, registry).
"""

"""Task vectors on state dicts: fine-tune minus base, checked to describe the same network, and back."""

from __future__ import annotations

import hashlib

import torch

from tasks.merging.family import StateDict
from tasks.request_errors import RequestError

# Modules every fine-tune trains from new (a classifier head, a slide model's attention pooling): they belong to
# one task and are never averaged with another task's (see tasks.adapters.saved_module_names).
TASK_SPECIFIC_MODULES = ("head", "pool")


def is_task_specific(key: str) -> bool:
    """Whether tensor ``key`` lies in a task's own module (``net.head.weight``, ``net.pool.gate.bias``)."""
    return any(part in TASK_SPECIFIC_MODULES for part in key.split(".")[:-1])


def shared_part(state: StateDict) -> StateDict:
    """The tensors every task shares (the backbone), in the state's order."""
    return {k: v for k, v in state.items() if not is_task_specific(k)}


def task_part(state: StateDict) -> StateDict:
    """The task's own tensors (head, pooling)."""
    return {k: v for k, v in state.items() if is_task_specific(k)}


def weights_digest(state: StateDict) -> str:
    """SHA-256 of the shared (backbone) tensors by name: fine-tunes of one base carry the same base digest."""
    digest = hashlib.sha256()
    for key in sorted(shared_part(state)):
        tensor = state[key]
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def mergeable_keys(state: StateDict) -> list[str]:
    """Keys merging changes: floating-point tensors (integer buffers, e.g. counters, are copied from the base)."""
    return [k for k, v in state.items() if v.is_floating_point()]


def check_same_layout(base: StateDict, models: list[StateDict], names: list[str] | None = None) -> None:
    """Refuse models whose tensor names or shapes differ from the base's, naming the first difference."""
    names = names or [f"model {i}" for i in range(len(models))]
    for name, state in zip(names, models):
        missing, extra = sorted(set(base) - set(state)), sorted(set(state) - set(base))
        if missing or extra:
            raise RequestError(f"{name}: not the base's architecture (missing {missing[:3]}, unexpected {extra[:3]})")
        for key, tensor in base.items():
            if state[key].shape != tensor.shape:
                raise RequestError(f"{name}: tensor {key} has shape {tuple(state[key].shape)}, the base's is "
                                   f"{tuple(tensor.shape)}")


def task_vector(base: StateDict, model: StateDict) -> StateDict:
    """``model - base`` for every floating-point tensor."""
    return {k: model[k].detach().float() - base[k].detach().float() for k in mergeable_keys(base)}


def apply_task_vector(base: StateDict, vector: StateDict) -> StateDict:
    """``base + vector`` (tensors the vector lacks are the base's), in the base's dtypes."""
    return {k: (base[k].float() + vector[k]).to(base[k].dtype) if k in vector else base[k].clone()
            for k in base}


def vector_norm(vector: StateDict) -> float:
    """Frobenius norm of a whole task vector (all its tensors as one)."""
    return float(torch.sqrt(sum((v.double() ** 2).sum() for v in vector.values()))) if vector else 0.0


def state_bytes(state: StateDict) -> int:
    """Bytes the tensors of ``state`` hold."""
    return sum(t.numel() * t.element_size() for t in state.values())

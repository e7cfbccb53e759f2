"""The adapter-method contract: every parameter-efficient method Vitrail trains is one registered entry.

A method turns a frozen backbone network (a timm ViT, a :class:`tasks.models.SegmentationViT`, or a
:class:`tasks.models.AttentionMIL` slide model) into a trainable adapted one, says how many parameters it
trains (a formula, checked against the model), whether it folds back into plain weights, and how to rebuild
its structure when a saved model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

from torch import nn

Family = Literal["peft", "project"]


@dataclass(frozen=True)
class AdapterMethod:
    """One adapter method.

    Attributes:
        name: the value of ``AdapterParams.method`` (e.g. ``lora``, ``vpt-deep``).
        family: ``peft`` (through the peft library) or ``project`` (written here, where no maintained
            library has it).
        mergeable: whether :attr:`merge` folds it into plain weights, leaving no adapter operation.
        attach: ``(net, params) -> adapted``: freeze ``net``, add the method's trainable parts; the head (and
            the attention pooling of a slide model) always train. Raises ``RequestError`` when a requested
            target matches no module, before anything is trained.
        expected_trainable: ``(net, params) -> int``: the trainable-parameter count by the method's formula,
            from the frozen net's shapes (tests compare it with the adapted model's real count).
        merge: ``adapted -> net``: for mergeable methods, the plain network with the adapter folded in; for the
            others, the adapted network with its extra operations (exported as they are).
        rebuild: ``(net, params) -> adapted`` for non-mergeable methods: the adapted structure (random adapter
            weights) that a saved model's weights load into; None for mergeable methods (they save plain).
    """

    name: str
    family: Family
    mergeable: bool
    attach: Callable[[nn.Module, object], nn.Module]
    expected_trainable: Callable[[nn.Module, object], int]
    merge: Callable[[nn.Module], nn.Module]
    rebuild: Callable[[nn.Module, object], nn.Module] | None = None


METHODS: dict[str, AdapterMethod] = {}


def register(method: AdapterMethod) -> AdapterMethod:
    """Add ``method`` to :data:`METHODS` (a second entry under the same name is a programming error)."""
    if method.name in METHODS:
        raise ValueError(f"adapter method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method

"""Adapters: one configuration block (:class:`AdapterParams`) for every parameter-efficient method Vitrail trains.

A method is an entry of :data:`tasks.adapters.registry.METHODS` (peft families in
:mod:`tasks.adapters.peft_methods`, the project's own in :mod:`tasks.adapters.custom`). The functions here are
what the rest of Vitrail calls: :func:`attach_adapter` before training, :func:`merge_adapter` after it,
:func:`check_targets` to refuse a misspelt target before anything is trained.

This module imports no heavy library (peft is imported when a peft method attaches) and does not import
:mod:`tasks.models` at import time: ``tasks.models`` imports this module for its configuration types.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from tasks.adapters.registry import METHODS, AdapterMethod, register
from tasks.request_errors import RequestError

__all__ = ["AdapterParams", "AdapterMethodName", "LoraParams", "METHODS", "AdapterMethod", "register",
           "attach_adapter", "merge_adapter", "check_targets", "count_trainable", "get_method",
           "adaptable_linears", "saved_module_names", "saved_module_paths", "adapter_of", "legacy_lora_to_adapter"]

AdapterMethodName = Literal[
    "lora", "dora", "ia3", "loha", "lokr", "oft", "boft", "vera", "fourierft", "layernorm",
    "bitfit", "ssf", "vpt-shallow", "vpt-deep", "adaptformer", "dvpt",
    "full", "linear-probe",
]

# The attribute an adapted network carries its AdapterParams under, so merging and describing a saved model
# know which method made it without a second argument travelling beside the model.
ADAPTER_ATTRIBUTE = "vitrail_adapter"


DEFAULT_TARGETS = ["qkv"]
# The methods that attach to named layers (the peft families but LayerNorm tuning).
TARGETED_METHODS = frozenset({"lora", "dora", "ia3", "loha", "lokr", "oft", "boft", "vera", "fourierft"})


class AdapterParams(BaseModel):
    """How the foundation model adapts to the task: the method and its settings.

    Every method trains the new head (and a slide model's attention pooling); the backbone stays frozen except
    for what the method adds. ``full`` (every weight trains) and ``linear-probe`` (the head only) are reference
    points for comparison.
    """

    model_config = ConfigDict(extra="forbid")

    method: AdapterMethodName = Field(
        "lora", description="Adapter method. peft families: lora, dora, ia3, loha, lokr, oft, boft, vera, fourierft, "
                            "layernorm (LayerNorm tuning). Written in Vitrail: bitfit, ssf, vpt-shallow, vpt-deep, "
                            "adaptformer, dvpt. References: full (full fine-tuning), linear-probe (head only)")
    targets: list[str] = Field(
        ["qkv"], min_length=1, max_length=16,
        description="Module-name suffixes the adapter attaches to inside the transformer blocks: qkv, attn.proj, "
                    "fc1, fc2 (or mlp.fc1, mlp.fc2). A name that matches no module is refused before training. "
                    "Only the peft families use it (not layernorm, full, linear-probe or the methods written in "
                    "Vitrail, which refuse a targets list other than the default)")
    rank: int = Field(8, ge=1, le=1024, description="Rank r of lora, dora, loha, lokr and vera (vera shares its "
                                                    "random projections across layers and usually wants 64-256)")
    alpha: float = Field(16.0, gt=0, le=4096, description="Scaling alpha of lora, dora, loha and lokr "
                                                           "(effective scale alpha / r)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter branch (lora, dora, vera, "
                                                            "boft; rank dropout for loha and lokr; module "
                                                            "dropout for oft)")
    block_size: int = Field(4, ge=2, le=1024, description="Side of the orthogonal blocks of oft and boft; must "
                                                          "divide the targets' input width")
    butterfly_factor: int = Field(1, ge=1, le=8, description="boft: butterfly factors m (1 is block-diagonal; more "
                                                             "need peft's CUDA extension, and are refused without "
                                                             "it rather than silently dropped as peft does)")
    frequencies: int = Field(1000, ge=1, le=1_000_000, description="fourierft: learned spectral coefficients "
                                                                   "per adapted layer")
    fourier_scaling: float = Field(150.0, gt=0, le=10_000, description="fourierft: scale of the spectral update")
    prompt_tokens: int = Field(10, ge=1, le=512, description="vpt-shallow, vpt-deep, dvpt: learned prompt tokens "
                                                             "(per block for vpt-deep)")
    bottleneck: int | None = Field(None, ge=1, le=4096,
                                   description="adaptformer and dvpt: hidden width of the adapter's bottleneck; "
                                               "empty takes the method's default (adaptformer 64; dvpt 16, about "
                                               "0.4 % extra parameters on ViT-B as in the paper)")
    adapter_scale: float = Field(0.1, gt=0, le=100.0, description="adaptformer: scale s of the adapter branch "
                                                                  "added to the MLP output")
    train_patch_embed: bool = Field(True, description="Also train the patch embedding (advisable when the band "
                                                      "count differs from the pretrained model's; "
                                                      "linear-probe never does)")

    @model_validator(mode="after")
    def _targets_only_where_used(self) -> "AdapterParams":
        # A targets list the method ignores is a misconfiguration (often a method typed in the wrong run).
        if self.method not in TARGETED_METHODS and self.targets != DEFAULT_TARGETS:
            raise ValueError(f"method {self.method!r} does not take targets (only {', '.join(sorted(TARGETED_METHODS))} "
                             f"do); remove targets={self.targets}")
        return self


class LoraParams(BaseModel):
    """Low-rank adapter settings (peft LoRA). Deprecated: the ``lora`` block of earlier versions, read as
    :class:`AdapterParams` with ``method="lora"`` (:meth:`to_adapter`)."""

    rank: int = Field(8, ge=1, le=256, description="LoRA rank r")
    alpha: float = Field(16.0, gt=0, le=1024, description="LoRA scaling alpha (effective scale alpha / r)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA branch")
    target_modules: list[str] = Field(["qkv"], min_length=1, max_length=16,
                                      description="Module-name suffixes LoRA attaches to (qkv, fc1, fc2, attn.proj)")
    train_patch_embed: bool = Field(True, description="Also train the patch embedding (advisable when the band "
                                                      "count differs from the pretrained model's)")

    def to_adapter(self) -> AdapterParams:
        """The same settings as the one adapter block."""
        return AdapterParams(method="lora", targets=list(self.target_modules), rank=self.rank, alpha=self.alpha,
                             dropout=self.dropout, train_patch_embed=self.train_patch_embed)


def as_adapter_params(params: AdapterParams | LoraParams) -> AdapterParams:
    """``params`` as the one adapter block (a legacy :class:`LoraParams` is mapped)."""
    return params.to_adapter() if isinstance(params, LoraParams) else params


def legacy_lora_to_adapter(data: object) -> object:
    """A flow-parameter payload with the deprecated ``lora`` block moved to ``adapter`` (method lora).

    For ``mode="before"`` validators of the flows' parameter models, so configurations, deployments and
    command lines written for the LoRA-only block keep working. When both blocks are given (a preset's
    ``adapter`` and an old ``--set lora.rank=4``), the settings given in ``lora`` are laid over ``adapter``,
    which must then be a LoRA adapter.
    """
    if not isinstance(data, dict) or data.get("lora") is None:
        return data
    data = dict(data)
    lora = data.pop("lora")
    lora = lora if isinstance(lora, LoraParams) else LoraParams.model_validate(lora)
    given = {("targets" if key == "target_modules" else key): getattr(lora, key) for key in lora.model_fields_set}
    adapter = data.get("adapter")
    if adapter is None:
        data["adapter"] = lora.to_adapter()
        return data
    adapter = adapter.model_dump() if isinstance(adapter, AdapterParams) else dict(adapter)
    if adapter.get("method", "lora") != "lora":
        raise ValueError(f"the deprecated lora block sets LoRA settings, but adapter.method is {adapter['method']!r}; "
                         "give them as adapter.X (lora.target_modules is adapter.targets)")
    data["adapter"] = {**adapter, **given, "method": "lora"}
    return data


def get_method(name: str) -> AdapterMethod:
    """The registered method called ``name``; a :class:`RequestError` lists the registered ones otherwise."""
    if name not in METHODS:
        raise RequestError(f"adapter method {name!r} is not available in this installation; available: "
                           f"{', '.join(sorted(METHODS))}")
    return METHODS[name]


def saved_module_names(net: nn.Module, params: AdapterParams | None = None) -> list[str]:
    """Name suffixes of the modules every method trains in full.

    The head always (a segmentation model's decoder is called ``head`` too); a slide model's attention
    pooling (``pool``, new like the head); the patch embedding when ``params.train_patch_embed``.
    """
    names = ["head"]
    if isinstance(getattr(net, "pool", None), nn.Module):
        names.append("pool")
    if params is not None and params.train_patch_embed and params.method != "linear-probe":
        names.append("patch_embed.proj")
    return names


def _matches(name: str, suffix: str) -> bool:
    """peft's rule for a list of target names: the full module name, or its tail after a dot."""
    return name == suffix or name.endswith("." + suffix)


def saved_module_paths(net: nn.Module, params: AdapterParams | None = None) -> list[str]:
    """Full names of the modules trained in full (:func:`saved_module_names` resolved in ``net``)."""
    suffixes = saved_module_names(net, params)
    return [name for name, _ in net.named_modules() if name and any(_matches(name, s) for s in suffixes)]


def _inside(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def adaptable_linears(net: nn.Module, params: AdapterParams | None = None) -> dict[str, nn.Linear]:
    """The linear layers an adapter may target: every ``nn.Linear`` outside the fully trained modules."""
    saved = saved_module_paths(net, params)
    return {name: module for name, module in net.named_modules()
            if isinstance(module, nn.Linear) and not _inside(name, saved)}


def check_targets(net: nn.Module, targets: list[str], params: AdapterParams | None = None) -> dict[str, nn.Linear]:
    """The linear layers ``targets`` select; refuse a target that selects nothing or something else.

    peft raises only when *no* target matches, so a misspelt name among correct ones would silently train
    less than asked. Each target must match at least one adaptable linear layer, and no other module (a
    bare ``proj`` also names the patch embedding's convolution).

    Raises:
        RequestError: naming every offending target and the names that would work.
    """
    linears = adaptable_linears(net, params)
    problems = []
    for target in targets:
        hits = [name for name in linears if _matches(name, target)]
        others = [f"{name} ({type(module).__name__})" for name, module in net.named_modules()
                  if name and _matches(name, target) and name not in linears]
        if not hits:
            problems.append(f"{target!r} matches no linear layer of the transformer blocks")
        elif others:
            problems.append(f"{target!r} also matches {', '.join(others[:3])}; name it more precisely")
    if problems:
        known = sorted({".".join(name.split(".")[-2:]) for name in linears})
        raise RequestError(f"adapter targets refused: {'; '.join(problems)}. Targets are module-name suffixes such "
                           f"as {', '.join(known[:8])} (or their last part: qkv, proj, fc1, fc2)")
    return {name: module for name, module in linears.items() if any(_matches(name, t) for t in targets)}


def count_trainable(model: nn.Module) -> int:
    """Parameters the optimiser updates (``requires_grad``), each shared tensor counted once."""
    seen, total = set(), 0
    for parameter in model.parameters():
        if parameter.requires_grad and id(parameter) not in seen:
            seen.add(id(parameter))
            total += parameter.numel()
    return total


def attach_adapter(net: nn.Module, params: AdapterParams | LoraParams) -> nn.Module:
    """Freeze ``net`` and add ``params.method``'s trainable parts; the head (and pooling) train in full.

    The returned network carries ``params`` (attribute ``vitrail_adapter``), so :func:`merge_adapter` and the
    reference-model description know the method without being told again.
    """
    params = as_adapter_params(params)
    method = get_method(params.method)
    adapted = method.attach(net, params)
    setattr(adapted, ADAPTER_ATTRIBUTE, params)
    return adapted


def adapter_of(model: nn.Module) -> AdapterParams | None:
    """The AdapterParams an adapted network was made with (None for a plain network)."""
    return getattr(model, ADAPTER_ATTRIBUTE, None)


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold a mergeable adapter into plain weights; a non-mergeable one is returned with its extra operations.

    A network that :func:`attach_adapter` did not adapt is returned as is, except a bare peft model (from
    code written before adapter methods existed), which is merged by peft.
    """
    params = adapter_of(model)
    if params is None:
        return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    method = get_method(params.method)
    merged = method.merge(model)
    if method.mergeable:
        if ADAPTER_ATTRIBUTE in merged.__dict__:
            delattr(merged, ADAPTER_ATTRIBUTE)
    else:
        setattr(merged, ADAPTER_ATTRIBUTE, params)
    return merged


def rebuild_adapted(net: nn.Module, params: AdapterParams) -> nn.Module:
    """The adapted structure of a non-mergeable method (random adapter weights) for a saved model's weights."""
    method = get_method(params.method)
    if method.rebuild is None:
        raise RequestError(f"adapter method {params.method!r} merges into plain weights; its saved models need no "
                           "adapter structure")
    adapted = method.rebuild(net, params)
    setattr(adapted, ADAPTER_ATTRIBUTE, params)
    return adapted


# The method modules register themselves on import. They come last and import tasks.models only inside
# functions: tasks.models imports this module at its top, so at this point it may be half-initialised.
from tasks.adapters import custom, peft_methods  # noqa: E402,F401

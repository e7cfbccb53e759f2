"""The peft adapter families on timm ViTs, plus full fine-tuning and the linear probe as reference methods.

Each entry states its trainable-parameter count as a formula over the frozen network's layer shapes (tests
compare it with the adapted model) and merges through peft's ``merge_and_unload``: every family here folds
into the base weights, so the saved and exported model is a plain ViT. Counts follow peft 0.21's layer code:
LoRA ``r (in + out)`` (Hu et al. 2021), DoRA adds a magnitude per output (Liu et al. 2024), IA3 one scale per
output, or per input of a feed-forward layer (Liu et al. 2022), LoHa two Hadamard-multiplied low-rank pairs
(Hyeon-Woo et al. 2022), LoKr a Kronecker product of a full small factor and a (low-rank) large one
(LyCORIS), OFT ``in / b`` skew-symmetric blocks of ``b (b - 1) / 2`` (Qiu et al. 2023), BOFT full ``b x b``
blocks per butterfly factor plus an output scale (Liu et al. 2024), VeRA two scaling vectors over frozen shared
random projections (Kopiczko et al. 2024), FourierFT ``n`` spectral coefficients (Gao et al. 2024).
"""

from __future__ import annotations

import re
from typing import Callable

from torch import nn

from tasks.adapters import (
    AdapterParams,
    adaptable_linears,
    check_targets,
    saved_module_names,
    saved_module_paths,
)
from tasks.adapters.registry import AdapterMethod, register
from tasks.request_errors import RequestError


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _saved_count(net: nn.Module, params: AdapterParams) -> int:
    """Parameters of the fully trained modules (head, pooling, patch embedding), nested ones counted once."""
    names = saved_module_paths(net, params)
    outermost = [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]
    modules = dict(net.named_modules())
    return sum(_count(modules[name]) for name in outermost)


def _factor(dimension: int) -> tuple[int, int]:
    """The divisor pair (m <= n, m * n = dimension) closest to the square root, as LoKr splits a width."""
    m = max(d for d in range(1, int(dimension ** 0.5) + 1) if dimension % d == 0)
    return m, dimension // m


# --- per-layer formulas: (in_features, out_features, params, layer name) -> trainable parameters -----------

def _lora(i: int, o: int, p: AdapterParams, name: str) -> int:
    return p.rank * (i + o)


def _dora(i: int, o: int, p: AdapterParams, name: str) -> int:
    return p.rank * (i + o) + o


def _feedforward(name: str, p: AdapterParams) -> bool:
    """IA3 scales the *input* of a feed-forward output layer (fc2) and the output of every other target."""
    return any((name == t or name.endswith("." + t)) and t.split(".")[-1] == "fc2" for t in p.targets)


def _ia3(i: int, o: int, p: AdapterParams, name: str) -> int:
    return i if _feedforward(name, p) else o


def _loha(i: int, o: int, p: AdapterParams, name: str) -> int:
    return 2 * p.rank * (i + o)


def _lokr(i: int, o: int, p: AdapterParams, name: str) -> int:
    (in_small, in_large), (out_small, out_large) = _factor(i), _factor(o)
    small = out_small * in_small
    full_large = p.rank >= max(out_large, in_large) / 2  # peft keeps the large factor whole at such ranks
    large = out_large * in_large if full_large else p.rank * (out_large + in_large)
    return small + large


def _oft(i: int, o: int, p: AdapterParams, name: str) -> int:
    b = p.block_size
    return (i // b) * (b * (b - 1) // 2)


def _boft(i: int, o: int, p: AdapterParams, name: str) -> int:
    b = p.block_size
    return p.butterfly_factor * (i // b) * b * b + o


def _vera(i: int, o: int, p: AdapterParams, name: str) -> int:
    return p.rank + o


def _fourierft(i: int, o: int, p: AdapterParams, name: str) -> int:
    return p.frequencies


def _layer_sum(formula: Callable[[int, int, AdapterParams, str], int]) -> Callable[[nn.Module, AdapterParams], int]:
    def expected(net: nn.Module, params: AdapterParams) -> int:
        layers = check_targets(net, params.targets, params)
        adapters = sum(formula(m.in_features, m.out_features, params, name) for name, m in layers.items())
        return adapters + _saved_count(net, params)

    return expected


# --- checks peft would otherwise answer by silently changing the request --------------------------------

def _check_blocks(net: nn.Module, params: AdapterParams) -> None:
    """OFT/BOFT blocks must tile each target's input width (peft would pick another block size instead)."""
    boft = params.method == "boft"
    step = params.block_size * (2 ** (params.butterfly_factor - 1) if boft else 1)
    for name, layer in check_targets(net, params.targets, params).items():
        if layer.in_features % step:
            raise RequestError(f"{params.method}: block_size {params.block_size}"
                               + (f" x 2^{params.butterfly_factor - 1} (butterfly)" if boft else "")
                               + f" does not divide the input width {layer.in_features} of {name}")
    if boft and params.butterfly_factor > 1:
        if params.block_size % 2:
            raise RequestError("boft: block_size must be even when butterfly_factor > 1")
        from peft.tuners.boft.layer import get_fbd_cuda

        # Without its CUDA extension peft quietly trains one factor whatever was asked (peft/tuners/boft/layer.py).
        if not get_fbd_cuda():
            raise RequestError("boft: butterfly_factor > 1 needs peft's fbd_cuda extension (a CUDA machine with "
                               "ninja), which is not available here; use butterfly_factor 1")


def _check_frequencies(net: nn.Module, params: AdapterParams) -> None:
    for name, layer in check_targets(net, params.targets, params).items():
        if params.frequencies > layer.in_features * layer.out_features:
            raise RequestError(f"fourierft: {params.frequencies} frequencies exceed the "
                               f"{layer.in_features * layer.out_features} weights of {name}")


def _peft_config(params: AdapterParams):
    import peft

    targets = list(params.targets)
    common = dict(target_modules=targets)
    method = params.method
    if method in ("lora", "dora"):
        return peft.LoraConfig(r=params.rank, lora_alpha=params.alpha, lora_dropout=params.dropout,
                               use_dora=method == "dora", **common)
    if method == "ia3":
        return peft.IA3Config(feedforward_modules=[t for t in targets if t.split(".")[-1] == "fc2"], **common)
    if method == "loha":
        return peft.LoHaConfig(r=params.rank, alpha=params.alpha, rank_dropout=params.dropout, **common)
    if method == "lokr":
        return peft.LoKrConfig(r=params.rank, alpha=params.alpha, rank_dropout=params.dropout, **common)
    if method == "oft":
        return peft.OFTConfig(r=0, oft_block_size=params.block_size, module_dropout=params.dropout, **common)
    if method == "boft":
        return peft.BOFTConfig(boft_block_size=params.block_size, boft_block_num=0,
                               boft_n_butterfly_factor=params.butterfly_factor, boft_dropout=params.dropout, **common)
    if method == "vera":
        return peft.VeraConfig(r=params.rank, vera_dropout=params.dropout, **common)
    if method == "fourierft":
        return peft.FourierFTConfig(n_frequency=params.frequencies, scaling=params.fourier_scaling, **common)
    raise ValueError(f"{method} is not a peft method")


def _attach_peft(checks: Callable[[nn.Module, AdapterParams], None] | None = None):
    def attach(net: nn.Module, params: AdapterParams) -> nn.Module:
        from peft import get_peft_model

        check_targets(net, params.targets, params)  # before peft, which errors only when nothing matches
        if checks is not None:
            checks(net, params)
        saved = saved_module_paths(net, params)
        try:
            adapted = get_peft_model(net, _peft_config(params))
        except ValueError as error:  # peft's own refusals (shapes it cannot adapt) as a request error
            raise RequestError(f"{params.method}: {error}") from None
        return _train_in_full(adapted, net, saved)

    return attach


def _train_in_full(adapted: nn.Module, net: nn.Module, saved: list[str]) -> nn.Module:
    """Unfreeze the head, pooling and patch embedding where they are, after peft froze everything else.

    Trained in place rather than as peft ``modules_to_save`` copies: peft 0.21 wraps every module whose name
    ends with "head" (a segmentation or slide model's encoder.head Identity too), and IA3 then fails to merge
    that Identity, while LayerNorm tuning's merge leaves the wrappers in the model. One adapter per model needs
    no frozen original beside the trained copy.
    """
    modules = dict(net.named_modules())
    for name in saved:
        modules[name].requires_grad_(True)
    return adapted


def _merge_peft(adapted: nn.Module) -> nn.Module:
    return adapted.merge_and_unload()


# --- LayerNorm tuning: every LayerNorm of the encoder trains (targets are not used) -------------------------

def _layernorms(net: nn.Module, params: AdapterParams) -> dict[str, nn.LayerNorm]:
    saved = saved_module_paths(net, params)
    return {name: m for name, m in net.named_modules() if isinstance(m, nn.LayerNorm)
            and not any(name == s or name.startswith(s + ".") for s in saved)}


def _attach_layernorm(net: nn.Module, params: AdapterParams) -> nn.Module:
    from peft import LNTuningConfig, get_peft_model

    norms = _layernorms(net, params)
    if not norms:
        raise RequestError(f"layernorm: {type(net).__name__} has no LayerNorm to tune")
    # A pattern of the exact names: as a list, "norm" would also pick every ".attn.norm" Identity by suffix.
    pattern = "|".join(re.escape(name) for name in norms)
    saved = saved_module_paths(net, params)
    return _train_in_full(get_peft_model(net, LNTuningConfig(target_modules=pattern)), net, saved)


def _expected_layernorm(net: nn.Module, params: AdapterParams) -> int:
    return sum(_count(m) for m in _layernorms(net, params).values()) + _saved_count(net, params)


# --- the reference methods: everything trains, or only the head -----------------------------------------

def _attach_full(net: nn.Module, params: AdapterParams) -> nn.Module:
    for parameter in net.parameters():
        parameter.requires_grad_(True)
    return net


def _attach_linear_probe(net: nn.Module, params: AdapterParams) -> nn.Module:
    saved = saved_module_paths(net, params)
    for name, parameter in net.named_parameters():
        parameter.requires_grad_(any(name.startswith(s + ".") for s in saved))
    return net


def _identity(net: nn.Module) -> nn.Module:
    return net


def _register_peft(name: str, formula, checks=None) -> None:
    register(AdapterMethod(name=name, family="peft", mergeable=True, attach=_attach_peft(checks),
                           expected_trainable=_layer_sum(formula), merge=_merge_peft))


_register_peft("lora", _lora)
_register_peft("dora", _dora)
_register_peft("ia3", _ia3)
_register_peft("loha", _loha)
_register_peft("lokr", _lokr)
_register_peft("oft", _oft, _check_blocks)
_register_peft("boft", _boft, _check_blocks)
_register_peft("vera", _vera)
_register_peft("fourierft", _fourierft, _check_frequencies)
register(AdapterMethod(name="layernorm", family="peft", mergeable=True, attach=_attach_layernorm,
                       expected_trainable=_expected_layernorm, merge=_merge_peft))
register(AdapterMethod(name="full", family="project", mergeable=True, attach=_attach_full,
                       expected_trainable=lambda net, params: _count(net), merge=_identity))
register(AdapterMethod(name="linear-probe", family="project", mergeable=True, attach=_attach_linear_probe,
                       expected_trainable=_saved_count, merge=_identity))

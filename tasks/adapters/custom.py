"""Adapter methods no maintained library offers, written here: BitFit, SSF, VPT (shallow, deep), AdaptFormer, DVPT.

Each works on the three nets Vitrail trains (a timm ``VisionTransformer`` classifier, a
:class:`tasks.models.SegmentationViT`, an :class:`tasks.models.AttentionMIL` slide model) and keeps the
timm module tree and its state-dict names: extra tensors are added beside the frozen ones (a child module,
a forward hook, or the prompt-aware block container), never by renaming them. So a saved model's frozen
weights load by their usual names, distillation can copy blocks from an adapted teacher, and pruning still
finds timm ``Attention``/``Mlp`` blocks. The head (and a slide model's attention pooling) always train.

Knobs read from the adapter parameters (any object with these attributes; missing ones take the default):
``prompt_tokens`` (VPT, DVPT: prompts per layer, 10), ``bottleneck`` (AdaptFormer: 64, DVPT: 16 hidden
units), ``adapter_scale`` (AdaptFormer's s, 0.1) and ``train_patch_embed`` (also train the patch embedding,
False).

References: Ben Zaken et al., "BitFit" (ACL 2022); Lian et al., "Scaling & Shifting Your Features" (SSF,
NeurIPS 2022); Jia et al., "Visual Prompt Tuning" (ECCV 2022); Chen et al., "AdaptFormer" (NeurIPS 2022);
He et al., "DVPT: Dynamic Visual Prompt Tuning of Large Pre-trained Models for Medical Image Analysis" (2023).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tasks.adapters.registry import AdapterMethod, register
from tasks.request_errors import RequestError

DEFAULT_PROMPT_TOKENS = 10
DEFAULT_SCALE = 0.1
DEFAULT_BOTTLENECK = {"adaptformer": 64, "dvpt": 16}

PROMPT_TOKEN_REDUCTION_REFUSAL = (
    "token reduction runs the ViT blocks itself and would drop the visual prompts (VPT/DVPT) this model was "
    "trained with; compress a prompted model by distillation, pruning or quantization instead")


# --- where the parts of a net are --------------------------------------------------------------------------

def _encoder(net: nn.Module) -> nn.Module:
    """The timm ViT inside ``net`` (the net itself for tile classifiers, ``net.encoder`` otherwise)."""
    from timm.models.vision_transformer import VisionTransformer

    encoder = getattr(net, "encoder", net)
    if not isinstance(encoder, VisionTransformer):
        raise RequestError(f"{type(net).__name__}: these adapter methods need a timm VisionTransformer "
                           f"(alone, or as the encoder of a segmentation or slide model), got {type(encoder).__name__}")
    return encoder


def _always_trained(net: nn.Module, params: object) -> list[nn.Module]:
    """Modules that train fully whatever the method: the head, a slide model's pooling, optionally the patch
    embedding (advisable when the band count differs from the pretrained model's)."""
    encoder = _encoder(net)
    parts = [net.head]
    if hasattr(net, "pool") and isinstance(net.pool, nn.Module):
        parts.append(net.pool)  # the attention network of a slide model is new, like the head
    if getattr(params, "train_patch_embed", False):
        parts.append(encoder.patch_embed.proj)
    return parts


def _freeze_except_always_trained(net: nn.Module, params: object) -> None:
    net.requires_grad_(False)
    for module in _always_trained(net, params):
        module.requires_grad_(True)


def _count(modules: list[nn.Module]) -> int:
    seen = {id(p): p.numel() for m in modules for p in m.parameters()}
    return sum(seen.values())


def _encoder_modules(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the encoder without its head (a plain ViT's head is inside it)."""
    encoder = _encoder(net)
    return [(name, module) for name, module in encoder.named_modules()
            if not (name == "head" or name.startswith("head."))]


def _knob(params: object, name: str, default, low: float) -> float:
    value = getattr(params, name, None)
    value = default if value is None else value
    if value < low:
        raise RequestError(f"adapter setting {name}={value} is out of range (at least {low})")
    return value


def _remove_hooks(module: nn.Module, hook) -> None:
    for key, function in list(module._forward_hooks.items()):
        if function is hook:
            del module._forward_hooks[key]


# --- BitFit: only the biases train (Ben Zaken et al. 2022) ---------------------------------------------------

def _bias_parameters(net: nn.Module) -> list[nn.Parameter]:
    return [module.bias for _, module in _encoder_modules(net)
            if isinstance(getattr(module, "bias", None), nn.Parameter)]


def attach_bitfit(net: nn.Module, params: object) -> nn.Module:
    """Freeze everything but every bias of the encoder (linear, convolution and norm biases) and the head."""
    _freeze_except_always_trained(net, params)
    for bias in _bias_parameters(net):
        bias.requires_grad_(True)
    return net


def expected_bitfit(net: nn.Module, params: object) -> int:
    """Sum of the encoder's bias sizes, plus the always-trained parts (a bias inside them counted once)."""
    always = {id(p) for m in _always_trained(net, params) for p in m.parameters()}
    return sum(b.numel() for b in _bias_parameters(net) if id(b) not in always) + _count(_always_trained(net, params))


def merge_plain(adapted: nn.Module) -> nn.Module:
    """BitFit trains existing tensors: the adapted net already is the plain one."""
    return adapted


# --- SSF: a learnt per-channel scale and shift after every operation (Lian et al. 2022) -----------------------

class ScaleShift(nn.Module):
    """``y * scale + shift`` per output channel; ``shift`` only where the wrapped layer has a bias to fold it into.

    Initialised as the paper does (scale ~ N(1, 0.02), shift ~ N(0, 0.02)).
    """

    def __init__(self, width: int, shift: bool, channel_axis: int):
        super().__init__()
        self.channel_axis = channel_axis
        self.scale = nn.Parameter(torch.empty(width).normal_(1.0, 0.02))
        self.shift = nn.Parameter(torch.empty(width).normal_(0.0, 0.02)) if shift else None

    def _shaped(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        if self.channel_axis == -1:
            return t
        return t.reshape([-1] + [1] * (ndim - 2))  # (C, 1, 1) for a convolution's (N, C, H, W) output

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        y = y * self._shaped(self.scale, y.ndim)
        return y if self.shift is None else y + self._shaped(self.shift, y.ndim)


def _ssf_hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return module.ssf(output)


def _ssf_sites(net: nn.Module) -> list[tuple[str, nn.Module, int, bool]]:
    """(name, module, width, has_bias) of every encoder op SSF follows: linear layers (qkv, proj, fc1, fc2),
    affine LayerNorms (norm1, norm2, the final norm) and the patch-embedding convolution."""
    sites = []
    for name, module in _encoder_modules(net):
        if isinstance(module, nn.Linear):
            sites.append((name, module, module.out_features, module.bias is not None))
        elif isinstance(module, nn.LayerNorm) and module.weight is not None:
            sites.append((name, module, module.weight.numel(), module.bias is not None))
        elif isinstance(module, nn.Conv2d) and name == "patch_embed.proj":
            sites.append((name, module, module.out_channels, module.bias is not None))
    return sites


def attach_ssf(net: nn.Module, params: object) -> nn.Module:
    """Add a scale and shift after each op; a layer without a bias gets a scale only (its shift could not be
    folded back into plain weights)."""
    _freeze_except_always_trained(net, params)
    for _, module, width, has_bias in _ssf_sites(net):
        module.ssf = ScaleShift(width, has_bias, 1 if isinstance(module, nn.Conv2d) else -1)
        module.register_forward_hook(_ssf_hook)
    return net


def expected_ssf(net: nn.Module, params: object) -> int:
    """2 x the output width of every followed op with a bias (1 x without), plus the always-trained parts."""
    return sum((2 if has_bias else 1) * width for *_, width, has_bias in _ssf_sites(net)) \
        + _count(_always_trained(net, params))


@torch.no_grad()
def merge_ssf(adapted: nn.Module) -> nn.Module:
    """Fold each scale/shift into the op before it: W' = diag(s) W, b' = s * b + t (LayerNorm: on its affine)."""
    for module in list(adapted.modules()):
        ssf = getattr(module, "ssf", None)
        if not isinstance(ssf, ScaleShift):
            continue
        scale = ssf.scale.reshape([-1] + [1] * (module.weight.ndim - 1))
        module.weight.mul_(scale)
        if module.bias is not None:
            module.bias.mul_(ssf.scale).add_(ssf.shift)
        _remove_hooks(module, _ssf_hook)
        del module.ssf
    return adapted


# --- AdaptFormer: a scaled bottleneck MLP beside each block's MLP (Chen et al. 2022) --------------------------

class ParallelAdapter(nn.Module):
    """``scale * up(relu(down(x)))``; up starts at zero, so the adapted net starts as the frozen one."""

    def __init__(self, width: int, bottleneck: int, scale: float):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        # A buffer, so the saved weights carry the scale the adapter was trained with; one element, not a
        # 0-d tensor (the training loop's weight digest views every tensor as bytes, which 0-d refuses).
        self.register_buffer("scale", torch.tensor([float(scale)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(torch.relu(self.down(x)))


def _parallel_adapter_hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    # The branch reads what the MLP reads (the block's norm2 output) and adds to what it returns:
    # x_l = x' + MLP(LN(x')) + s * up(ReLU(down(LN(x')))), AdaptFormer's parallel form.
    return output + module.adapter(args[0])


def attach_adaptformer(net: nn.Module, params: object) -> nn.Module:
    """Freeze the net; add a ParallelAdapter beside every block's MLP (as ``blocks.N.mlp.adapter``)."""
    bottleneck = int(_knob(params, "bottleneck", DEFAULT_BOTTLENECK["adaptformer"], 1))
    scale = float(_knob(params, "adapter_scale", DEFAULT_SCALE, 0.0))
    _freeze_except_always_trained(net, params)
    encoder = _encoder(net)
    for block in encoder.blocks:
        block.mlp.adapter = ParallelAdapter(encoder.embed_dim, bottleneck, scale)
        block.mlp.register_forward_hook(_parallel_adapter_hook)
    return net


def expected_adaptformer(net: nn.Module, params: object) -> int:
    """Per block: down D*b + b, up b*D + D; plus the always-trained parts."""
    encoder = _encoder(net)
    b, d = int(_knob(params, "bottleneck", DEFAULT_BOTTLENECK["adaptformer"], 1)), encoder.embed_dim
    return len(encoder.blocks) * (2 * d * b + b + d) + _count(_always_trained(net, params))


# --- prompts: VPT shallow and deep (Jia et al. 2022), DVPT (He et al. 2023) ----------------------------------

class PromptGenerator(nn.Module):
    """DVPT's prompts for one block, made from that sample's own tokens.

    The block's normalised image tokens go through a bottleneck (``down``, ReLU: the domain-specific
    features); ``prompt_tokens`` learnt queries cross-attend to them (single head, in the bottleneck width),
    and ``up`` projects what they gathered to the model width: one prompt per query, per sample. The frozen
    block then mixes those prompts with the image tokens, as VPT-deep's prompts are.
    """

    def __init__(self, width: int, bottleneck: int, prompts: int):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.queries = nn.Parameter(torch.empty(prompts, bottleneck))
        self.up = nn.Linear(bottleneck, width)
        nn.init.trunc_normal_(self.queries, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.down(tokens))  # (B, N, b)
        scores = self.queries @ features.transpose(1, 2) / math.sqrt(features.shape[-1])  # (B, m, N)
        return self.up(scores.softmax(dim=-1) @ features)  # (B, m, D)


class PromptedBlocks(nn.Sequential):
    """A ViT's blocks run with prompt tokens placed right after the prefix (class) tokens.

    ``shallow``: learnt prompts enter before the first block and travel through all of them. ``deep``:
    each block gets its own learnt prompts, replacing what the previous block made of the last ones.
    ``dynamic`` (DVPT): like deep, but block i's prompts come from its ``prompt_generator`` applied to the
    image tokens entering it. The prompts are dropped after the last block, so the ViT's final norm,
    pooling (class token or mean of patch tokens), a segmentation decoder and a slide model's pooling see
    exactly the tokens of the plain ViT. The blocks keep their names (``blocks.N.*``); the learnt prompts
    are ``blocks.prompts``.
    """

    refuses_token_reduction = PROMPT_TOKEN_REDUCTION_REFUSAL

    def __init__(self, blocks: nn.Sequential, prefix_tokens: int, prompt_tokens: int, mode: str,
                 prompts: torch.Tensor | None):
        super().__init__(*blocks)
        self.prefix_tokens = prefix_tokens
        self.prompt_tokens = prompt_tokens
        self.mode = mode
        self.prompts = None if prompts is None else nn.Parameter(prompts)

    def _prompts_for(self, index: int, image_tokens: torch.Tensor) -> torch.Tensor:
        if self.mode == "dynamic":
            block = self[index]
            return block.prompt_generator(block.norm1(image_tokens))
        return self.prompts[index].unsqueeze(0).expand(image_tokens.shape[0], -1, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start, end = self.prefix_tokens, self.prefix_tokens + self.prompt_tokens
        x = torch.cat([x[:, :start], self._prompts_for(0, x[:, start:]), x[:, start:]], dim=1)
        for index, block in enumerate(self):
            if index > 0 and self.mode != "shallow":
                x = torch.cat([x[:, :start], self._prompts_for(index, x[:, end:]), x[:, end:]], dim=1)
            x = block(x)
        return torch.cat([x[:, :start], x[:, end:]], dim=1)


def _initial_prompts(encoder: nn.Module, layers: int, prompts: int) -> torch.Tensor:
    # VPT's initialisation: uniform Xavier over the patch-embedding fan-in plus the width.
    proj = encoder.patch_embed.proj
    fan_in = proj.weight[0].numel() if hasattr(proj, "weight") else encoder.embed_dim
    bound = math.sqrt(6.0 / (fan_in + encoder.embed_dim))
    return torch.empty(layers, prompts, encoder.embed_dim).uniform_(-bound, bound)


def _attach_prompts(net: nn.Module, params: object, mode: str) -> nn.Module:
    encoder = _encoder(net)
    if isinstance(encoder.blocks, PromptedBlocks):
        raise RequestError("this network already has visual prompts; attach one prompt method only")
    prompts = int(_knob(params, "prompt_tokens", DEFAULT_PROMPT_TOKENS, 1))
    _freeze_except_always_trained(net, params)
    learnt = None
    if mode == "dynamic":
        bottleneck = int(_knob(params, "bottleneck", DEFAULT_BOTTLENECK["dvpt"], 1))
        for block in encoder.blocks:
            block.prompt_generator = PromptGenerator(encoder.embed_dim, bottleneck, prompts)
    else:
        learnt = _initial_prompts(encoder, len(encoder.blocks) if mode == "deep" else 1, prompts)
    # timm's forward_features runs ``self.blocks(x)``; the container adds and drops the prompts around them.
    encoder.blocks = PromptedBlocks(encoder.blocks, encoder.num_prefix_tokens, prompts, mode, learnt)
    return net


def attach_vpt_shallow(net: nn.Module, params: object) -> nn.Module:
    """Freeze the net; ``prompt_tokens`` learnt tokens enter after the class token, before the first block."""
    return _attach_prompts(net, params, "shallow")


def attach_vpt_deep(net: nn.Module, params: object) -> nn.Module:
    """Freeze the net; every block gets its own ``prompt_tokens`` learnt tokens."""
    return _attach_prompts(net, params, "deep")


def attach_dvpt(net: nn.Module, params: object) -> nn.Module:
    """Freeze the net; every block gets ``prompt_tokens`` prompts generated from the sample's own tokens."""
    return _attach_prompts(net, params, "dynamic")


def expected_vpt_shallow(net: nn.Module, params: object) -> int:
    """m x D prompt values, plus the always-trained parts."""
    m = int(_knob(params, "prompt_tokens", DEFAULT_PROMPT_TOKENS, 1))
    return m * _encoder(net).embed_dim + _count(_always_trained(net, params))


def expected_vpt_deep(net: nn.Module, params: object) -> int:
    """L x m x D prompt values (L blocks), plus the always-trained parts."""
    encoder, m = _encoder(net), int(_knob(params, "prompt_tokens", DEFAULT_PROMPT_TOKENS, 1))
    return len(encoder.blocks) * m * encoder.embed_dim + _count(_always_trained(net, params))


def expected_dvpt(net: nn.Module, params: object) -> int:
    """Per block: down D*b + b, queries m*b, up b*D + D; plus the always-trained parts."""
    encoder = _encoder(net)
    m = int(_knob(params, "prompt_tokens", DEFAULT_PROMPT_TOKENS, 1))
    b, d = int(_knob(params, "bottleneck", DEFAULT_BOTTLENECK["dvpt"], 1)), encoder.embed_dim
    return len(encoder.blocks) * (2 * d * b + b + m * b + d) + _count(_always_trained(net, params))


def keep_operations(adapted: nn.Module) -> nn.Module:
    """Non-mergeable methods export as they are: their extra operations (and prompts, as constants) stay."""
    return adapted


def _rebuilt(attach):
    def rebuild(net: nn.Module, params: object) -> nn.Module:
        """The adapted structure with fresh adapter weights, for a saved model's weights to load into."""
        return attach(net, params).eval()

    return rebuild


BITFIT = register(AdapterMethod("bitfit", "project", True, attach_bitfit, expected_bitfit, merge_plain))
SSF = register(AdapterMethod("ssf", "project", True, attach_ssf, expected_ssf, merge_ssf))
VPT_SHALLOW = register(AdapterMethod("vpt-shallow", "project", False, attach_vpt_shallow, expected_vpt_shallow,
                                     keep_operations, _rebuilt(attach_vpt_shallow)))
VPT_DEEP = register(AdapterMethod("vpt-deep", "project", False, attach_vpt_deep, expected_vpt_deep,
                                  keep_operations, _rebuilt(attach_vpt_deep)))
ADAPTFORMER = register(AdapterMethod("adaptformer", "project", False, attach_adaptformer, expected_adaptformer,
                                     keep_operations, _rebuilt(attach_adaptformer)))
DVPT = register(AdapterMethod("dvpt", "project", False, attach_dvpt, expected_dvpt, keep_operations,
                              _rebuilt(attach_dvpt)))

"""Named pipeline presets: the run knobs of one model size, read by the CLI and copied into deploy/prefect.yaml.

A preset is a partial :class:`~flows.pipeline.PipelineParams` payload without the domain and the
paths (source, labels, workdir), which belong to each run. The CLI lays explicit flags over it
(``vitrail pipeline --preset NAME --epochs 1``); each ``pipeline/<domain>-<preset>`` deployment in
``deploy/prefect.yaml`` holds the same values, and ``tests/flows/test_presets.py`` fails when the two
differ. This module imports nothing heavy, so ``vitrail --help`` stays instant.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Preset:
    """One named set of pipeline parameters."""

    name: str
    description: str
    params: dict[str, Any] = field(default_factory=dict)
    """Partial PipelineParams payload: only what differs from the defaults or must not follow them."""


PRESETS: dict[str, Preset] = {preset.name: preset for preset in (
    Preset(
        "demo",
        "The demo's tiny model: ViT-Tiny cut to 4 px patches on 32 px tiles, random init, 12 epochs.",
        {
            "tiling": {"tile_size": 32, "stride": 32},
            "backbone": {"name": "vit_tiny_patch16_224", "weights": "none", "patch_size": 4},
            "train": {"epochs": 12},
        },
    ),
    Preset(
        "vit-s16-224",
        "ViT-S/16 at 224 px (22M parameters, the size of published Sentinel-2 foundation models) with LoRA on qkv; "
        "runs on a 2-core CPU for a small scene, uses a GPU when there is one.",
        {
            # Published Sentinel-2 ViT-S/16 models (SSL4EO-S12, SatMAE-style) take 224 px inputs. Blocks of
            # 2 x 2 tiles (4.5 km at 10 m) keep neighbouring tiles in one split; a 720 px scene still gives
            # the 4 blocks train/val/test need.
            "tiling": {"tile_size": 224, "stride": 224, "block_size": 448, "max_nodata_fraction": 0.5},
            # Random init keeps the preset runnable offline. For real work load a foundation checkpoint:
            # weights=file with a 13-band SSL4EO-S12 ViT-S/16 loads as is; weights=hub adapts ImageNet RGB
            # weights by wavelength.
            "backbone": {"name": "vit_small_patch16_224", "weights": "none", "patch_size": 16},
            "adapter": {"method": "lora", "rank": 8, "alpha": 16.0, "targets": ["qkv"], "train_patch_embed": True},
            # 32 samples per step in one pass: about 1.5 GB of activations (1.52 GB peak on an H100 with the
            # weights and optimizer; a CPU holds about the same) and 1300 samples/s there, where two
            # micro-batches of 16 gave 750. 32-bit floats keep the reproducibility contract on every device;
            # bf16-mixed was slower at this size on that GPU. Samples are read in the training process: reader
            # processes forked inside a Prefect flow run exit with code 1 when the loader shuts down (torch then
            # prints a RuntimeError per loader), and on 2 cores they would only compete with the 2 training
            # threads. On a GPU machine raise train.num_workers.
            "train": {"epochs": 10, "batch_size": 32, "grad_accumulation": 1, "learning_rate": 0.001,
                      "precision": "32", "device": "auto", "threads": 2, "num_workers": 0},
            # The edge model is named, not chosen by 'auto': 'auto' fails the run when no variant meets the
            # cpu-2core profile's 50 ms, and batch-1 latency swings with the machine (2 threads, dynamic / static
            # int8: 30.7 / 38.6 ms on an idle Xeon; 209 / 249 ms and 100 / 96 ms in two runs on a shared 2-core
            # EPYC). Dynamic int8 was about as fast as static or faster, and needs no calibration; the gate's
            # 100 ms budget then judges it. Calibrating static int8 (always built, for comparison) holds the
            # inputs of every quantized op for every sample (roughly 40 MB a tile for ViT-S/16, counting its 72
            # matmuls), hence 32 tiles. Few timing repeats keep measuring to seconds.
            "compression": {"edge_variant": "onnx-int8-dynamic", "threads": 2, "latency_repeats": 20,
                            "throughput_batch": 8, "quantization": {"calibration_samples": 32}},
            "gate": {"latency_budget_ms": 100.0},
        },
    ),
)}


def preset_names() -> list[str]:
    """Names of the known presets, in the order they are listed."""
    return list(PRESETS)


def get_preset(name: str) -> Preset:
    """The preset called ``name``.

    Raises:
        KeyError: unknown name; the message lists the known presets.
    """
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def apply_preset(name: str | None, payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` laid over the preset ``name`` (None: ``payload`` unchanged).

    Nested sections merge key by key, so ``{"train": {"epochs": 1}}`` keeps the preset's batch size;
    any other value in ``payload`` replaces the preset's. Neither argument is modified.
    """
    if name is None:
        return copy.deepcopy(payload)
    return _merged(get_preset(name).params, payload)


def _merged(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# Presets of the pretrain flow (a partial :class:`~flows.pretrain.PretrainParams` payload without domain,
# dataset and workdir), kept apart from the pipeline presets above; ``pretrain/<domain>-mae-smoke`` in
# deploy/prefect.yaml holds the same values (tests/flows/test_pretrain.py checks it).
PRETRAIN_PRESETS: dict[str, Preset] = {preset.name: preset for preset in (
    Preset(
        "smoke",
        "CI smoke run of masked-autoencoder pretraining: a 2-block ViT-Tiny with 4 px patches, a one-block "
        "decoder, at most 512 tiles, 2 epochs; well under two minutes on 2 CPU cores for any demo dataset.",
        {
            "backbone": {"name": "vit_tiny_patch16_224", "weights": "none", "patch_size": 4, "depth": 2},
            "mae": {"decoder_dim": 64, "decoder_depth": 1, "decoder_heads": 2, "preview_samples": 4, "max_tiles": 512},
            "train": {"epochs": 2, "batch_size": 32, "learning_rate": 0.001, "warmup_epochs": 0.0, "threads": 2},
        },
    ),
)}


def apply_pretrain_preset(name: str | None, payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` laid over the pretrain preset ``name`` (None: ``payload`` unchanged), as :func:`apply_preset`."""
    if name is None:
        return copy.deepcopy(payload)
    if name not in PRETRAIN_PRESETS:
        raise KeyError(f"unknown pretrain preset {name!r}; known: {', '.join(PRETRAIN_PRESETS)}")
    return _merged(PRETRAIN_PRESETS[name].params, payload)

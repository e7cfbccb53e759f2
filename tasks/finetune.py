"""The fine-tune stage's work: a timm backbone with an adapter (LoRA, ...) on a dataset's bands, trained by the one loop."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NONE
from torch import nn

from domains import get_domain
from tasks.atomic_files import atomic_path
from tasks.bags import BagParams
from tasks.model_inputs import InputNormalisationName, fit_normalisation, load_dataset_for
from tasks.dataset import DatasetInfo, load_dataset
from tasks.adapters import AdapterParams, LoraParams, as_adapter_params, attach_adapter, get_method, merge_adapter
from tasks.merging.task_vectors import weights_digest
from tasks.backbone_catalog import band_adaptation_of
from tasks.models import BackboneParams, build_backbone, count_parameters, network_channels, normalizing_model
from tasks.reproducibility import pin_determinism
from tasks.training import EpochCallback, FitResult, TrainParams, fit

log = logging.getLogger(__name__)


@dataclass
class FinetuneOutcome:
    """The merged reference model plus what is worth recording about how it was made."""

    model: nn.Module
    fit: FitResult
    trainable_parameters: int
    total_parameters: int
    metadata: dict

    @property
    def best_validation_metrics(self) -> dict[str, float]:
        """The best epoch's validation scores (``val_*`` keys other than the loss)."""
        return {k: v for k, v in self.fit.best_metrics.items() if k.startswith("val_") and k != "val_loss"}


def model_metadata(info: DatasetInfo, backbone: BackboneParams, bags: BagParams | None = None,
                   normalisation: dict | None = None) -> dict:
    """What a deployed model must carry to be used on new inputs: bands, classes, geometry, lineage.

    A slide-level model also carries its bag settings (``bags``): predict then scores whole slides. A model
    trained on normalised inputs carries the fitted normalisation (``input_normalisation``), which predict
    applies before the model sees a tile. ``input_scaling`` is the raw units the model takes (the dataset's
    stored units, per channel ``(scale, offset)`` to physical; None when stored physical): readers of new
    inputs convert what they read to these units.
    """
    return {
        "domain": info.domain,
        "task": info.task,
        "channels": [asdict(c) for c in info.channels],
        "class_names": list(info.class_names),
        "tile_size": info.tile_size,
        "backbone": backbone.name,
        "dataset_digest": info.digest,
        "input_scaling": [[float(a), float(b)] for a, b in info.scaling] if info.scaling is not None else None,
        **({"tile_mpp": float(info.provenance["tile_mpp"])} if info.provenance.get("tile_mpp") else {}),
        **({"bags": bags.model_dump()} if bags is not None and bags.enabled else {}),
        **({"input_normalisation": normalisation} if normalisation else {}),
        **({"windows": [asdict(w) for w in info.windows]} if info.windows else {}),
        **({"input_contract": contract} if (contract := {k: info.provenance[k] for k in
                                                         get_domain(info.domain).input_contract_keys
                                                         if k in info.provenance}) else {}),
    }


def fit_adapter(dataset_path: Path | str, backbone: BackboneParams, adapter: AdapterParams | LoraParams,
                train: TrainParams, checkpoint_dir: Path | str, on_epoch: EpochCallback | None = None,
                bags: BagParams | None = None, input_normalisation: InputNormalisationName = "none",
                frozen_head: dict | None = None) -> FinetuneOutcome:
    """Fine-tune the backbone with an adapter on the dataset and return the merged, normalising model.

    ``adapter`` names the method and its settings (a legacy :class:`LoraParams` means LoRA). A misspelt
    target is refused before any data is read into training. Mergeable methods come back as plain weights;
    the others keep their extra operations (and are described with their settings when saved).

    ``dataset_path`` and ``checkpoint_dir`` are local folders or fsspec URLs (``s3://bucket/prefix``);
    a run resumes from the newest matching checkpoint there, whichever machine wrote it.

    The seed and thread count are pinned before the backbone is built: timm's and peft's weight
    initialisers draw from torch's global generator, so an unseeded build made every run start from
    different weights.

    With enabled ``bags`` the model learns slide labels from bags of each slide's tiles (attention MIL,
    :mod:`tasks.bags`); the training loop is the same, its samples are bags. An ``input_normalisation``
    other than "none" (histopathology: stain normalisation) is fitted on the training tiles, applied to
    every tile the model sees, and kept with the model (:mod:`tasks.model_inputs`).

    ``frozen_head`` (the head's own state dict, e.g. ``net.head`` of a linear probe of the same base) is loaded
    into the head, which then stays fixed while the adapter trains (LP-FT with a frozen head): a fine-tune made
    to merge, whose backbone change stays relative to a head that any merge of such fine-tunes keeps valid.
    """
    adapter = as_adapter_params(adapter)
    pin_determinism(train.seed, train.threads)
    if bags is not None and bags.enabled:
        bags = bags.model_copy(update={"seed": train.seed})
    normalisation = (fit_normalisation(load_dataset(dataset_path), input_normalisation)
                     if input_normalisation != "none" else None)
    dataset = load_dataset_for(dataset_path, bags=bags, normalisation=normalisation)
    info = dataset.info
    if train.flip_augment and not get_domain(info.domain).train_flips:
        log.info("%s: flips and rotations are not valid augmentations for this domain; training without them",
                 info.domain)
        train = train.model_copy(update={"flip_augment": False})
    net = build_backbone(backbone, network_channels(info), info.num_classes, info.tile_size, task=info.task, bags=bags)
    # The base's identity, taken before the adapter changes anything: the merge stage refuses to merge
    # fine-tunes of different bases (a random base is the seed's; heads and pooling are new, so left out).
    base = {"base_digest": weights_digest(net.state_dict()), "base_seed": train.seed,
            "base_backbone": backbone.model_dump(mode="json"),
            # Catalog weights given other bands than their own (kernels copied by band name): every metric row says so.
            "backbone_adapted": bool((band_adaptation_of(getattr(net, "encoder", net)) or {}).get("adapted"))}
    head = getattr(net, "head", None) if frozen_head is not None else None
    if frozen_head is not None:
        if not isinstance(head, nn.Module):
            raise ValueError(f"frozen_head given, but the {info.task} network has no head module to load it into")
        head.load_state_dict(frozen_head)
    adapted = attach_adapter(net, adapter)
    if head is not None:
        head.requires_grad_(False)  # after attach_adapter, which unfreezes the head in place
    model = normalizing_model(adapted, info)  # raw (stored) units in: the dataset's scaling folded into its buffers
    trainable, total = count_parameters(model)
    # "raw-in": checkpoints of models that took physical units (before input_scaling) are another model.
    model_key = f"{info.task}|{backbone.model_dump_json()}|{adapter.model_dump_json()}|raw-in"
    if bags is not None and bags.enabled:
        model_key += f"|{bags.model_dump_json()}"
    if normalisation:
        model_key += f"|{json.dumps(normalisation, sort_keys=True)}"
    if frozen_head is not None:  # another head is another run: never resume one from the other's checkpoint
        model_key += f"|frozen-head:{weights_digest(frozen_head)}"
    result = fit(model, dataset, train, checkpoint_dir, model_key, on_epoch)
    merged = normalizing_model(merge_adapter(adapted), info, input_normalisation=normalisation).eval()
    return FinetuneOutcome(model=merged, fit=result, trainable_parameters=trainable, total_parameters=total,
                           metadata={**model_metadata(info, backbone, bags, normalisation), **base,
                                     "adapter": adapter.method, "adapter_mergeable": get_method(adapter.method).mergeable})


fit_adapter_task = task(fit_adapter, name="fit-adapter", cache_policy=NONE)


def plot_training_curves(history: list[dict[str, float]], path: Path) -> Path:
    """Loss and validation scores per epoch, one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = range(1, len(history) + 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
    left.plot(epochs, [h["val_loss"] for h in history], marker="o", label="validation")
    left.set(xlabel="epoch", ylabel="loss", title="loss")
    left.legend()
    for key in [k for k in history[0] if k.startswith("val_") and k != "val_loss"]:
        right.plot(epochs, [h[key] for h in history], marker="o", label=key.removeprefix("val_").replace("_", " "))
    right.set(xlabel="epoch", ylim=(0, 1.02), title="validation")
    right.legend()
    fig.tight_layout()
    with atomic_path(path) as partial:
        fig.savefig(partial, dpi=110, format="png")
    plt.close(fig)
    return path


def record_finetune(outcome: FinetuneOutcome, artifact_dir: Path) -> str:
    """Log summary metrics, training curves and the merged model to the active run; return the model URI."""
    from tasks import tracking

    tracking.log_metrics({"best_epoch": outcome.fit.best_epoch,
                          "backbone_adapted": float(outcome.metadata.get("backbone_adapted", False)),
                          **{f"best_{k}": v for k, v in outcome.best_validation_metrics.items()},
                          "trainable_parameters": outcome.trainable_parameters,
                          "total_parameters": outcome.total_parameters})
    plot_training_curves(outcome.fit.history, artifact_dir / "training-curves.png")
    channels = len(outcome.metadata["channels"])
    size = outcome.metadata["tile_size"]
    bag = (2,) if "bags" in outcome.metadata else ()  # a slide model takes bags: (B, tiles, C, H, W)
    example = np.zeros((1, *bag, channels, size, size), dtype=np.float32)
    return tracking.log_reference_model(outcome.model, example, outcome.metadata)


record_finetune_task = task(record_finetune, name="record-finetune", cache_policy=NONE)

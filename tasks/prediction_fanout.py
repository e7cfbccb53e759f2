"""Predict a drop folder one scene per task, so a task runner (threads, or a Dask cluster) spreads the scenes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from domains import get_domain
from tasks.prediction import PredictionBatch, predict_inputs, prediction_target, refuse_unscreenable
from tasks.storage import is_url


@dataclass(frozen=True)
class ScenePrediction:
    """One input of a drop folder and where its prediction goes (a file path or a URL)."""

    input: Path
    output: str


def plan_predictions(domain_name: str, model_uri: str, input_path: Path, output: str,
                     screen_ppmm: float | None = None) -> tuple[str, list[ScenePrediction]]:
    """The model pinned once (an alias resolved to its version, so every scene sees the same model) and one job per input.

    Targets are those of the one-task run (:func:`tasks.prediction.predict_inputs`): ``output`` itself for a
    single input given with a file name, else ``<output>/<safe name><suffix>`` per input. Screening asked of
    a domain that cannot screen is refused here, once, rather than by every scene's task.
    """
    from tasks.promotion import pinned_model_uri

    domain = get_domain(domain_name)
    refuse_unscreenable(domain, screen_ppmm)
    inputs = domain.list_prediction_inputs(Path(input_path))
    single = len(inputs) == 1 and Path(input_path) == inputs[0]
    if single and Path(str(output)).suffix:
        return pinned_model_uri(model_uri), [ScenePrediction(inputs[0], str(output))]
    jobs = []
    for item in inputs:
        if is_url(output):  # the file name the local layout would use, under the URL prefix
            name = prediction_target(domain, item, Path("/nonexistent-prefix")).name
            jobs.append(ScenePrediction(item, f"{str(output).rstrip('/')}/{name}"))
        else:
            jobs.append(ScenePrediction(item, str(prediction_target(domain, item, Path(output)))))
    return pinned_model_uri(model_uri), jobs


def predict_scene(domain_name: str, model_uri: str, job: ScenePrediction, stride: int | None, threads: int,
                  mpp: float | None, screen_ppmm: float | None = None) -> PredictionBatch:
    """Predict one input to its target; its failure is recorded in the batch, as in the one-task run.

    The model is loaded by the task itself: on a Dask cluster the worker, not the flow's process, needs it.
    """
    return predict_inputs(domain_name, model_uri, job.input, job.output, stride, threads, mpp, screen_ppmm)


def merge_batches(batches: list[PredictionBatch]) -> PredictionBatch:
    """The scenes' batches as one, in the drop folder's order."""
    merged = PredictionBatch()
    for batch in batches:
        merged.written.extend(batch.written)
        merged.failed.update(batch.failed)
    return merged


plan_predictions_task = task(plan_predictions, name="plan-predictions", cache_policy=NONE)
predict_scene_task = task(predict_scene, name="predict-scene", cache_policy=NONE)

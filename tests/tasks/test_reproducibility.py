"""The reproducibility contract: same data, seed, threads and library versions give the same bytes on CPU.

Runs are made in fresh processes (and, in-process, after deliberately disturbing every global
generator and the thread count) so equality cannot come from state a previous run left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow_isolation import mlflow_sandbox
from tasks_support import tiny_backbone

from tasks.reproducibility import DEFAULT_THREADS, RECORDED_LIBRARIES, environment_record, pin_determinism

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def restore_torch_globals():
    """pin_determinism changes process-wide settings; put them back for the tests that follow."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def state_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def scores(history: list[dict]) -> list[dict]:
    """Losses and validation scores per epoch; wall-clock timings are outside the contract."""
    return [{k: v for k, v in epoch.items() if k != "epoch_seconds"} for epoch in history]


def disturb_process_state() -> None:
    """What a previous run or another library may leave behind: drawn generators, another thread count."""
    random.seed(999)
    np.random.seed(999)
    torch.manual_seed(999)
    torch.rand(17)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(False)


# --- the record ---------------------------------------------------------------------------------------


def test_pin_determinism_sets_and_records_what_decides_the_numbers() -> None:
    torch.set_num_threads(1)
    record = pin_determinism(seed=41, threads=2)
    assert torch.get_num_threads() == 2 and torch.are_deterministic_algorithms_enabled()
    assert (record.seed, record.threads, record.deterministic, record.device) == (41, 2, True, "cpu")
    assert set(record.versions) == set(RECORDED_LIBRARIES)
    assert record.versions["torch"] == torch.__version__ and record.versions["numpy"] == np.__version__
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    pin_determinism(seed=41, threads=2)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first
    tags = record.as_tags()
    assert tags["vitrail.repro.seed"] == "41" and tags["vitrail.repro.threads"] == "2"
    assert tags["vitrail.repro.version.torch"] == torch.__version__
    assert environment_record() == record


def test_pin_determinism_refuses_zero_threads() -> None:
    with pytest.raises(ValueError, match="threads must be at least 1"):
        pin_determinism(seed=0, threads=0)


def test_training_defaults_to_a_fixed_thread_count_not_the_machines() -> None:
    from tasks.compression.recipe import CompressParams
    from tasks.training import TrainParams

    assert TrainParams().threads == DEFAULT_THREADS == CompressParams().threads


def test_every_stage_run_records_the_reproducibility_settings(tmp_path: Path) -> None:
    from tasks import tracking

    with mlflow_sandbox():
        with tracking.stage_run("satellite", "finetune", tmp_path) as run:
            pin_determinism(seed=5, threads=1)  # what the stage pins while it runs is what gets recorded
        _, tags = tracking.read_run(run.run_id)
    assert tags["vitrail.repro.seed"] == "5" and tags["vitrail.repro.threads"] == "1"
    assert tags["vitrail.repro.deterministic"] == "True" and tags["vitrail.repro.device"] == "cpu"
    assert tags["vitrail.repro.version.torch"] == torch.__version__
    assert tags["vitrail.repro.version.onnxruntime"] != "absent" and tags["vitrail.repro.cpu"]


# --- training and export ------------------------------------------------------------------------------


def finetune_once(dataset_dir: Path, checkpoints: Path, threads: int = DEFAULT_THREADS):
    from tasks.finetune import fit_adapter
    from tasks.models import LoraParams
    from tasks.training import TrainParams

    train = TrainParams(epochs=2, batch_size=16, learning_rate=3e-3, warmup_epochs=0.0, threads=threads)
    return fit_adapter(dataset_dir, tiny_backbone(), LoraParams(rank=4), train, checkpoints)


def test_fine_tuning_ignores_leftover_process_state(tmp_path: Path, dataset_dir: Path) -> None:
    """Before the fix the backbone and LoRA were initialised before the seed was set: every run differed."""
    first = finetune_once(dataset_dir, tmp_path / "first")
    disturb_process_state()
    second = finetune_once(dataset_dir, tmp_path / "second")
    assert state_digest(first.model) == state_digest(second.model)
    assert scores(first.fit.history) == scores(second.fit.history)
    assert torch.get_num_threads() == DEFAULT_THREADS  # the run pinned its own thread count


CHILD = """
import hashlib, json, sys
from pathlib import Path
import torch
sys.path.insert(0, {support!r})
from test_reproducibility import finetune_once, scores, state_digest
from tasks.compression.export import export_onnx
from tasks.dataset import load_dataset

dataset_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(int(sys.argv[3]))  # each child starts from a different generator state
outcome = finetune_once(dataset_dir, out / "checkpoints")
onnx_file = export_onnx(outcome.model, load_dataset(dataset_dir).splits["test"].images, out / "model.onnx",
                        outcome.metadata)
print(json.dumps({{"weights": state_digest(outcome.model), "scores": scores(outcome.fit.history),
                  "onnx": hashlib.sha256(onnx_file.read_bytes()).hexdigest()}}))
"""


def run_child(script: Path, dataset_dir: Path, out: Path, stray_seed: int, threads_env: str) -> dict:
    # The test folder and its parent (tasks_support imports the suite-wide mlflow_isolation from there).
    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(tests), str(tests.parent)]),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": threads_env}
    done = subprocess.run([sys.executable, str(script), str(dataset_dir), str(out), str(stray_seed)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_two_fresh_processes_give_identical_weights_metrics_and_onnx_bytes(tmp_path: Path, dataset_dir: Path) -> None:
    """The issue's scenario: one run from the CLI, one from a worker whose machine has another core count."""
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(support=str(Path(__file__).parent)))
    cli = run_child(script, dataset_dir, tmp_path / "cli", stray_seed=1, threads_env="1")
    worker = run_child(script, dataset_dir, tmp_path / "worker", stray_seed=2, threads_env="2")
    assert cli["weights"] == worker["weights"]
    assert cli["scores"] == worker["scores"] and len(cli["scores"]) == 2
    assert cli["onnx"] == worker["onnx"]
    assert (tmp_path / "cli" / "model.onnx").read_bytes() == (tmp_path / "worker" / "model.onnx").read_bytes()


# --- compression ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compression_recipe_output_is_byte_identical(tmp_path: Path, dataset, trained_model, model_metadata) -> None:
    """Distillation (a freshly initialised student), export and static int8 calibration, run twice."""
    from tasks.compression.distill import DistillParams, DistillStudent
    from tasks.compression.quantize import QuantizationParams, QuantizeOnnx
    from tasks.compression.technique import REFERENCE_ROOT, CompressionContext, Variant, run_recipe

    def build(out: Path) -> list:
        context = CompressionContext(dataset=dataset, metadata=model_metadata, out_dir=out,
                                     parity_images=dataset.splits["test"].images, teacher=trained_model,
                                     flips=False, seed=3, threads=DEFAULT_THREADS)
        student = DistillParams(enabled=True, student_depth=1, epochs=1, init_from_teacher=False)
        return run_recipe(Variant(REFERENCE_ROOT, trained_model),
                          [DistillStudent(student), QuantizeOnnx("int8", QuantizationParams(calibration_samples=16))],
                          context)

    first = build(tmp_path / "first")
    disturb_process_state()
    second = build(tmp_path / "second")
    assert [v.name for v in first] == [v.name for v in second] == ["student-d1", "student-d1-int8"]
    for a, b in zip(first, second):
        assert a.onnx.read_bytes() == b.onnx.read_bytes(), a.name
    assert state_digest(first[0].model) == state_digest(second[0].model)

"""DataLoader worker processes forked inside a Prefect task run exit cleanly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from prefect import flow, task

from tasks.training import TrainParams, _loader


class _Squares(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([float(index) ** 2])


def _read_twice() -> list[float]:
    # Two epochs through persistent workers, then the loader shuts its workers down: before the fix each
    # forked worker exited with code 1 there and the loader raised "worker exited unexpectedly".
    loader = _loader(_Squares(), TrainParams(num_workers=2, seed=0), pin_memory=False, batch_size=4)
    values = [float(v) for _ in range(2) for batch in loader for v in batch.reshape(-1)]
    loader._iterator._shutdown_workers()
    return values


@pytest.mark.slow
def test_loader_workers_forked_in_a_prefect_task_exit_cleanly(prefect_harness) -> None:
    workers_task = task(_read_twice, name="read-with-workers")

    @flow(name="loader-workers")
    def read() -> list[float]:
        return workers_task()

    values = read()
    assert sorted(values) == sorted([float(i) ** 2 for i in range(8)] * 2)
    np.testing.assert_array_equal(np.array(values[:8]), np.array(values[8:]))

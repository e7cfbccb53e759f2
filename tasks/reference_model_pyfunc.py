"""MLflow "models from code" entry point that every logged reference model carries, for serving outside Vitrail.

:func:`tasks.tracking.log_reference_model` gives MLflow this file's path, so MLflow copies the file
into the model instead of cloudpickling a Python object. ``mlflow models serve`` and
``mlflow.pyfunc.load_model`` run it in an environment where Vitrail is installed. Vitrail itself
never runs the copy stored with a model (a stored file is no more trusted than a pickle):
:func:`tasks.tracking.load_reference_model` rebuilds the model with this checkout's code and reads
only tensors and a validated architecture description.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class ReferenceModelPyfunc(PythonModel):
    """Logits of the reference model for a float32 batch (N, C, H, W) in its raw input units.

    The units are the stored units of its training dataset (``input_scaling`` in its metadata and
    ``architecture.json``: Sentinel-2 digital numbers, 8-bit RGB values...); the normalisation is inside.
    """

    def load_context(self, context) -> None:
        from tasks.models import load_reference_files

        self.model = load_reference_files(Path(context.artifacts["weights"]), Path(context.artifacts["architecture"]))

    def predict(self, context, model_input, params=None):
        import torch

        batch = torch.from_numpy(np.ascontiguousarray(model_input, dtype=np.float32))
        with torch.inference_mode():
            return self.model(batch).numpy()


mlflow.models.set_model(ReferenceModelPyfunc())

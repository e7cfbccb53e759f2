"""MLflow "models from code" entry point of an OpenVINO edge model, for serving outside Vitrail.

:func:`tasks.tracking.log_edge_model` logs an OpenVINO IR pair (``model.xml`` + ``model.bin``) with
this file as its pyfunc code, so ``mlflow.pyfunc.load_model`` / ``mlflow models serve`` can run it where
Vitrail and OpenVINO are installed, offline. Vitrail itself never runs the stored copy:
:func:`tasks.prediction.load_model` compiles the IR with this checkout's :mod:`tasks.openvino_runtime`.
"""

from __future__ import annotations

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class OpenVinoEdgePyfunc(PythonModel):
    """Logits of the edge model for a float32 batch (N, C, H, W) in its raw input units (``input_scaling`` in
    its metadata: the stored units of the training dataset; the normalisation is inside the graph)."""

    def load_context(self, context) -> None:
        from tasks.openvino_runtime import compile_model, compiled_predictor

        self.predict_logits = compiled_predictor(compile_model(context.artifacts["model"]))

    def predict(self, context, model_input, params=None):
        return self.predict_logits(np.ascontiguousarray(model_input, dtype=np.float32))


mlflow.models.set_model(OpenVinoEdgePyfunc())

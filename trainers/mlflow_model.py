"""The registered MLflow model: a pyfunc around a retrieval checkpoint (MLflow models-from-code).

`raytrieval.trainers.tracking.register_checkpoint` logs this file with the checkpoint directory as the
artifact "checkpoint" and the `retrieval` package as code, so the model loads with
`mlflow.pyfunc.load_model(uri)` anywhere torch and Pillow are installed. `predict` takes image
paths and returns their L2-normalised descriptors, preprocessed as the checkpoint's meta.json
says (longer side, scales, mean/std).
"""

from __future__ import annotations

from typing import Any

from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


class RetrievalModel(PythonModel):
    """Descriptors of images from a retrieval checkpoint."""

    def load_context(self, context: Any) -> None:
        from raytrieval.retrieval.checkpoint import read_meta
        from raytrieval.retrieval.source import load_model

        directory = context.artifacts["checkpoint"]
        self.meta = read_meta(directory)
        self.model = load_model(directory)

    def predict(self, context: Any, model_input: list[str], params: dict[str, Any] | None = None) -> list[list[float]]:
        """Image paths -> (N, D) descriptors as lists of floats."""
        from raytrieval.retrieval.extract import extract_descriptors

        desc = extract_descriptors(
            self.model, list(model_input), scales=tuple(self.meta["scales"]),
            max_size=int(self.meta["max_size"]), progress=False,
        )
        return desc.tolist()


set_model(RetrievalModel())

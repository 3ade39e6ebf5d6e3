"""The registered model, as MLflow "models from code": uint8 images N x H x W x 3 in, embeddings out.

MLflow runs this file when it loads the model; `selfsup` travels with the model as its code path,
so `mlflow.pyfunc.load_model("models:/NAME@champion").predict(images)` needs only MLflow and torch.
"""

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class EncoderModel(PythonModel):
    def load_context(self, context):
        from selfsup.models import load_encoder

        self.encoder, self.image_size = load_encoder(context.artifacts["encoder"])

    # No `context` argument: with it, MLflow 3's type-hint validation hands predict the wrong argument.
    def predict(self, model_input: np.ndarray, params=None) -> np.ndarray:
        from selfsup.eval.features import embed_images

        return embed_images(self.encoder, self.image_size, model_input)


mlflow.models.set_model(EncoderModel())

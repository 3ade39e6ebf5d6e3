"""The registered model, as MLflow "models from code": images in, float32 N x D embeddings out.

MLflow runs this file when it loads the model; `selfsup` travels with the model as its code path, and the
model's requirements (`selfsup.tracking.serving_requirements`) name what loading it imports.

`predict` takes what converts to uint8 RGB images without guessing (`as_images`), in process or as the
`inputs` of a POST to `mlflow models serve`'s /invocations:
- uint8 (or integer 0-255) N x H x W x 3, or one H x W x 3 image;
- floats in [0, 1] (as torchvision's `to_tensor` makes them), rounded to 0-255; floats beyond [0, 1]
  are refused rather than guessed at: scale them to [0, 1] or cast 0-255 values to uint8;
- gray N x H x W or N x H x W x 1 (one gray image: H x W), replicated to 3 channels;
- a list of images of different sizes (each one of the above).
Images of another size than the encoder's are resized, the shorter side to the encoder's, and center-cropped
(as `prepare` and `pipelines.embed` resize image files). Anything
else is refused with one line naming the expected dtype and shape.
"""

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

EXPECTED = (
    "uint8 (or 0-255 integer, or [0, 1] float) images N x H x W x 3, gray N x H x W or N x H x W x 1, "
    "one H x W x 3 image, or a list of images of any sizes"
)


class InputError(MlflowException):
    """An input `predict` cannot take, as one line. MLflow's scoring server prefixes an MlflowException's message
    with the whole input (`Failed to predict data '<the array>'`); this one keeps its own line."""

    def __init__(self, message: str):
        self._line = message
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._line

    @message.setter
    def message(self, value: str) -> None:
        pass  # keep the one line: see the class docstring


def _describe(value) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)} items"
    return type(value).__name__


def _refuse(value, image_size: list[int], why: str = "") -> InputError:
    size = f"{image_size[0]} x {image_size[1]}"
    return InputError(f"expected {EXPECTED} (resized to {size}); got {_describe(value)}{why}")


def _to_uint8(images: np.ndarray, original, image_size: list[int]) -> np.ndarray:
    """Values to uint8: integers must lie in 0-255, floats in [0, 1] (a float 0-255 image is refused: no guessing)."""
    if images.dtype == np.uint8:
        return images
    if images.size == 0:
        return images.astype(np.uint8)
    if images.dtype.kind in "iu":
        if images.min() < 0 or images.max() > 255:
            raise _refuse(original, image_size, f" with values {images.min()}..{images.max()}, not 0-255")
        return images.astype(np.uint8)
    if images.dtype.kind == "f":
        low, high = float(np.min(images)), float(np.max(images))
        if not (np.isfinite(low) and np.isfinite(high)):
            raise _refuse(original, image_size, " holding NaN or infinite values")
        if low < -1e-6 or high > 1 + 1e-6:
            raise _refuse(original, image_size, f" with values {low:g}..{high:g}: floats must lie in [0, 1]")
        return np.rint(np.clip(images, 0, 1) * 255).astype(np.uint8)
    raise _refuse(original, image_size)


def _batch(images: np.ndarray, original, image_size: list[int], single: bool = False) -> np.ndarray:
    """An array as uint8 N x H x W x 3 (`single`: it is one image)."""
    if images.dtype.kind not in "uif":  # bool, complex, strings, objects
        raise _refuse(original, image_size)
    if images.ndim == 2:  # one gray image
        images = images[None, ..., None]
    elif images.ndim == 3 and images.shape[-1] in (1, 3):  # one image
        images = images[None]
    elif images.ndim == 3 and not single:  # N gray images
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or 0 in images.shape[1:3]:
        raise _refuse(original, image_size)
    images = _to_uint8(images, original, image_size)
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def as_images(model_input, image_size: list[int]) -> np.ndarray:
    """What `predict` accepts (see the module's docstring) -> uint8 N x H x W x 3; a list of differently sized
    images comes back resized, each, to `image_size`. Anything else raises InputError."""
    from selfsup.data.sources import center_crop_resize_images

    if isinstance(model_input, np.ndarray) and model_input.dtype == object:  # e.g. nested lists
        model_input = model_input.tolist()
    if isinstance(model_input, (list, tuple)):
        try:
            images = np.asarray(model_input)
        except ValueError:  # differently sized images
            images = None
        if images is None or images.dtype == object:
            try:
                parts = [np.asarray(image) for image in model_input]
            except ValueError:
                raise _refuse(model_input, image_size, " (an item is not an image)") from None
            parts = [_batch(part, model_input, image_size, single=True) for part in parts]
            return np.concatenate([center_crop_resize_images(part, image_size[0]) for part in parts])
        return _batch(images, images, image_size)
    if not isinstance(model_input, np.ndarray):
        raise _refuse(model_input, image_size)  # a DataFrame, a dict, a string...
    return _batch(model_input, model_input, image_size)


class EncoderModel(PythonModel):
    def load_context(self, context):
        from selfsup.models import load_encoder

        self.encoder, self.image_size = load_encoder(context.artifacts["encoder"])

    # No `context` argument: with it, MLflow 3's type-hint validation hands predict the wrong argument. The hint
    # is for MLflow (one it validates nothing against): predict takes lists too, and checks them in as_images.
    def predict(self, model_input: np.ndarray, params=None) -> np.ndarray:
        from selfsup.eval.features import embed_images

        images = as_images(model_input, self.image_size)
        if len(images) == 0:
            return np.zeros((0, self.encoder.feature_dim), dtype=np.float32)
        return embed_images(self.encoder, self.image_size, images)


mlflow.models.set_model(EncoderModel())

"""Every method with every backbone, and every method under `train.compile`: one real training step each
(views made on the device, forward, backward, optimiser step, the method's hooks)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from selfsup.errors import ConfigError
from selfsup.methods import METHODS
from selfsup.methods.base import TrainingProgress
from selfsup.models import BACKBONE_BUILDERS, Encoder, load_encoder, save_encoder
from selfsup.params import load_params
from selfsup.train.loop import PretrainSpec, single_process_step
from tests.conftest import TEST_IMAGES, method_inputs
from tests.unit.methods.test_training import SMALL_KNOBS

CPU = torch.device("cpu")
IMAGE_SIZE = 16  # ViTs: patch 4 gives 16 tokens


def make_spec(
    method: str, backbone: str = "small_cnn", knobs: dict | None = None, views: dict | None = None, **train
) -> PretrainSpec:
    if backbone.startswith("vit") and "local_size" in METHODS[method].Knobs.model_fields:
        knobs = {"local_size": 0.5, **(knobs or {})}  # 8 px local crops: whole 4 px patches
    params = load_params(
        {
            "method": {"name": method, method: {**SMALL_KNOBS[method], **(knobs or {})}},
            "model": {"backbone": backbone},
            "views": views or {},
            "train": {"batch_size": 4, "epochs": 2, "warmup_epochs": 0, **train},
        }
    )
    return PretrainSpec(
        params.model, params.method, params.views, params.train, [0.5] * 3, [0.25] * 3, IMAGE_SIZE, num_classes=10
    )


def images(count: int = 4, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=torch.uint8, generator=generator)


def encoder_of(step) -> Encoder:
    return step.model.encoder


# Every method on one backbone of each kind (a plain CNN, a ResNet, a ViT), and every backbone under the method
# that reads feature maps (OBoW) and one that reads pooled features only: the pairs in which a method and a
# backbone meet, at a third of the whole product's time.
PAIRS = sorted(
    {(method, backbone) for method in METHODS for backbone in ("small_cnn", "resnet18", "vit_tiny")}
    | {(method, backbone) for method in ("simclr", "obow") for backbone in BACKBONE_BUILDERS}
)


@pytest.mark.parametrize(("method", "backbone"), PAIRS)
def test_every_method_trains_a_step_with_every_kind_of_backbone(method: str, backbone: str) -> None:
    step = single_process_step(make_spec(method, backbone), CPU, TEST_IMAGES)
    before = [p.detach().clone() for p in encoder_of(step).parameters()]
    loss, embeddings = step(
        images(), torch.Generator().manual_seed(1), TrainingProgress(0, 2, 1), **method_inputs(method, 4)
    )
    assert torch.isfinite(loss)
    assert embeddings.shape[0] == 4 and torch.isfinite(embeddings).all()
    moved = [not torch.equal(b, p) for b, p in zip(before, encoder_of(step).parameters())]
    assert sum(moved) > len(moved) // 2, f"{sum(moved)} of {len(moved)} encoder tensors changed"


@pytest.mark.parametrize("method", ["swav", "dino"])
def test_local_crops_a_vit_patch_does_not_divide_are_refused_with_the_size_that_fits(method: str) -> None:
    with pytest.raises(ConfigError, match=rf"method.{method}.local_size=0.5625 makes 9 px local crops.*0.5 \(8 px\)"):
        make_spec(method, "vit_tiny", knobs={"local_size": 0.5625})


def test_images_a_vit_patch_does_not_divide_are_refused_before_any_compute() -> None:
    params = load_params({"model": {"backbone": "vit_tiny"}})
    with pytest.raises(ConfigError, match="model.patch_size=4 does not divide the 18 px views.*data.image_size"):
        PretrainSpec(params.model, params.method, params.views, params.train, [0.5] * 3, [0.25] * 3, 18)


@pytest.mark.parametrize(("method", "backbone"), [(m, "small_cnn") for m in METHODS] + [("dino", "vit_tiny")])
def test_every_method_trains_on_views_smaller_than_the_stored_images(method: str, backbone: str, tmp_path) -> None:
    """views.size: the crops of 16 px stored images come out at 8 px (local crops scaled to that), what heads sized
    to the image (inpainting's, colorization's) and a ViT's positional embedding are built for; the saved encoder
    then reads the stored 16 px images, as the evaluations and the registered model do."""
    spec = make_spec(method, backbone, views={"size": 8})
    step = single_process_step(spec, CPU, TEST_IMAGES)
    sizes = {view.size for view in step.views}
    assert max(sizes) == 8 and (method != "dino" or sizes == {8, 4})  # DINO's local crops: 0.5 of the views' side
    loss, _ = step(images(), torch.Generator().manual_seed(1), TrainingProgress(0, 2, 1), **method_inputs(method, 4))
    assert torch.isfinite(loss)
    encoder = encoder_of(step).eval()
    save_encoder(encoder, tmp_path / "encoder.pt", [IMAGE_SIZE, IMAGE_SIZE])
    loaded, stored = load_encoder(tmp_path / "encoder.pt")
    assert stored == [IMAGE_SIZE, IMAGE_SIZE]
    stored_images = images().permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        torch.testing.assert_close(loaded(stored_images), encoder(stored_images))


def test_views_larger_than_the_stored_images_are_refused_before_any_compute() -> None:
    """params.yaml refuses views.size above data.image_size (tests/unit/test_params.py); images prepared at their
    native size (data.image_size: null) are checked against the views when pretraining starts."""
    params = load_params({"data": {"image_size": None}, "views": {"size": 24}})
    with pytest.raises(ConfigError, match=r"views.size=24 is larger than the 16 px images stored.*at most 16"):
        PretrainSpec(params.model, params.method, params.views, params.train, [0.5] * 3, [0.25] * 3, IMAGE_SIZE)


@pytest.mark.parametrize("method", list(METHODS))
def test_compiled_step_equals_the_eager_one_for_every_method(method: str, monkeypatch) -> None:
    """`train.compile` compiles every Encoder (the student's and any EMA teacher's) in place. AOT-eager runs
    Dynamo's capture and AOTAutograd's joint graph, what a method can break (graph breaks, guards on the
    teacher's copy, no-grad forwards, local crops' second shape), without Inductor's minutes of C++ builds
    on CPU; Inductor itself is run by test_inductor_compiles_the_encoder below."""
    compiled_calls = []
    original = torch.nn.Module.compile

    def aot_eager(module, **kwargs):
        compiled_calls.append(module)
        original(module, backend="aot_eager", **kwargs)

    torch._dynamo.reset()
    eager = single_process_step(make_spec(method), CPU, TEST_IMAGES)
    monkeypatch.setattr(torch.nn.Module, "compile", aot_eager)
    compiled = single_process_step(make_spec(method, compile=True), CPU, TEST_IMAGES)
    has_teacher = hasattr(compiled.model, "teacher")
    assert len(compiled_calls) == (2 if has_teacher else 1)  # the student's encoder, and the teacher's
    for i in range(2):  # the second step runs the hooks' updates (EMA, queue, centre) through compiled code
        progress = TrainingProgress(i, 2, 1)
        inputs = method_inputs(method, 4)
        torch.manual_seed(i)  # the pretext tasks' own draws (permutations, tiles, locations): the same for both
        eager_loss, _ = eager(images(seed=i), torch.Generator().manual_seed(i), progress, **inputs)
        torch.manual_seed(i)
        compiled_loss, _ = compiled(images(seed=i), torch.Generator().manual_seed(i), progress, **inputs)
        torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=1e-5)
    for a, b in zip(eager.model.state_dict().values(), compiled.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # Inductor builds C++ kernels: about 30 s on 2 cores
def test_inductor_compiles_the_encoder_and_trains_as_eager() -> None:
    eager = single_process_step(make_spec("simclr"), CPU, TEST_IMAGES)
    compiled = single_process_step(make_spec("simclr", compile=True), CPU, TEST_IMAGES)
    assert encoder_of(compiled)._compiled_call_impl is not None
    for i in range(2):
        progress = TrainingProgress(i, 2, 1)
        eager_loss, _ = eager(images(seed=i), torch.Generator().manual_seed(i), progress)
        compiled_loss, _ = compiled(images(seed=i), torch.Generator().manual_seed(i), progress)
        torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=1e-5)


class _LowPrecisionOps(TorchDispatchMode):
    """Records the ops that must see float32 (exponentials, softmaxes) whenever one gets a bfloat16 input."""

    FLOAT32_ONLY = ("exp", "_softmax", "_log_softmax", "logsumexp")

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if name in self.FLOAT32_ONLY and any(t.dtype == torch.bfloat16 for t in tensors):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", list(METHODS))
def test_under_bf16_autocast_losses_softmaxes_and_sinkhorn_run_in_float32(method: str) -> None:
    """What `train.precision: bf16` runs on CUDA, here with CPU autocast (the same code paths): the heads in
    bfloat16, every exponential and softmax of the loss (temperature-scaled logits, Sinkhorn) in float32."""
    step = single_process_step(make_spec(method), CPU, TEST_IMAGES)
    views = [torch.rand(4, 3, spec.size or IMAGE_SIZE, spec.size or IMAGE_SIZE) for spec in step.views]
    torch.manual_seed(0)  # the pretext tasks' own draws: the same in both passes
    fp32_loss, _ = step.model(views, **method_inputs(method, 4))
    recorder = _LowPrecisionOps()
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16), recorder:
        bf16_loss, embeddings = step.model(views, **method_inputs(method, 4))
    assert recorder.seen == [], f"{method} ran {sorted(set(recorder.seen))} on bfloat16"
    assert bf16_loss.dtype == torch.float32 and torch.isfinite(bf16_loss)
    assert bf16_loss.item() == pytest.approx(fp32_loss.item(), rel=0.05, abs=0.02)

"""Each method's loss against its paper's formula, written out independently here (float64, explicit loops), with
gradients; then the mechanisms around the losses: EMA teachers, MoCo's queue, SwAV's frozen unit prototypes,
DINO's frozen last layer, centre and temperature warm-up, SimSiam's stop-gradient and fixed-LR predictor, and
a forward/backward of every method on the views it declares.

SimCLR's NT-Xent is checked in tests/unit/methods/test_losses.py and not repeated here.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import selfsup.methods.dino as dino_module
from selfsup.data.views import make_views
from selfsup.methods import METHODS, TrainingProgress, build_method, method_views
from selfsup.methods.barlow_twins import barlow_twins_loss
from selfsup.methods.byol import normalized_mse
from selfsup.methods.dino import dino_loss
from selfsup.methods.moco import info_nce_loss
from selfsup.methods.swav import sinkhorn, swapped_prediction_loss
from selfsup.models.ema import EMATeacher, cosine_momentum
from selfsup.params import load_params
from tests.conftest import TEST_IMAGES, method_inputs

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add overhead


# Heads a few units wide: every test here runs in well under a second.
SMALL_KNOBS = {
    "simclr": {"projection_hidden_dim": 16, "projection_dim": 8},
    "moco": {"projection_hidden_dim": 16, "projection_dim": 8, "queue_size": 16},
    "byol": {"projection_hidden_dim": 16, "projection_dim": 8, "prediction_hidden_dim": 16},
    "simsiam": {"projection_hidden_dim": 16, "projection_dim": 8, "prediction_hidden_dim": 4},
    "swav": {"projection_hidden_dim": 16, "projection_dim": 8, "prototypes": 6, "local_crops": 2},
    "barlow_twins": {"projection_hidden_dim": 16, "projection_dim": 8},
    "dino": {"projection_hidden_dim": 16, "bottleneck_dim": 8, "output_dim": 12, "local_crops": 2},
    "obow": {"words": 12, "local_crops": 2},
    "rotation": {"head_hidden_dim": 16},
    "jigsaw": {"permutations": 10, "tile_dim": 8, "head_hidden_dim": 16},
    "relative_location": {"head_hidden_dim": 16},
    "inpainting": {"decoder_hidden_dim": 16},
    "colorization": {"head_hidden_dim": 16},
    "counting": {"count_dim": 8, "head_hidden_dim": 16},
    "exemplar": {"embedding_dim": 8},
    "supervised": {},
}
EMBEDDING_DIM = {
    name: knobs.get("projection_dim", knobs.get("bottleneck_dim", knobs.get("embedding_dim")))
    for name, knobs in SMALL_KNOBS.items()
}
# The pretext tasks and the supervised reference watch the encoder's features (TinyEncoder.feature_dim).
EMBEDDING_DIM.update(
    {name: 8 for name in ("obow", "rotation", "jigsaw", "relative_location", "inpainting", "colorization")},
    counting=8,
    supervised=8,
)
IMAGE_SIZE = 16


class TinyEncoder(nn.Module):
    """Conv + BatchNorm + ReLU + global average pool: any image side in, feature_dim out."""

    feature_dim = 8
    image_size = 16  # the side pretext heads size their outputs by (the Encoder's attribute)

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.full((1, 3, 1, 1), 0.5))  # the fill of masked pixels (Encoder's too)
        self.net = nn.Sequential(
            nn.Conv2d(3, self.feature_dim, 3, padding=1, bias=False),
            nn.BatchNorm2d(self.feature_dim),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[:-2](x)  # before the pooling, as the Encoder's


def build(name: str, seed: int = 0, **knobs) -> nn.Module:
    torch.manual_seed(seed)  # the heads' and the encoder's initial weights
    params = load_params({"method": {"name": name, name: {**SMALL_KNOBS[name], **knobs}}})
    return build_method(TinyEncoder(), params.method, num_classes=10, num_images=TEST_IMAGES)


def random_views(count: int, n: int = 4, side: int = 8, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(n, 3, side, side, generator=generator) for _ in range(count)]


def declared_views(name: str, n: int = 4, seed: int = 0, **knobs) -> list[torch.Tensor]:
    """The views the method declares, made by the library's augmentations from random uint8 images."""
    params = load_params({"method": {"name": name, name: {**SMALL_KNOBS[name], **knobs}}})
    specs = method_views(params.method, params.views, IMAGE_SIZE)
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=torch.uint8, generator=generator)
    return make_views(images, specs, generator)


def grads(loss: torch.Tensor, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss, inputs)


def assert_same_value_and_gradients(library, formula, inputs: list[torch.Tensor], **tolerance) -> None:
    """library() and formula() on the same leaves: equal values and equal gradients w.r.t. every leaf."""
    ours, theirs = library(), formula()
    torch.testing.assert_close(ours, theirs, **tolerance)
    for mine, reference in zip(grads(ours, inputs), grads(theirs, inputs)):
        torch.testing.assert_close(mine, reference, **tolerance)


def randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).requires_grad_()


# --------------------------------------------------------------------------------------------------- MoCo


def formula_info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """-log(exp(q.k+/T) / (exp(q.k+/T) + sum over the queue of exp(q.k-/T))), q and k normalised, one query
    at a time (MoCo, He et al. 2020, eq. 1), averaged over the queries."""
    terms = []
    for i in range(len(q)):
        qi, ki = q[i] / q[i].norm(), k[i] / k[i].norm()
        positive = torch.exp((qi * ki).sum() / temperature)
        negatives = sum(torch.exp((qi * negative).sum() / temperature) for negative in queue)
        terms.append(-torch.log(positive / (positive + negatives)))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("temperature", [0.05, 0.1, 0.2, 1.0])
def test_info_nce_matches_formula_values_and_gradients(temperature: float) -> None:
    q, k = randn(5, 4, seed=1, scale=3.0), randn(5, 4, seed=2) + 0.5  # unnormalised: the loss normalises
    queue = F.normalize(randn(7, 4, seed=3).detach(), dim=1)  # the queue holds unit keys
    assert_same_value_and_gradients(
        lambda: info_nce_loss(q, k, queue, temperature),
        lambda: formula_info_nce(q, k, queue, temperature),
        [q, k],
    )


def test_info_nce_temperature_changes_the_loss() -> None:
    # Guards the test above against a temperature that is ignored: two temperatures, two values.
    q, k, queue = randn(5, 4, seed=1), randn(5, 4, seed=2), F.normalize(randn(7, 4, seed=3).detach(), dim=1)
    assert info_nce_loss(q, k, queue, 0.1).item() != pytest.approx(info_nce_loss(q, k, queue, 0.5).item())


def queue_oldest_first(moco: nn.Module) -> torch.Tensor:
    """The queue read from queue_end (the next slot to overwrite, so the oldest key) around to the newest."""
    end = int(moco.queue_end)
    return torch.cat([moco.queue[end:], moco.queue[:end]])


def test_moco_queue_is_first_in_first_out_with_wrap_around_and_overflow() -> None:
    moco = build("moco", queue_size=5, projection_dim=3)
    size = 5
    history = list(moco.queue.clone())  # what has been queued, oldest first: the random initial keys at first
    assert int(moco.queue_end) == 0
    next_key = 0

    def keys(count: int) -> torch.Tensor:
        nonlocal next_key
        batch = torch.arange(next_key, next_key + count, dtype=torch.float32)[:, None].repeat(1, 3) + 100
        next_key += count
        return batch

    # (keys per call, slots they must land in, queue_end after): 2, 2, a wrap-around, exactly the queue's size,
    # and more keys than it holds (only the newest `size` survive, the oldest of them at queue_end).
    calls = [(2, [0, 1], 2), (2, [2, 3], 4), (3, [4, 0, 1], 2), (5, [2, 3, 4, 0, 1], 2), (7, [2, 3, 4, 0, 1], 2)]
    for count, slots, end in calls:
        batch = keys(count)
        moco.enqueue(batch)
        history += list(batch)
        assert int(moco.queue_end) == end
        torch.testing.assert_close(moco.queue[slots], batch[-size:], rtol=0, atol=0)
        # FIFO: the queue holds exactly the `size` newest keys, and queue_end points at the oldest of them.
        torch.testing.assert_close(queue_oldest_first(moco), torch.stack(history[-size:]), rtol=0, atol=0)


def test_moco_after_step_queues_the_teachers_normalised_keys_of_view2_then_view1() -> None:
    moco = build("moco", queue_size=16)
    x1, x2 = random_views(2, n=3)
    with torch.no_grad():
        expected = F.normalize(torch.cat([moco.teacher.module(x2), moco.teacher.module(x1)]), dim=1)
    loss, _ = moco([x1, x2])
    loss.backward()
    moco.after_step(TrainingProgress(step=0, total_steps=10, steps_per_epoch=5))
    assert int(moco.queue_end) == 6
    torch.testing.assert_close(moco.queue[:6], expected)


# --------------------------------------------------------------------------------------------------- BYOL


def formula_normalized_mse(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """mean over the batch of ||p/|p| - z/|z|||^2, element by element (BYOL, Grill et al. 2020, eq. 2)."""
    total = 0
    for pi, zi in zip(p, z):
        total = total + ((pi / pi.norm() - zi / zi.norm()) ** 2).sum()
    return total / len(p)


def test_normalized_mse_matches_formula_values_and_gradients() -> None:
    p, z = randn(6, 5, seed=4, scale=2.0), randn(6, 5, seed=5) - 0.3
    assert_same_value_and_gradients(lambda: normalized_mse(p, z), lambda: formula_normalized_mse(p, z), [p, z])


def test_byol_loss_is_the_symmetric_sum_over_its_submodules() -> None:
    byol = build("byol")
    with torch.no_grad():  # a target that differs from the online net, so that pairing the wrong views shows
        for parameter in byol.teacher.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    x1, x2 = random_views(2)
    online = [p for p in byol.parameters() if p.requires_grad]

    def by_hand(swapped: bool = False) -> torch.Tensor:
        p1, p2 = (byol.predictor(byol.projector(byol.encoder(x))) for x in (x1, x2))
        with torch.no_grad():
            t1, t2 = byol.teacher.module(x1), byol.teacher.module(x2)
        if swapped:
            t1, t2 = t2, t1
        # Each view's prediction regresses the target's projection of the *other* view.
        return formula_normalized_mse(p1, t2) + formula_normalized_mse(p2, t1)

    loss, embeddings = byol([x1, x2])
    reference = by_hand()
    torch.testing.assert_close(loss, reference)
    for mine, theirs in zip(grads(loss, online), grads(reference, online)):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)
    assert loss.item() != pytest.approx(by_hand(swapped=True).item(), rel=1e-3)
    assert embeddings.shape == (4, SMALL_KNOBS["byol"]["projection_dim"]) and not embeddings.requires_grad


# ------------------------------------------------------------------------------------------------ SimSiam


def formula_negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """D(p, z) = -mean over the batch of p.z / (|p| |z|)."""
    return -sum((pi * zi).sum() / (pi.norm() * zi.norm()) for pi, zi in zip(p, z)) / len(p)


def simsiam_gradients_at_projector_output(stop_gradient: bool):
    """The module's loss, and the gradient reaching each view's projector output z, captured by a hook."""
    simsiam = build("simsiam", stop_gradient=stop_gradient)
    outputs: list[torch.Tensor] = []

    def keep(module, inputs, output):
        output.retain_grad()
        outputs.append(output)

    simsiam.projector.register_forward_hook(keep)
    loss, _ = simsiam(random_views(2))
    loss.backward()
    z1, z2 = outputs
    return simsiam, loss, z1, z2


def simsiam_by_hand(simsiam: nn.Module, z1: torch.Tensor, z2: torch.Tensor, detach: bool):
    """1/2 D(p1, sg(z2)) + 1/2 D(p2, sg(z1)) from the captured z, and its gradient w.r.t. each z."""
    a, b = z1.detach().requires_grad_(), z2.detach().requires_grad_()
    p1, p2 = simsiam.predictor(a), simsiam.predictor(b)
    t1, t2 = (a.detach(), b.detach()) if detach else (a, b)
    loss = formula_negative_cosine(p1, t2) / 2 + formula_negative_cosine(p2, t1) / 2
    return loss, grads(loss, [a, b])


def test_simsiam_loss_is_half_sum_of_negative_cosines_with_stop_gradient() -> None:
    simsiam, loss, z1, z2 = simsiam_gradients_at_projector_output(stop_gradient=True)
    reference, (g1, g2) = simsiam_by_hand(simsiam, z1, z2, detach=True)
    torch.testing.assert_close(loss, reference)
    # z gets gradient only through its own predictor branch: the branch where it is the target gives none.
    torch.testing.assert_close(z1.grad, g1, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(z2.grad, g2, rtol=1e-4, atol=1e-7)
    _, (through_target, _) = simsiam_by_hand(simsiam, z1, z2, detach=False)
    assert not torch.allclose(z1.grad, through_target, rtol=1e-3, atol=1e-6)  # the check above can fail


def test_simsiam_without_stop_gradient_lets_the_target_branch_have_gradient() -> None:
    simsiam, loss, z1, z2 = simsiam_gradients_at_projector_output(stop_gradient=False)
    reference, (g1, g2) = simsiam_by_hand(simsiam, z1, z2, detach=False)
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(z1.grad, g1, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(z2.grad, g2, rtol=1e-4, atol=1e-7)


def test_simsiam_fixed_lr_parameters_are_the_predictors_only_when_asked() -> None:
    fixed = build("simsiam", fixed_predictor_lr=True)
    assert [id(p) for p in fixed.fixed_lr_parameters()] == [id(p) for p in fixed.predictor.parameters()]
    assert list(build("simsiam", fixed_predictor_lr=False).fixed_lr_parameters()) == []


# --------------------------------------------------------------------------------------------------- SwAV


def naive_sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """The official SwAV loop (main_swav.py, distributed_sinkhorn) on one process, in Python floats:
    Q = exp(S/eps)^T (K x B); Q /= sum Q; repeat: each prototype row /= its sum, /= K; each image column
    /= its sum, /= B; finally Q *= B and transpose back to B x K."""
    s = scores.tolist()
    b, k = len(s), len(s[0])
    q = [[math.exp(s[i][j] / epsilon) for i in range(b)] for j in range(k)]
    total = sum(map(sum, q))
    q = [[x / total for x in row] for row in q]
    for _ in range(iterations):
        for j in range(k):
            row_sum = sum(q[j])
            q[j] = [x / row_sum / k for x in q[j]]
        for i in range(b):
            column_sum = sum(q[j][i] for j in range(k))
            for j in range(k):
                q[j][i] = q[j][i] / column_sum / b
    return torch.tensor([[q[j][i] * b for j in range(k)] for i in range(b)], dtype=torch.float32)


def prototype_scores(b: int, k: int, seed: int) -> torch.Tensor:
    """Cosines of unit embeddings with unit prototypes, as SwAV's scores are."""
    generator = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(b, 6, generator=generator), dim=1)
    prototypes = F.normalize(torch.randn(k, 6, generator=generator), dim=1)
    return z @ prototypes.T


@pytest.mark.parametrize("b, k", [(8, 4), (6, 9)])
def test_sinkhorn_codes_have_the_equipartition_marginals(b: int, k: int) -> None:
    # epsilon 0.1: 50 iterations converge to 1e-5 there (at 0.05 they leave ~1% on these scores).
    codes = sinkhorn(prototype_scores(b, k, seed=b), epsilon=0.1, iterations=50)
    assert codes.shape == (b, k) and (codes >= 0).all()
    torch.testing.assert_close(codes.sum(1), torch.ones(b), rtol=0, atol=1e-5)  # each image: a distribution
    torch.testing.assert_close(codes.sum(0), torch.full((k,), b / k), rtol=0, atol=1e-4)  # prototypes equally used


@pytest.mark.parametrize("epsilon", [0.05, 0.3])
def test_sinkhorn_three_iterations_match_the_official_loop(epsilon: float) -> None:
    scores = prototype_scores(5, 7, seed=11)
    torch.testing.assert_close(sinkhorn(scores, epsilon, 3), naive_sinkhorn(scores, epsilon, 3), rtol=1e-5, atol=1e-7)


def test_sinkhorn_codes_carry_no_gradient() -> None:
    scores = prototype_scores(4, 3, seed=2).requires_grad_()
    codes = sinkhorn(scores, 0.05, 3)
    assert not codes.requires_grad and codes.grad_fn is None


def formula_swapped_prediction(scores: list[torch.Tensor], codes: list[torch.Tensor], temperature: float):
    """mean over assignment crops a of [1/(V-1) sum over v != a of mean over images of
    -sum_k q_a,k log softmax(s_v / tau)_k] (SwAV, Caron et al. 2020, eq. 1 with multi-crop)."""
    per_assignment = []
    for a, q in enumerate(codes):
        others = []
        for v, s in enumerate(scores):
            if v == a:
                continue
            images = []
            for qi, si in zip(q, s):
                log_softmax = si / temperature - torch.log(torch.exp(si / temperature).sum())
                images.append(-(qi * log_softmax).sum())
            others.append(sum(images) / len(images))
        per_assignment.append(sum(others) / (len(scores) - 1))
    return sum(per_assignment) / len(codes)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
@pytest.mark.parametrize("views", [2, 4])  # two global crops, and two global + two local
def test_swapped_prediction_loss_matches_formula_values_and_gradients(temperature: float, views: int) -> None:
    scores = [randn(3, 5, seed=20 + v) for v in range(views)]
    codes = [F.softmax(randn(3, 5, seed=30 + a).detach(), dim=1) for a in range(2)]  # constants, rows sum to 1
    assert_same_value_and_gradients(
        lambda: swapped_prediction_loss(scores, codes, temperature),
        lambda: formula_swapped_prediction(scores, codes, temperature),
        scores,
    )


def train_steps(method: nn.Module, steps: int, steps_per_epoch: int, on_step) -> None:
    """The loop's order: zero_grad, backward, after_backward, step, after_step; SGD with momentum and decay."""
    optimizer = torch.optim.SGD(
        [p for p in method.parameters() if p.requires_grad], lr=0.5, momentum=0.9, weight_decay=0.1
    )
    views = random_views(2)
    for step in range(steps):
        progress = TrainingProgress(step=step, total_steps=steps, steps_per_epoch=steps_per_epoch)
        optimizer.zero_grad(set_to_none=True)
        loss, _ = method(views)
        loss.backward()
        method.after_backward(progress)
        optimizer.step()
        method.after_step(progress)
        on_step(progress)


def test_swav_prototypes_stay_unit_norm_and_still_while_frozen() -> None:
    swav = build("swav", freeze_prototypes_epochs=1, local_crops=0)
    initial = swav.prototypes.weight.detach().clone()
    torch.testing.assert_close(initial.norm(dim=1), torch.ones(len(initial)))
    projector_before = swav.projector[0].weight.detach().clone()

    def check(progress: TrainingProgress) -> None:
        weight = swav.prototypes.weight.detach()
        torch.testing.assert_close(weight.norm(dim=1), torch.ones(len(weight)))  # unit rows after every step
        if progress.epoch < 1:  # frozen: no gradient, so no momentum and no weight decay either
            torch.testing.assert_close(weight, initial)
            assert not torch.allclose(swav.projector[0].weight, projector_before)  # the rest does train
        else:
            assert (weight - initial).abs().max() > 1e-3

    train_steps(swav, steps=4, steps_per_epoch=2, on_step=check)  # steps 0 and 1 in epoch 0, then 2 and 3


# ------------------------------------------------------------------------------------------- Barlow Twins


def formula_barlow_twins(z1: torch.Tensor, z2: torch.Tensor, lambda_offdiagonal: float) -> torch.Tensor:
    """sum_i (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2, C_ij = sum_b a_bi c_bj / N, with a and c each dimension
    standardised over the batch (biased variance, eps 1e-5) (Barlow Twins, Zbontar et al. 2021, eq. 1-2)."""
    n, d = z1.shape

    def standardise(z: torch.Tensor) -> list[list[torch.Tensor]]:
        columns = []
        for j in range(d):
            column = z[:, j]
            mean = sum(column) / n
            variance = sum((x - mean) ** 2 for x in column) / n
            columns.append([(x - mean) / torch.sqrt(variance + 1e-5) for x in column])
        return columns

    a, c = standardise(z1), standardise(z2)
    loss = 0
    for i in range(d):
        for j in range(d):
            correlation = sum(a[i][b] * c[j][b] for b in range(n)) / n
            loss = loss + ((1 - correlation) ** 2 if i == j else lambda_offdiagonal * correlation**2)
    return loss


@pytest.mark.parametrize("lambda_offdiagonal", [0.0, 0.0051, 0.7])
def test_barlow_twins_loss_matches_formula_values_and_gradients(lambda_offdiagonal: float) -> None:
    z1, z2 = randn(6, 4, seed=40, scale=2.0), randn(6, 4, seed=41) + 1.0
    with torch.no_grad():
        z2[:, 1] += z1[:, 1]  # some real correlation, so the diagonal terms are not all near 1
    assert_same_value_and_gradients(
        lambda: barlow_twins_loss(z1, z2, lambda_offdiagonal),
        lambda: formula_barlow_twins(z1, z2, lambda_offdiagonal),
        [z1, z2],
    )


def test_barlow_twins_loss_passes_gradcheck() -> None:
    z1, z2 = randn(5, 3, seed=42), randn(5, 3, seed=43)
    assert torch.autograd.gradcheck(lambda a, b: barlow_twins_loss(a, b, 0.3), (z1, z2))


# --------------------------------------------------------------------------------------------------- DINO


def formula_dino(student, teacher, center, student_t: float, teacher_t: float) -> torch.Tensor:
    """mean over pairs (teacher global crop i, student crop v, v != i) of the batch mean of
    -sum_k P_t(i)_k log P_s(v)_k, P_t = softmax((g_t - c)/tau_t), P_s = softmax(g_s/tau_s) (DINO, Caron et al. 2021)."""
    pairs = []
    for i, t in enumerate(teacher):
        for v, s in enumerate(student):
            if v == i:
                continue
            images = []
            for ti, si in zip(t, s):
                sharpened = torch.exp((ti - center[0]) / teacher_t)
                target = sharpened / sharpened.sum()
                log_p = si / student_t - torch.log(torch.exp(si / student_t).sum())
                images.append(-(target * log_p).sum())
            pairs.append(sum(images) / len(images))
    return sum(pairs) / len(pairs)


@pytest.mark.parametrize("student_t, teacher_t", [(0.1, 0.04), (0.1, 0.07), (0.5, 0.2)])
@pytest.mark.parametrize("crops", [2, 4])  # global crops only, and with two local crops
def test_dino_loss_matches_formula_values_and_gradients(student_t: float, teacher_t: float, crops: int) -> None:
    student = [randn(3, 6, seed=50 + v) for v in range(crops)]
    teacher = [randn(3, 6, seed=60 + i).detach() for i in range(2)]  # the teacher sees the global crops only
    center = randn(1, 6, seed=70, scale=0.3).detach()
    assert_same_value_and_gradients(
        lambda: dino_loss(student, teacher, center, student_t, teacher_t),
        lambda: formula_dino(student, teacher, center, student_t, teacher_t),
        student,
    )


def test_dino_center_moves_by_exactly_its_momentum() -> None:
    dino = build("dino", center_momentum=0.8)
    c0 = torch.linspace(-1, 1, 12)[None]
    dino.center.copy_(c0)
    teacher_outputs = torch.randn(10, 12, generator=torch.Generator().manual_seed(80))
    dino.update_center(teacher_outputs.sum(0, keepdim=True), len(teacher_outputs))
    torch.testing.assert_close(dino.center, 0.8 * c0 + 0.2 * teacher_outputs.mean(0, keepdim=True))


def test_dino_after_step_centres_on_the_mean_teacher_output_of_both_global_crops() -> None:
    dino = build("dino", center_momentum=0.9, local_crops=0)
    dino.center.fill_(0.5)
    views = random_views(2, n=3)
    with torch.no_grad():
        mean = dino.teacher.module(torch.cat(views)).mean(0, keepdim=True)
    loss, _ = dino(views)
    loss.backward()
    dino.after_step(TrainingProgress(step=0, total_steps=4, steps_per_epoch=2))
    torch.testing.assert_close(dino.center, 0.9 * 0.5 + 0.1 * mean)
    assert float(dino.epochs_done) == 0.5  # one step of two done


def test_dino_teacher_temperature_warms_up_linearly_then_stays() -> None:
    dino = build("dino", warmup_teacher_temperature=0.04, teacher_temperature=0.07, warmup_teacher_temperature_epochs=4)
    for epoch in [0, 0.5, 1, 2, 3, 3.9]:
        assert dino.teacher_temperature(epoch) == pytest.approx(0.04 + 0.03 * epoch / 4)
    for epoch in [4, 5, 100]:
        assert dino.teacher_temperature(epoch) == pytest.approx(0.07)
    no_warmup = build("dino", teacher_temperature=0.07, warmup_teacher_temperature_epochs=0)
    assert no_warmup.teacher_temperature(0) == pytest.approx(0.07)


def test_dino_forward_uses_the_warm_up_temperature_of_the_epochs_done(monkeypatch) -> None:
    dino = build("dino", warmup_teacher_temperature=0.04, teacher_temperature=0.07, warmup_teacher_temperature_epochs=4)
    used = []

    def recording(student, teacher, center, student_t, teacher_t):
        used.append((student_t, teacher_t))
        return dino_loss(student, teacher, center, student_t, teacher_t)

    monkeypatch.setattr(dino_module, "dino_loss", recording)
    dino.epochs_done.fill_(2)
    dino(random_views(2))
    assert used == [(0.1, pytest.approx(0.055))]


def test_dino_last_layer_is_still_during_the_freeze_then_trains() -> None:
    dino = build("dino", freeze_last_layer_epochs=1, local_crops=0)
    initial = dino.head.last_layer.weight.detach().clone()
    mlp_before = dino.head.mlp[0].weight.detach().clone()

    def check(progress: TrainingProgress) -> None:
        if progress.epoch < 1:
            assert torch.equal(dino.head.last_layer.weight, initial)  # nothing renormalises it: bit for bit
            assert not torch.allclose(dino.head.mlp[0].weight, mlp_before)
        else:
            assert not torch.allclose(dino.head.last_layer.weight, initial)

    train_steps(dino, steps=4, steps_per_epoch=2, on_step=check)


# ---------------------------------------------------------------------------------------------------- EMA


def test_cosine_momentum_runs_from_base_to_one() -> None:
    assert cosine_momentum(0.99, 0.0) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 1.0) == 1.0
    assert cosine_momentum(0.99, 0.5) == pytest.approx(0.995)  # halfway in cosine is halfway in value
    assert cosine_momentum(0.9, 0.25) == pytest.approx(1 - 0.1 * (math.cos(math.pi / 4) + 1) / 2)
    assert cosine_momentum(0.9, 1.5) == 1.0  # past the end it stays at 1


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9, 0.996, 1.0])
def test_ema_teacher_update_is_exactly_m_teacher_plus_one_minus_m_student(momentum: float) -> None:
    torch.manual_seed(0)
    encoder, head = TinyEncoder(), nn.Linear(8, 3)
    teacher = EMATeacher(encoder, head)
    with torch.no_grad():  # a student that moved away from the teacher's copy
        for p in [*encoder.parameters(), *head.parameters()]:
            p.add_(torch.randn_like(p))
    before = {name: p.clone() for name, p in teacher.module.named_parameters()}
    buffers = {name: b.clone() for name, b in teacher.module.named_buffers()}
    teacher.update(encoder, head, momentum=momentum)
    students = {f"0.{n}": p for n, p in encoder.named_parameters()} | {f"1.{n}": p for n, p in head.named_parameters()}
    assert students.keys() == before.keys()
    for name, p in teacher.module.named_parameters():
        torch.testing.assert_close(p, momentum * before[name] + (1 - momentum) * students[name])
        assert not p.requires_grad
    for name, b in teacher.module.named_buffers():  # BatchNorm running statistics are the teacher's own
        assert torch.equal(b, buffers[name])


def test_ema_teacher_is_a_copy_not_a_reference() -> None:
    encoder = TinyEncoder()
    teacher = EMATeacher(encoder)
    with torch.no_grad():
        encoder.net[0].weight.add_(1.0)
    assert not torch.allclose(teacher.module[0].net[0].weight, encoder.net[0].weight)


@pytest.mark.parametrize("name", ["byol", "moco", "dino"])
def test_teacher_gets_no_gradient_and_follows_the_student_by_ema(name: str) -> None:
    method = build(name)
    views = declared_views(name)
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    loss, _ = method(views)
    loss.backward()
    for p in method.teacher.parameters():
        assert not p.requires_grad and p.grad is None
    assert method.encoder.net[0].weight.grad is not None  # the student does get one
    optimizer.step()

    teacher_before = {n: p.clone() for n, p in method.teacher.module.named_parameters()}
    student_modules = [method.encoder, method.head if name == "dino" else method.projector]
    students = {f"{i}.{n}": p for i, module in enumerate(student_modules) for n, p in module.named_parameters()}
    progress = TrainingProgress(step=0, total_steps=4, steps_per_epoch=2)
    method.after_step(progress)
    # MoCo's momentum is constant (its CIFAR demo); BYOL's and DINO's rise on a cosine, step 1 of 4 a quarter along.
    m = method.knobs.momentum if name == "moco" else cosine_momentum(method.knobs.momentum, progress.fraction)
    for n, p in method.teacher.module.named_parameters():
        torch.testing.assert_close(p, m * teacher_before[n] + (1 - m) * students[n])


# ---------------------------------------------------------------------------------------- every method


def test_small_knobs_cover_every_method() -> None:
    assert SMALL_KNOBS.keys() == METHODS.keys()


@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_runs_forward_and_backward_on_its_declared_views(name: str) -> None:
    method = build(name)
    views = declared_views(name, n=4)
    # each transforms a single view itself
    one_view = ("rotation", "jigsaw", "relative_location", "inpainting", "colorization", "exemplar")
    one_view += ("supervised",)
    local_crops = SMALL_KNOBS[name].get("local_crops", 0)
    expected = 1 if name in one_view else 3 + local_crops if name == "obow" else 2 + local_crops  # OBoW: + teacher
    assert len(views) == expected
    loss, embeddings = method(views, **method_inputs(name, 4))
    assert loss.shape == () and torch.isfinite(loss)
    assert embeddings.shape == (4, EMBEDDING_DIM[name]) and torch.isfinite(embeddings).all()
    loss.backward()
    gradient = method.encoder.net[0].weight.grad
    assert gradient is not None and torch.isfinite(gradient).all() and gradient.abs().sum() > 0
    progress = TrainingProgress(step=0, total_steps=2, steps_per_epoch=1)
    method.after_backward(progress)  # the loop's hooks run on this state too
    method.after_step(progress)


@pytest.mark.parametrize("name", ["swav", "dino"])
def test_multi_crop_local_views_come_out_at_their_declared_smaller_side(name: str) -> None:
    params = load_params({"method": {"name": name, name: SMALL_KNOBS[name]}})
    specs = method_views(params.method, params.views, IMAGE_SIZE)
    local_side = round(0.5625 * IMAGE_SIZE)  # the default local_size: 9 px at 16 px
    assert [spec.size for spec in specs[2:]] == [local_side, local_side]  # declared ...
    sides = [tuple(v.shape[-2:]) for v in declared_views(name)]
    assert sides == [(IMAGE_SIZE, IMAGE_SIZE)] * 2 + [(local_side, local_side)] * 2  # ... and made

"""DINO (Caron et al., 2021): a student matches an EMA teacher's centred, sharpened outputs across crops."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from selfsup.config import CropScale, MethodKnobs, ViewConfig
from selfsup.data.views import ViewSpec
from selfsup.distributed import all_reduce_sum
from selfsup.methods.base import Method, TrainingProgress
from selfsup.methods.common import (
    asymmetric_views,
    cross_view_cross_entropy,
    encode_then_head,
    with_local_views,
)
from selfsup.models.ema import EMATeacher, cosine_momentum
from selfsup.models.heads import mlp


class DINOHead(nn.Module):
    """MLP (GELU) to a bottleneck, L2-normalised, then a weight-normalised linear layer whose rows keep
    norm 1 (the reference's norm_last_layer=True)."""

    def __init__(self, in_dim: int, hidden_dim: int, bottleneck_dim: int, out_dim: int, batch_norm: bool):
        super().__init__()
        self.mlp = mlp(in_dim, hidden_dim, bottleneck_dim, layers=3, batch_norm=batch_norm, activation=nn.GELU)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.last_layer_scores(F.normalize(self.mlp(features), dim=1))

    def last_layer_scores(self, bottleneck: torch.Tensor) -> torch.Tensor:
        return F.linear(bottleneck, F.normalize(self.last_layer.weight, dim=1))


def dino_loss(
    student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor, student_t: float, teacher_t: float
) -> torch.Tensor:
    """Cross-entropy of the teacher's centred, sharpened softmax (global crops) and the student's softmax
    (every crop), over every pair of different crops."""
    targets = [F.softmax((t - center) / teacher_t, dim=1) for t in teacher]
    return cross_view_cross_entropy(targets, student, student_t)


class DINO(Method):
    name = "dino"
    min_batch = 1  # the centre, not the batch, prevents collapse
    lr = 0.3  # per 256 images (SGD), as SimCLR's: chosen on the digits' val split (docs/methods.md)

    # What to change on a NaN loss or a collapse.
    advice = "lower method.dino.teacher_temperature, or raise method.dino.momentum or center_momentum"

    class Knobs(MethodKnobs):
        projection_hidden_dim: int = Field(default=2048, ge=1)
        bottleneck_dim: int = Field(default=256, ge=1)
        output_dim: int = Field(default=4096, ge=2)  # solo-learn's CIFAR (65536 on ImageNet)
        # BatchNorm in the head's MLP, as lightly's CIFAR DINO: without it a small ResNet's bottleneck
        # collapsed within 2 epochs on the digits (std 0.04); the reference's ViT default is false.
        head_batch_norm: bool = True
        student_temperature: float = Field(default=0.1, gt=0)
        teacher_temperature: float = Field(default=0.07, gt=0)  # after the warm-up
        warmup_teacher_temperature: float = Field(default=0.04, gt=0)
        warmup_teacher_temperature_epochs: float = Field(default=0, ge=0)  # the reference code's default
        center_momentum: float = Field(default=0.9, ge=0, lt=1)
        momentum: float = Field(default=0.996, ge=0, le=1)  # teacher EMA, cosine to 1
        freeze_last_layer_epochs: float = Field(default=1, ge=0)
        local_crops: int = Field(default=0, ge=0)  # multi-crop: small views the student alone sees
        local_size: float = Field(default=0.5625, gt=0, le=1)  # their side, a fraction of the image's (18/32)
        local_crop_scale: CropScale = (0.05, 0.4)

    @staticmethod
    def views(knobs: Knobs, views: ViewConfig, image_size: int) -> list[ViewSpec]:
        global_views = asymmetric_views(views)
        return with_local_views(
            global_views, views, image_size, knobs.local_crops, knobs.local_size, knobs.local_crop_scale
        )

    def __init__(self, encoder: nn.Module, knobs: Knobs):
        super().__init__()
        self.encoder, self.knobs = encoder, knobs
        self.head = DINOHead(
            encoder.feature_dim,
            knobs.projection_hidden_dim,
            knobs.bottleneck_dim,
            knobs.output_dim,
            knobs.head_batch_norm,
        )
        self.teacher = EMATeacher(self.encoder, self.head)
        self.register_buffer("center", torch.zeros(1, knobs.output_dim))
        self._teacher_sum: torch.Tensor | None = None  # this step's teacher outputs, for the centre update
        self._teacher_count = 0
        # Epochs trained, for the teacher temperature's warm-up: a buffer, so a resumed run has it too.
        self.register_buffer("epochs_done", torch.zeros(()))

    def teacher_temperature(self, epoch: float) -> float:
        k = self.knobs
        if epoch >= k.warmup_teacher_temperature_epochs:
            return k.teacher_temperature
        return k.warmup_teacher_temperature + (k.teacher_temperature - k.warmup_teacher_temperature) * (
            epoch / k.warmup_teacher_temperature_epochs
        )

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        bottleneck = [F.normalize(b.float(), dim=1) for b in encode_then_head(self.encoder, self.head.mlp, views)]
        teacher = [t.float() for t in self.teacher(torch.cat(views[:2])).chunk(2)]  # global crops only
        with torch.autocast(bottleneck[0].device.type, enabled=False):  # sharp softmaxes need float32 (dino #58)
            student = [self.head.last_layer_scores(b) for b in bottleneck]
            loss = dino_loss(
                student,
                teacher,
                self.center,
                self.knobs.student_temperature,
                self.teacher_temperature(float(self.epochs_done)),
            )
        self._teacher_sum, self._teacher_count = torch.cat(teacher).sum(0, keepdim=True), 2 * len(views[0])
        return loss, bottleneck[0].detach()

    def after_backward(self, progress: TrainingProgress) -> None:
        if progress.epoch < self.knobs.freeze_last_layer_epochs:
            self.head.last_layer.weight.grad = None  # the optimiser skips it: stabilises the start

    @torch.no_grad()
    def after_step(self, progress: TrainingProgress) -> None:
        self.teacher.update(self.encoder, self.head, momentum=cosine_momentum(self.knobs.momentum, progress.fraction))
        self.update_center(self._teacher_sum, self._teacher_count)
        self.epochs_done.fill_((progress.step + 1) / progress.steps_per_epoch)

    @torch.no_grad()
    def update_center(self, teacher_sum: torch.Tensor, count: int) -> None:
        """c <- m c + (1 - m) mean of the teacher's outputs over the global batch of both global crops."""
        total = all_reduce_sum(torch.cat([teacher_sum, torch.tensor([[float(count)]], device=teacher_sum.device)], 1))
        mean = total[:, :-1] / total[:, -1:]
        self.center.mul_(self.knobs.center_momentum).add_(mean, alpha=1 - self.knobs.center_momentum)

"""OBoW (Gidaris et al., 2021): from augmented crops, a student predicts the bag of visual words that an EMA
teacher finds in the whole image's feature map, over a vocabulary of the teacher's own recent local features.

The teacher (the encoder's EMA copy, momentum cosine from 0.99 to 1, no heads) soft-assigns its last map, less
the border, to the K words (`soft_codes`, over mu, an EMA of the mean nearest-word distance); the target is
those codes max-pooled and L1-normalised (`bow_targets`). The vocabulary is a FIFO queue of one 3x3-averaged
teacher location per image, from every worker. The student scores its pooled features against weights
generated from the vocabulary (`DynamicBoWHead`). One BoW level, the last map (OBoW's vanilla model); its
adaptation to small images is in docs/methods.md ("Notes behind the code").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from selfsup.config import CropScale, MethodKnobs, ViewConfig
from selfsup.data.views import ViewSpec
from selfsup.distributed import all_gather, all_reduce_sum, randint_per_image, world_size
from selfsup.methods.base import Method, TrainingProgress
from selfsup.methods.common import enqueue, forward_by_size, with_local_views
from selfsup.models.ema import EMATeacher, cosine_momentum
from selfsup.models.heads import LocalBatchNorm


def squared_distances(features: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """N x C x h x w local features, K x C words -> N x h x w x K squared distances, computed once a step for
    both the codes and mu."""
    local = features.permute(0, 2, 3, 1)  # N x h x w x C
    return (local.pow(2).sum(3, keepdim=True) + words.pow(2).sum(1) - 2 * local @ words.T).clamp(min=0)


def soft_codes(squared: torch.Tensor, inverse_delta: torch.Tensor) -> torch.Tensor:
    """N x h x w x K squared distances -> N x K x h x w soft assignments to the words (each sums to 1)."""
    return F.softmax(-inverse_delta * squared, dim=3).permute(0, 3, 1, 2)


def bow_targets(codes: torch.Tensor) -> torch.Tensor:
    """N x K x h x w codes -> N x K bags of words: max over the locations, L1-normalised to a distribution."""
    return F.normalize(codes.amax(dim=(2, 3)), p=1, dim=1)


def min_distance(squared: torch.Tensor) -> torch.Tensor:
    """The mean over local features of the squared distance to the nearest word (what mu follows)."""
    return squared.amin(3).mean()


def inner_map(features: torch.Tensor) -> torch.Tensor:
    """The map less its 1-location border, when at least 2 x 2 remain (OBoW drops the border always)."""
    return features[:, :, 1:-1, 1:-1] if min(features.shape[2:]) >= 4 else features


def sampled_local_features(features: torch.Tensor) -> torch.Tensor:
    """One random location per image of the 3x3-averaged map (smaller kernels on smaller maps): N x C."""
    pooled = F.avg_pool2d(features, kernel_size=min(3, *features.shape[2:]), stride=1).flatten(2)
    pick = randint_per_image(pooled.shape[2], pooled.shape[0], features.device)
    return pooled[torch.arange(pooled.shape[0], device=features.device), :, pick]


def bow_prediction_loss(
    global_crops: list[torch.Tensor], local_crops: list[torch.Tensor], targets: torch.Tensor
) -> torch.Tensor:
    """KL divergence of the students' BoW log-probabilities from the teacher's bags: the mean over each crop
    type's crops, summed over the types (valeoai/obow sums one loss per type), so local crops weigh as one
    type whatever their number."""

    def mean_over(crops: list[torch.Tensor]) -> torch.Tensor:
        return sum(F.kl_div(c, targets, reduction="batchmean") for c in crops) / len(crops)

    return mean_over(global_crops) + (mean_over(local_crops) if local_crops else 0)


class DynamicBoWHead(nn.Module):
    """Weights generated from the vocabulary, one per word: kappa * f . w_k are the student's BoW logits."""

    def __init__(self, word_dim: int, feature_dim: int, kappa: float):
        super().__init__()
        self.kappa = kappa
        self.generator = nn.Sequential(
            nn.Linear(word_dim, 2 * feature_dim, bias=False),
            LocalBatchNorm(2 * feature_dim),  # over the K words, the same on every worker: not gathered
            nn.ReLU(),
            nn.Linear(2 * feature_dim, feature_dim),
        )

    def forward(self, features: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        weights = F.normalize(self.generator(F.normalize(words, dim=1)), dim=1)
        return self.kappa * features @ weights.T


class OBoW(Method):
    name = "obow"
    min_batch = 1  # the targets come from the teacher, not from other images
    # Per 256 images (SGD): a quarter of OBoW's ResNet-18 rate (0.05 at batch 128). The loss sums one mean per
    # crop type, twice the all-crop mean this rate was chosen with at 2+2 crops, so 0.05 became 0.025.
    lr = 0.025

    advice = "raise method.obow.momentum, or lower method.obow.inverse_delta"

    class Knobs(MethodKnobs):
        words: int = Field(default=2048, ge=2)  # K (OBoW: 8192 on ImageNet; the digits are 1,295 images)
        inverse_delta: float = Field(default=10.0, gt=0)  # OBoW's ResNet-18 value (15 for ResNet-50)
        kappa: float = Field(default=5.0, gt=0)  # OBoW's ResNet-18 value (8 for ResNet-50)
        momentum: float = Field(default=0.99, ge=0, le=1)  # teacher EMA, cosine to 1
        distance_momentum: float = Field(default=0.99, ge=0, lt=1)  # of mu, OBoW's
        local_crops: int = Field(default=2, ge=0)
        local_size: float = Field(default=0.5, gt=0, le=1)  # their side, a fraction of the image's
        local_crop_scale: CropScale = (0.05, 0.4)

    @staticmethod
    def views(knobs: Knobs, views: ViewConfig, image_size: int) -> list[ViewSpec]:
        plain = {"crop_scale": (1.0, 1.0), "jitter_prob": 0.0, "grayscale_prob": 0.0, "blur_prob": 0.0}
        teacher = ViewSpec(views.model_copy(update={**plain, "solarize_prob": 0.0}))
        student = [ViewSpec(views), ViewSpec(views)]
        return [teacher] + with_local_views(
            student, views, image_size, knobs.local_crops, knobs.local_size, knobs.local_crop_scale
        )

    def __init__(self, encoder: nn.Module, knobs: Knobs):
        super().__init__()
        self.encoder, self.knobs = encoder, knobs
        self.teacher = EMATeacher(self.encoder)
        self.head = DynamicBoWHead(encoder.feature_dim, encoder.feature_dim, knobs.kappa)
        # OBoW's start: non-negative random words, as the ReLU maps they will be replaced by.
        self.register_buffer("vocabulary", torch.randn(knobs.words, encoder.feature_dim).clamp(min=0))
        self.register_buffer("vocabulary_end", torch.zeros((), dtype=torch.long))
        self.register_buffer("mean_min_distance", torch.tensor(0.5))  # mu, OBoW's start
        self._sampled: torch.Tensor | None = None  # this step's local features, queued after the step

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        crops = forward_by_size(self.encoder, views[1:])
        words = self.vocabulary.clone()  # as it stood before this step's update
        with torch.no_grad():
            teacher_map = inner_map(self.teacher.encoder.feature_map(views[0]).float())
        with torch.autocast(teacher_map.device.type, enabled=False):
            with torch.no_grad():
                squared = squared_distances(teacher_map, words)
                self.track_distance(min_distance(squared))
                targets = bow_targets(soft_codes(squared, self.knobs.inverse_delta / self.mean_min_distance))
            logits = [F.log_softmax(self.head(f.float(), words), dim=1) for f in crops]
            loss = bow_prediction_loss(logits[:2], logits[2:], targets)
        self._sampled = sampled_local_features(teacher_map)
        return loss, crops[0].detach().float()

    @torch.no_grad()
    def track_distance(self, batch_mean: torch.Tensor) -> None:
        """mu <- m mu + (1 - m) x the batch's mean nearest-word distance, averaged over the workers."""
        if self.training:
            mean = all_reduce_sum(batch_mean.reshape(1))[0] / world_size()
            self.mean_min_distance.lerp_(mean, 1 - self.knobs.distance_momentum)

    @torch.no_grad()
    def after_step(self, progress: TrainingProgress) -> None:
        self.teacher.update(self.encoder, momentum=cosine_momentum(self.knobs.momentum, progress.fraction))
        # Every worker queues every worker's features: one vocabulary, the same everywhere.
        enqueue(self.vocabulary, self.vocabulary_end, all_gather(self._sampled))

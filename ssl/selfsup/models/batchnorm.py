"""BatchNorm whose training statistics cover every worker's batch, for CPU (gloo) workers.

nn.SyncBatchNorm is CUDA-only. With per-worker statistics a contrastive method can tell which images share
a worker's batch from the normalisation alone (the SimCLR paper's "local BN" problem), so on CPU the
statistics are all-reduced here instead.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class _AllReduceSum(torch.autograd.Function):
    """The sum of a tensor over all ranks, differentiable.

    Every rank's loss depends on the reduced sum, and the sum depends on every rank's input, so the
    gradient of the total loss (the sum of the ranks' losses, which DDP's gradient average divides by the
    world size) with respect to one rank's input is the sum over ranks of each loss's gradient with
    respect to the reduced value: the all-reduce (sum) of the incoming gradients.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        reduced = tensor.clone()  # all_reduce works in place; the input may be needed by autograd
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        return reduced

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm over N x C or N x C x L or N x C x H x W inputs whose training-mode mean and variance are
    those of the batches of all workers together. In eval mode, or outside a multi-worker process group,
    it is nn.BatchNorm."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 3, 4):
            raise ValueError(f"expected a 2-D, 3-D or 4-D input (got {input.dim()}-D)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not (self.training and _distributed()):
            return super().forward(input)
        return self._global_forward(input)

    def _global_forward(self, input: torch.Tensor) -> torch.Tensor:
        # Statistics in float32, by two reductions: the mean, then the mean squared deviation from it. The
        # one-pass E[x^2] - E[x]^2 cancels catastrophically in float32 when the mean is large against the
        # spread, and would need a float64 copy of the activations (kept for backward) to avoid it; two passes
        # cost one more all-reduce of C numbers per layer instead, cheap next to the layer's own compute.
        # The per-channel sums accumulate in float64 and travel as float64 with the count, kept exact.
        x = input.float()
        reduce_dims = [0, *range(2, x.dim())]  # all but the channel dimension
        channel_shape = (1, -1) + (1,) * (x.dim() - 2)
        local_count = x.new_tensor([x.numel() // x.size(1)], dtype=torch.float64)
        sums_and_count = _AllReduceSum.apply(torch.cat([x.sum(reduce_dims, dtype=torch.float64), local_count]))
        count = sums_and_count[-1]
        if count.item() <= 1:
            raise ValueError(f"expected more than 1 value per channel when training (got {int(count.item())})")
        mean = (sums_and_count[:-1] / count).float()
        centered = x - mean.view(channel_shape)
        var = (_AllReduceSum.apply(centered.square().sum(reduce_dims, dtype=torch.float64)) / count).float()  # biased
        output = centered * torch.rsqrt(var + self.eps).view(channel_shape)
        if self.affine:
            output = output * self.weight.view(channel_shape) + self.bias.view(channel_shape)
        self._update_running_stats(mean.detach(), var.detach(), count.item())
        return output.to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, biased_var: torch.Tensor, count: float) -> None:
        """As nn.BatchNorm does: an exponential average with `momentum`, a cumulative one if it is None,
        of the mean and the unbiased variance."""
        if not self.track_running_stats:
            return
        self.num_batches_tracked.add_(1)
        factor = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
        unbiased_var = biased_var * (count / (count - 1))
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased_var.to(self.running_var.dtype), alpha=factor)


def convert_to_global_batchnorm(module: nn.Module) -> nn.Module:
    """Replaces every nn.BatchNorm1d/2d in `module` (in place; `module` itself if it is one, so use the
    result) by a GlobalBatchNorm with the same settings and the very same parameter and buffer tensors:
    an optimiser built before stays valid, and the state_dict keys do not change, so checkpoints load
    either way (as nn.SyncBatchNorm.convert_sync_batchnorm)."""
    converted = module
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        converted = GlobalBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
    for name, child in module.named_children():
        converted.add_module(name, convert_to_global_batchnorm(child))
    return converted

"""BatchNorm for meta-learning: functional, explicit about its statistics, kept per inner step.

- `bn="batch"`: the statistics of the batch being passed (one task's support or query set). This is
  the MAML paper's transductive setting, used in training always and at test time in `transductive` mode.
- `bn="running"`: per-step running statistics, `running_mean[step]`, as in MAML++ (`per_step` mode at
  test time). Steps beyond the last kept one use the last one.
- `affine_steps > 1`: MAML++'s per-step BatchNorm weights and biases (BNWB): row `step` of the weight
  and the bias is used at inner step `step` (the last row beyond), so each step learns its own affine map.
Batch statistics are also returned on request, so the per-step running averages can be updated by
whoever owns the model state; the forward itself never mutates buffers, which keeps it usable under
`torch.func.vmap`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def outside_func_transforms(x: torch.Tensor) -> bool:
    """True outside torch.func transforms (the plain-autograd loop over tasks, ordinary calls)."""
    return not torch._C._functorch.is_functorch_wrapped_tensor(x)


class MetaBatchNorm2d(nn.Module):
    """BatchNorm with learnable affine parameters (shared, or one row per step) and running statistics
    kept per inner step."""

    def __init__(self, channels: int, bn_steps: int, eps: float = 1e-5, affine_steps: int = 1):
        super().__init__()
        self.eps = eps
        shape = (channels,) if affine_steps == 1 else (affine_steps, channels)
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape))
        self.register_buffer("running_mean", torch.zeros(bn_steps, channels))
        self.register_buffer("running_var", torch.ones(bn_steps, channels))

    def affine(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight and bias of inner step `step`."""
        if self.weight.dim() == 1:
            return self.weight, self.bias
        k = min(step, self.weight.shape[0] - 1)
        return self.weight[k], self.bias[k]

    def forward(self, x: torch.Tensor, step: int, bn: str):
        weight, bias = self.affine(step)
        if bn == "running":
            k = min(step, self.running_mean.shape[0] - 1)
            out = F.batch_norm(x, self.running_mean[k], self.running_var[k], weight, bias,
                               training=False, eps=self.eps)
            return out, None
        if outside_func_transforms(x) and x.dtype == weight.dtype:
            # The fused kernel with no running buffers, so nothing is mutated. On CPU it is several times
            # faster than the statistics written out below (a strided x.var over (0, 2, 3) alone took
            # longer than the convolution before it). It returns the batch mean and 1/sqrt(var + eps),
            # from which the biased variance is recovered. (Under bf16 autocast x is bf16 and the weights
            # fp32, which the kernel does not take: the written-out form then runs, in fp32.)
            out, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, self.eps)
            return out, (mean.detach(), (invstd.detach().pow(-2) - self.eps).clamp_min(0))
        # Under torch.func transforms the statistics are written out: the same maths, free of side
        # effects, and composable with vmap and double backward. (native_batch_norm's batched double
        # backward lost float32 precision: a second-order Conv-4 meta-gradient 1e-2 off its float64
        # value, against 2e-6 this way.)
        x = x.to(weight.dtype)
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        scale = weight * torch.rsqrt(var + self.eps)
        out = x * scale[None, :, None, None] + (bias - mean * scale)[None, :, None, None]
        return out, (mean.detach(), var.detach())

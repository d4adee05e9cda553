"""Conv-4 of the MAML paper: four [3x3 conv, BatchNorm, ReLU, 2x2 max-pool] blocks and a linear head.
With `downsample="stride"` (the paper's Omniglot network) each block's convolution has stride 2 and
there is no pooling: [3x3 conv stride 2, BatchNorm, ReLU], 28 px -> 14 -> 7 -> 4 -> 2.

BatchNorm is functional and explicit about which statistics it normalises with:
- `bn="batch"`: the statistics of the batch being passed (one task's support or query set). This is
  the MAML paper's transductive setting, used in training always and at test time in `transductive` mode.
- `bn="running"`: per-step running statistics, `running_mean[step]`, as in MAML++ (`per_step` mode at
  test time). Steps beyond the last kept one use the last one.
Batch statistics are also returned on request (`stats=True`), so the per-step running averages can be
updated by whoever owns the model state; the forward itself never mutates buffers, which keeps it
usable under `torch.func.vmap`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _outside_func_transforms(x: torch.Tensor) -> bool:
    """True outside torch.func transforms (the plain-autograd loop over tasks, ordinary calls)."""
    return not torch._C._functorch.is_functorch_wrapped_tensor(x)


def _channels_last_pays(x: torch.Tensor) -> bool:
    # Under torch.func transforms the physical layout belongs to the transform (vmap cannot express
    # memory formats at all); the plain-autograd loop over tasks on one CPU thread is where it pays
    # (measured with bench/inner_loop.py: 1.2x on Omniglot-size Conv-4 at 1 thread; equal at 2 threads,
    # and 8% slower for the 84 px mini-ImageNet size, where NCHW convolutions parallelise better).
    return x.device.type == "cpu" and _outside_func_transforms(x) and torch.get_num_threads() == 1


class MetaBatchNorm2d(nn.Module):
    """BatchNorm with learnable affine parameters and running statistics kept per inner step."""

    def __init__(self, channels: int, bn_steps: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(bn_steps, channels))
        self.register_buffer("running_var", torch.ones(bn_steps, channels))

    def forward(self, x: torch.Tensor, step: int, bn: str):
        if bn == "running":
            k = min(step, self.running_mean.shape[0] - 1)
            out = F.batch_norm(x, self.running_mean[k], self.running_var[k], self.weight, self.bias,
                               training=False, eps=self.eps)
            return out, None
        if _outside_func_transforms(x):
            # The fused kernel with no running buffers, so nothing is mutated. On CPU it is several times
            # faster than the statistics written out below (a strided x.var over (0, 2, 3) alone took
            # longer than the convolution before it). It returns the batch mean and 1/sqrt(var + eps),
            # from which the biased variance is recovered.
            out, mean, invstd = torch.native_batch_norm(x, self.weight, self.bias, None, None, True, 0.0,
                                                        self.eps)
            return out, (mean.detach(), (invstd.detach().pow(-2) - self.eps).clamp_min(0))
        # Under torch.func transforms the statistics are written out: the same maths, free of side
        # effects, and composable with vmap and double backward. (native_batch_norm's batched double
        # backward lost float32 precision: a second-order Conv-4 meta-gradient 1e-2 off its float64
        # value, against 2e-6 this way.)
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        scale = self.weight * torch.rsqrt(var + self.eps)
        out = x * scale[None, :, None, None] + (self.bias - mean * scale)[None, :, None, None]
        return out, (mean.detach(), var.detach())


class Conv4(nn.Module):
    """Conv-4 with a linear head over the flattened features."""

    def __init__(self, ways: int = 5, channels: int = 3, filters: int = 32, image_size: int = 84,
                 bn_steps: int = 11, downsample: str = "pool"):
        super().__init__()
        if downsample not in ("pool", "stride"):
            raise ValueError(f"downsample {downsample!r}: allowed: pool, stride")
        self.pool = downsample == "pool"
        stride = 1 if self.pool else 2
        convs, norms = [], []
        size, width = image_size, channels
        for _ in range(4):
            convs.append(nn.Conv2d(width, filters, 3, stride=stride, padding=1))
            norms.append(MetaBatchNorm2d(filters, bn_steps))
            # A 2x2 max-pool floors the size; a 3x3 convolution of stride 2 and padding 1 rounds it up.
            width, size = filters, size // 2 if self.pool else (size + 1) // 2
        if size < 1:
            raise ValueError(f"image_size {image_size} is too small for four 2x2 max-pools")
        self.body = nn.ModuleDict({"conv": nn.ModuleList(convs), "norm": nn.ModuleList(norms)})
        self.feature_dim = filters * size * size
        self.head = nn.Linear(self.feature_dim, ways)

    def features(self, x: torch.Tensor, step: int = 0, bn: str = "batch", stats: bool = False):
        collected = []
        # Channels-last activations on CPU outside torch.func transforms: pooling, ReLU and BatchNorm
        # then vectorise over channels, several times faster than NCHW. Converting the input is cheap
        # and the convolutions keep its layout; a 1-channel input cannot carry it (both layouts are the
        # same), so then the first convolution's output is converted instead.
        # Not with stride-2 convolutions: there the channels-last kernels lost float32 precision (a meta-
        # gradient 3.6e-3 of its scale from float64, against 1.9e-4 in NCHW, bench/inner_loop.py
        # omniglot-stride at one thread) for 1.13x the speed.
        channels_last = self.pool and _channels_last_pays(x)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for i, (conv, norm) in enumerate(zip(self.body["conv"], self.body["norm"])):
            x = conv(x)
            if channels_last and i == 0:
                x = x.contiguous(memory_format=torch.channels_last)
            x, s = norm(x, step, bn)
            collected.append(s)
            # relu(max_pool(x)) is max_pool(relu(x)) exactly (max commutes with a monotone map, and both
            # orders route gradients through the same window elements), on a quarter of the elements.
            # In place on the plain path: max-pool's backward keeps its input and indices, not its output.
            x = F.max_pool2d(x, 2) if self.pool else x
            x = F.relu(x, inplace=_outside_func_transforms(x))
        x = x.flatten(1)
        return (x, collected) if stats else x

    def forward(self, x: torch.Tensor, step: int = 0, bn: str = "batch", part: str = "all",
                stats: bool = False):
        if part == "head":
            return self.head(x)
        feats = self.features(x, step, bn, stats)
        if part == "body":
            return feats
        if stats:
            feats, collected = feats
            return self.head(feats), collected
        return self.head(feats)

    @torch.no_grad()
    def update_running_stats(self, bn_mean: torch.Tensor, bn_var: torch.Tensor, momentum: float) -> None:
        """The model-level hook the driver calls after each outer step in `per_step` BatchNorm mode: fold
        per-step batch statistics, averaged over tasks, into the per-step running statistics.

        `bn_mean`/`bn_var` are (rows, layers, channels) as returned by the algorithms in `per_step` mode,
        row k holding the statistics seen after k inner steps. The model keeps a row for every test-time
        step too; rows past the last trained one take the last trained row's statistics, so a test-time
        step beyond the training steps is normalised with the closest statistics seen, not the initial ones.
        """
        norms = [m for m in self.modules() if isinstance(m, MetaBatchNorm2d)]
        for layer, norm in enumerate(norms):
            kept = norm.running_mean.shape[0]
            rows = torch.arange(kept, device=bn_mean.device).clamp(max=bn_mean.shape[0] - 1)
            norm.running_mean.lerp_(bn_mean[rows, layer].to(norm.running_mean), momentum)
            norm.running_var.lerp_(bn_var[rows, layer].to(norm.running_var), momentum)

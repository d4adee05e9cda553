"""Conv-4 of the MAML paper: four [3x3 conv, BatchNorm, ReLU, 2x2 max-pool] blocks and a linear head.
With `downsample="stride"` (the paper's Omniglot network) each block's convolution has stride 2 and
there is no pooling: [3x3 conv stride 2, BatchNorm, ReLU], 28 px -> 14 -> 7 -> 4 -> 2.

BatchNorm is `metadist.models.norm.MetaBatchNorm2d` (batch or per-step running statistics, shared or
per-step affine parameters).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metadist.models.convnet import MetaConvNet
from metadist.models.norm import MetaBatchNorm2d, outside_func_transforms


def _channels_last_pays(x: torch.Tensor) -> bool:
    # Under torch.func transforms the physical layout belongs to the transform (vmap cannot express
    # memory formats at all); the plain-autograd loop over tasks on one CPU thread is where it pays
    # (measured with bench/inner_loop.py: 1.2x on Omniglot-size Conv-4 at 1 thread; equal at 2 threads,
    # and 8% slower for the 84 px mini-ImageNet size, where NCHW convolutions parallelise better).
    return x.device.type == "cpu" and outside_func_transforms(x) and torch.get_num_threads() == 1


class Conv4(MetaConvNet):
    """Conv-4 with a linear head over the flattened features."""

    def __init__(self, ways: int = 5, channels: int = 3, filters: int = 32, image_size: int = 84,
                 bn_steps: int = 11, downsample: str = "pool", affine_steps: int = 1):
        super().__init__()
        if downsample not in ("pool", "stride"):
            raise ValueError(f"downsample {downsample!r}: allowed: pool, stride")
        self.pool = downsample == "pool"
        stride = 1 if self.pool else 2
        convs, norms = [], []
        size, width = image_size, channels
        for _ in range(4):
            convs.append(nn.Conv2d(width, filters, 3, stride=stride, padding=1))
            norms.append(MetaBatchNorm2d(filters, bn_steps, affine_steps=affine_steps))
            # A 2x2 max-pool floors the size; a 3x3 convolution of stride 2 and padding 1 rounds it up.
            width, size = filters, size // 2 if self.pool else (size + 1) // 2
        if size < 1:
            raise ValueError(f"image_size {image_size} is too small for four 2x2 max-pools")
        self.body = nn.ModuleDict({"conv": nn.ModuleList(convs), "norm": nn.ModuleList(norms)})
        self.feature_dim = filters * size * size
        self.head = nn.Linear(self.feature_dim, ways)

    def features(self, x: torch.Tensor, step: int = 0, bn: str = "batch", stats: bool = False,
                 drop: bool = False):
        # `drop` is in the shared signature (MetaConvNet.forward); Conv-4 has no DropBlock.
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
            x = F.relu(x, inplace=outside_func_transforms(x))
        x = x.flatten(1)
        return (x, collected) if stats else x

"""ResNet-12 as few-shot work uses it (MetaOptNet; learn2learn's `ResNet12`): four residual blocks of
three 3x3 convolutions, widths 64-160-320-640 by default, each block followed by 2x2 max-pooling,
leaky ReLU 0.1, optional DropBlock, global average pooling and a linear head (about 12.4M parameters
with the default widths, whatever the image size).

A block: [conv3x3, BN, leaky] x 2, conv3x3, BN; plus a 1x1 convolution and BN on the shortcut; sum,
2x2 max-pool, leaky ReLU (the same as leaky ReLU then pooling: a monotone map commutes with max, on a
quarter of the elements); DropBlock on the last two blocks when `drop_rate` > 0 (MetaOptNet's
placement, block size 5 capped at the feature map). Convolutions have no bias (BatchNorm follows each).

BatchNorm is `metadist.models.norm.MetaBatchNorm2d`, so both BatchNorm modes and per-step affine
parameters work as for Conv-4. DropBlock draws its masks from torch's random generator and only when
the caller asks (`drop=True`: meta-training, never evaluation), so under `vmap` the batching layer
draws them per task.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metadist.models.convnet import MetaConvNet
from metadist.models.norm import MetaBatchNorm2d, outside_func_transforms

SLOPE = 0.1
WIDTHS = (64, 160, 320, 640)


def drop_block(x: torch.Tensor, rate: float, block: int) -> torch.Tensor:
    """DropBlock (Ghiasi et al., 2018): zero `block` x `block` squares of each channel so that about
    `rate` of the units are dropped, and rescale the rest to keep the mean."""
    size = x.shape[-1]
    block = min(block, size)
    # Seeds are drawn where a whole block fits; the seed rate makes the expected dropped fraction `rate`.
    gamma = rate / block ** 2 * size ** 2 / (size - block + 1) ** 2
    seeds = torch.bernoulli(torch.full((*x.shape[:-2], size - block + 1, size - block + 1), gamma,
                                       dtype=x.dtype, device=x.device))
    pad = block - 1
    dropped = F.max_pool2d(F.pad(seeds, (pad, pad, pad, pad)), block, stride=1)
    keep = 1 - dropped
    return x * keep * (keep.numel() / keep.sum().clamp_min(1.0))


class ResNet12(MetaConvNet):
    """ResNet-12 with a linear head over globally average-pooled features."""

    def __init__(self, ways: int = 5, channels: int = 3, widths=WIDTHS, image_size: int = 84,
                 bn_steps: int = 11, affine_steps: int = 1, drop_rate: float = 0.0, drop_block_size: int = 5):
        super().__init__()
        if len(widths) != 4:
            raise ValueError(f"widths {list(widths)}: ResNet-12 has four blocks, so four widths")
        if image_size < 16:
            raise ValueError(f"image_size {image_size} is too small for four 2x2 max-pools")
        self.drop_rate, self.drop_block_size = drop_rate, drop_block_size
        blocks = []
        width = channels
        for out in widths:
            def norm(c=out):
                return MetaBatchNorm2d(c, bn_steps, affine_steps=affine_steps)
            # Registration order is the order the forward meets the norms: the per-step statistics rows
            # are matched to layers by it (`MetaConvNet.update_running_stats`).
            blocks.append(nn.ModuleDict({
                "conv1": nn.Conv2d(width, out, 3, padding=1, bias=False), "norm1": norm(),
                "conv2": nn.Conv2d(out, out, 3, padding=1, bias=False), "norm2": norm(),
                "conv3": nn.Conv2d(out, out, 3, padding=1, bias=False), "norm3": norm(),
                "shortcut": nn.Conv2d(width, out, 1, bias=False), "shortcut_norm": norm(),
            }))
            width = out
        self.body = nn.ModuleDict({"blocks": nn.ModuleList(blocks)})
        self.feature_dim = width
        self.head = nn.Linear(width, ways)

    def features(self, x: torch.Tensor, step: int = 0, bn: str = "batch", stats: bool = False,
                 drop: bool = False):
        collected = []

        def norm(layer, h):
            h, s = layer(h, step, bn)
            collected.append(s)
            return h

        # In place on the plain-autograd path: BatchNorm's and max-pool's backward keep their inputs, not
        # their outputs, so the activation overwrites a tensor nothing saved (a wrong in-place would be
        # autograd's error, never a wrong gradient). Under torch.func transforms, out of place.
        inplace = outside_func_transforms(x)
        for i, b in enumerate(self.body["blocks"]):
            h = F.leaky_relu(norm(b["norm1"], b["conv1"](x)), SLOPE, inplace=inplace)
            h = F.leaky_relu(norm(b["norm2"], b["conv2"](h)), SLOPE, inplace=inplace)
            h = norm(b["norm3"], b["conv3"](h))
            x = F.leaky_relu(F.max_pool2d(h + norm(b["shortcut_norm"], b["shortcut"](x)), 2), SLOPE,
                             inplace=inplace)
            if drop and self.drop_rate > 0 and i >= 2:
                x = drop_block(x, self.drop_rate, self.drop_block_size)
        x = x.mean(dim=(2, 3))
        return (x, collected) if stats else x

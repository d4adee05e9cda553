"""The shared frame of the image networks (Conv-4, ResNet-12): body/head routing for ANIL and the
per-step BatchNorm running-statistics update the driver calls."""

from __future__ import annotations

import torch
from torch import nn

from metadist.models.norm import MetaBatchNorm2d


class MetaConvNet(nn.Module):
    """A body of convolution blocks with `MetaBatchNorm2d` layers and a linear head over its features.

    Subclasses define `features(x, step, bn, stats, drop)` (the flattened features, with the per-layer
    batch statistics when `stats`) and `head`; this class routes `part` (`all`, `body` for ANIL's
    features, `head` on given features) and folds per-step statistics into the running ones."""

    def forward(self, x: torch.Tensor, step: int = 0, bn: str = "batch", part: str = "all",
                stats: bool = False, drop: bool = False):
        if part == "head":
            return self.head(x)
        feats = self.features(x, step, bn, stats, drop)
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
        row k holding the statistics seen after k inner steps (layers narrower than the widest are
        zero-padded; only their own channels are read). The model keeps a row for every test-time step
        too; rows past the last trained one take the last trained row's statistics, so a test-time step
        beyond the training steps is normalised with the closest statistics seen, not the initial ones.
        """
        norms = [m for m in self.modules() if isinstance(m, MetaBatchNorm2d)]
        for layer, norm in enumerate(norms):
            kept, channels = norm.running_mean.shape
            rows = torch.arange(kept, device=bn_mean.device).clamp(max=bn_mean.shape[0] - 1)
            norm.running_mean.lerp_(bn_mean[rows, layer, :channels].to(norm.running_mean), momentum)
            norm.running_var.lerp_(bn_var[rows, layer, :channels].to(norm.running_var), momentum)

"""Plain nn.Module networks (pure torch; never imports ray, mlflow or webdataset).

Every model names its parameters `body.*` and `head.*` so ANIL can adapt the head alone, and accepts
`forward(x, step=..., bn=..., part=...)` so one `torch.func.functional_call` serves all algorithms
(ResNet-12 also takes `drop=True`, DropBlock, which the training spec asks for).
"""

from __future__ import annotations

import torch

from metadist.config import RL_FAMILIES
from metadist.models.conv4 import Conv4
from metadist.models.mlp import MLP
from metadist.models.policy import GaussianPolicy
from metadist.models.resnet12 import ResNet12


def _mlp(cfg) -> MLP:
    m = cfg.model
    return MLP(m.in_features, list(m.hidden), m.out_features)


def _norm_rows(cfg) -> dict[str, int]:
    # Running statistics are kept for every step a forward can be made at: training steps and test steps.
    # Per-step affine parameters exist for the trained steps (forwards at steps 0..inner.steps); a
    # test-time step beyond them takes the last, which is the one trained on the query.
    return {"bn_steps": max(cfg.inner.steps, cfg.eval.steps) + 1,
            "affine_steps": cfg.inner.steps + 1 if cfg.model.bn_weights == "per_step" else 1}


def _conv4(cfg) -> Conv4:
    m = cfg.model
    return Conv4(ways=cfg.task.ways, channels=m.channels, filters=m.filters, image_size=m.image_size,
                 downsample=m.downsample, **_norm_rows(cfg))


def _resnet12(cfg) -> ResNet12:
    m = cfg.model
    return ResNet12(ways=cfg.task.ways, channels=m.channels, widths=m.widths, image_size=m.image_size,
                    drop_rate=m.drop_rate, drop_block_size=m.drop_block_size, **_norm_rows(cfg))


def _policy(cfg) -> GaussianPolicy:
    m = cfg.model
    obs_dim, act_dim = RL_FAMILIES[cfg.task.family]
    return GaussianPolicy(obs_dim=obs_dim, hidden=list(m.hidden), act_dim=act_dim, init_std=m.init_std)


MODELS = {"mlp": _mlp, "conv4": _conv4, "resnet12": _resnet12, "policy": _policy}
"""`model.name` -> the function that builds that network from the run config."""


def build_model(cfg) -> torch.nn.Module:
    """Build the network named by `cfg.model.name` from the run config."""
    return MODELS[cfg.model.name](cfg)


def head_names(params) -> list[str]:
    """Names of head parameters (adapted by ANIL)."""
    return [n for n in params if n.startswith("head.")]

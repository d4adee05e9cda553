"""Meta-learning algorithms as pure torch.func functions (never imports ray, mlflow or webdataset).

Every entry of `ALGORITHMS` maps `(model, params, batch, spec)` to `(summed meta-gradients, summed
metrics)`. `init_meta_params` builds the meta-parameters an algorithm learns (network weights plus any
learned inner learning rates).
"""

from __future__ import annotations

import torch

from metadist.algorithms import maml_rl
from metadist.algorithms.evaluate import adapt_curve
from metadist.algorithms.maml import anil, fomaml, maml, metasgd, pretrain
from metadist.algorithms.reptile import reptile
from metadist.algorithms.spec import InnerSpec, make_eval_spec, make_spec, msl_weights

ALGORITHMS = {
    "maml": maml,
    "fomaml": fomaml,
    "reptile": reptile,
    "anil": anil,
    "metasgd": metasgd,
    "pretrain": pretrain,
}

RL_ALGORITHMS = {
    "maml": maml_rl.maml,
    "fomaml": maml_rl.maml,  # first order, ANIL and Meta-SGD are the spec's and the parameters' business
    "anil": maml_rl.maml,
    "metasgd": maml_rl.maml,
    "pretrain": maml_rl.pretrain,
}
"""The same names for reinforcement-learning tasks (`task.family: navigation` or `locomotion`)."""

__all__ = ["ALGORITHMS", "RL_ALGORITHMS", "algorithm_for", "InnerSpec", "adapt_curve", "init_meta_params", "make_eval_spec", "make_spec",
           "msl_weights"]


def algorithm_for(cfg):
    """The function that computes the configured algorithm's summed meta-gradients for the task family."""
    return (RL_ALGORITHMS if cfg.task.rl else ALGORITHMS)[cfg.algorithm.name]


def init_meta_params(model: torch.nn.Module, cfg) -> dict[str, torch.Tensor]:
    """Network parameters plus the learned inner rates the configured algorithm needs."""
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    name, lr = cfg.algorithm.name, cfg.inner.lr
    if name == "metasgd":
        params.update({f"lr/{n}": torch.full_like(p, lr) for n, p in list(params.items())})
    elif cfg.algorithm.lslr and name in ("maml", "fomaml"):
        # Same dtype and device as the weight it scales, so flat transport and the outer step see one kind.
        params.update({f"lslr/{n}": torch.full((cfg.inner.steps,), lr, dtype=p.dtype, device=p.device)
                       for n, p in list(params.items())})
    return params

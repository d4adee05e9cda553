"""TRPO's pieces (pure torch): conjugate gradient, Hessian-vector products exact and by finite
differences, the Gaussian KL, the natural step and the line search."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from metadist.algorithms import trpo
from metadist.models.policy import GaussianPolicy

G = torch.Generator().manual_seed(0)


def _spd(n: int) -> torch.Tensor:
    m = torch.randn(n, n, generator=G, dtype=torch.float64)
    return m @ m.T + torch.eye(n, dtype=torch.float64)


def test_conjugate_gradient_solves_a_symmetric_positive_definite_system():
    a = _spd(20)
    b = {"w": torch.randn(20, generator=G, dtype=torch.float64)}
    x = trpo.conjugate_gradient(lambda p: {"w": a @ p["w"]}, b, iters=60, residual_tol=1e-30)
    assert torch.allclose(a @ x["w"], b["w"], atol=1e-8)
    # The product CG accumulates is A x, without a product of its own.
    y, ay = trpo.conjugate_gradient(lambda p: {"w": a @ p["w"]}, b, iters=7, with_product=True)
    assert torch.allclose(ay["w"], a @ y["w"], atol=1e-10)
    # Ten iterations, as TRPO takes them: the residual shrinks without being exact.
    x10 = trpo.conjugate_gradient(lambda p: {"w": a @ p["w"]}, b, iters=10)
    assert (a @ x10["w"] - b["w"]).norm() < b["w"].norm()


def test_the_exact_hessian_vector_product_is_the_hessian_times_the_vector():
    params = {"a": torch.randn(3, generator=G, dtype=torch.float64),
              "b": torch.randn(2, 2, generator=G, dtype=torch.float64)}

    def f(p):
        return (p["a"].sin() * p["a"]).sum() + (p["b"] @ p["b"]).trace() * p["a"].sum() + p["b"].exp().sum()

    v = {"a": torch.randn(3, generator=G, dtype=torch.float64), "b": torch.randn(2, 2, generator=G, dtype=torch.float64)}
    hv = trpo.hvp_exact(f, params, v)
    flat = torch.cat([params["a"], params["b"].flatten()])
    hess = torch.autograd.functional.hessian(lambda x: f({"a": x[:3], "b": x[3:].view(2, 2)}), flat)
    expected = hess @ torch.cat([v["a"], v["b"].flatten()])
    assert torch.allclose(torch.cat([hv["a"], hv["b"].flatten()]), expected, atol=1e-10)


def _policy_kl():
    """The mean KL of a small policy from its own outputs at parameters `old`, as TRPO constrains it."""
    torch.manual_seed(1)
    model = GaussianPolicy(hidden=[5]).double()
    old = {n: p.detach().clone() for n, p in model.named_parameters()}
    obs = torch.randn(4, 6, 2, generator=G, dtype=torch.float64)
    mask = (torch.rand(4, 6, generator=G) < 0.8).double()
    reference = functional_call(model, old, (obs,)).detach()
    return old, (lambda p: trpo.diagonal_gaussian_kl(reference, functional_call(model, p, (obs,)), mask))


def test_the_finite_difference_product_agrees_with_the_exact_one_on_a_small_network():
    old, kl = _policy_kl()
    for point in (old, {n: v + 0.05 * torch.randn(v.shape, generator=G, dtype=torch.float64)
                        for n, v in old.items()}):
        v = {n: torch.randn(p.shape, generator=G, dtype=torch.float64) for n, p in old.items()}
        exact = trpo.hvp_exact(kl, point, v)
        approx = trpo.hvp_finite_difference(kl, point, v)
        num = sum(((exact[n] - approx[n]) ** 2).sum() for n in old).sqrt()
        assert (num / sum((exact[n] ** 2).sum() for n in old).sqrt()).item() < 1e-5


def test_the_kl_is_the_masked_mean_of_torchs_gaussian_kl():
    a = torch.randn(3, 5, 4, generator=G, dtype=torch.float64)
    b = torch.randn(3, 5, 4, generator=G, dtype=torch.float64)
    mask = (torch.rand(3, 5, generator=G) < 0.7).double()
    dist = lambda o: torch.distributions.Normal(o[..., :2], o[..., 2:].exp())  # noqa: E731
    per_step = torch.distributions.kl_divergence(dist(a), dist(b)).sum(-1)
    assert trpo.diagonal_gaussian_kl(a, b, mask).item() == pytest.approx(((per_step * mask).sum() / mask.sum()).item())
    assert trpo.diagonal_gaussian_kl(a, a, mask).item() == pytest.approx(0.0, abs=1e-12)


def test_the_natural_step_meets_the_kl_bound_along_the_inverse_fisher_gradient():
    fisher = _spd(6)
    g = {"w": torch.randn(6, generator=G, dtype=torch.float64)}
    step = trpo.natural_step(g, lambda p: {"w": fisher @ p["w"]}, max_kl=0.01, cg_iters=30, damping=0.0)
    s = step["w"]
    assert (0.5 * s @ fisher @ s).item() == pytest.approx(0.01, rel=1e-6)  # the quadratic KL model
    direction = -torch.linalg.solve(fisher, g["w"])
    assert torch.allclose(s / s.norm(), direction / direction.norm(), atol=1e-8)


def test_the_line_search_backtracks_until_the_loss_falls_within_the_kl_bound():
    params = {"w": torch.zeros(2, dtype=torch.float64)}
    loss = lambda p: float(((p["w"] - 1.0) ** 2).sum())  # noqa: E731
    kl = lambda p: float((p["w"] ** 2).sum())  # noqa: E731
    step = {"w": torch.full((2,), 1.0, dtype=torch.float64)}  # full step: KL 2.0, far over the bound
    evaluate = lambda p: (loss(p), kl(p))  # noqa: E731
    new, k, _, _ = trpo.line_search(evaluate, params, step, max_kl=0.5)
    assert k == 4 and torch.allclose(new["w"], torch.full((2,), 0.8 ** 4, dtype=torch.float64))  # KL 0.336
    # A step that only raises the loss is refused: the parameters stay.
    same, k, _, _ = trpo.line_search(evaluate, params, {"w": torch.full((2,), -1.0, dtype=torch.float64)}, max_kl=10.0)
    assert k is None and same is params

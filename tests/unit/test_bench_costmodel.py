"""The reducer benchmark's cost model (bench/costmodel.py): its fits recover known costs, its crossovers
and projections follow from them."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "bench" / "costmodel.py"
_spec = importlib.util.spec_from_file_location("bench_costmodel", _PATH)
cm = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = cm  # dataclasses look their module up while the file runs
_spec.loader.exec_module(cm)

SIZES = [32_901, 1_000_000, 4_000_000, 12_400_000]


def test_the_fits_recover_the_costs_that_made_the_data():
    truth = cm.DriverCost(fixed=2e-3, fixed_value=1.5e-9, worker=1e-3, worker_value=0.7e-9)
    serial = {p: truth.worker + truth.worker_value * p for p in SIZES}
    fit = cm.DriverCost.fit({p: truth(1, p) for p in SIZES}, serial)
    for got, want in zip((fit.fixed, fit.fixed_value, fit.worker, fit.worker_value),
                         (truth.fixed, truth.fixed_value, truth.worker, truth.worker_value)):
        assert got == pytest.approx(want, rel=1e-9)
    ring = cm.RingCost.fit({p: 4e-4 + 3e-9 * p for p in SIZES})
    assert (ring.hop, ring.value) == (pytest.approx(2e-4), pytest.approx(3e-9))
    assert ring(2, 1e6) == pytest.approx(4e-4 + 3e-3)


def test_a_fit_never_gives_a_negative_cost():
    c, d = cm.fit_line([1, 2, 3], [3.0, 2.0, 1.0])  # falling: the slope is 0, the level the weighted mean
    assert d == 0 and 1 < c < 3
    fit = cm.DriverCost.fit({1: 2.0, 2: 3.0}, {1: 2.1, 2: 2.9})  # a serial part above a whole step: noise
    assert min(fit.fixed, fit.fixed_value, fit.worker, fit.worker_value) >= 0


def test_ring_and_tree_hops():
    ring, tree = cm.RingCost(hop=1.0, value=0.0), cm.RingCost(hop=1.0, value=0.0, tree=True)
    assert [ring.hops(w) for w in (1, 2, 8, 64)] == [0, 2, 14, 126]
    assert [tree.hops(w) for w in (1, 2, 8, 64)] == [0, 2, 6, 12]
    assert cm.RingCost(hop=0.0, value=1.0)(256, 1.0) == pytest.approx(2 * 255 / 256)


def test_crossovers():
    driver = cm.DriverCost(fixed=1e-3, fixed_value=0.0, worker=0.0, worker_value=1e-9)
    ring = cm.RingCost(hop=1e-3, value=0.0)  # 2 ms at W=2 whatever P
    assert cm.crossover_params(driver, ring, 2) == pytest.approx(5e5)  # 1 ms + 2e-9 P = 2 ms
    assert cm.crossover_params(driver, cm.RingCost(hop=0.0, value=0.0), 2) is None  # the ring always cheaper
    assert cm.crossover_params(driver, cm.RingCost(hop=0.0, value=1e-8), 2) == pytest.approx(1.25e5)  # 1 ms = 8e-9 P
    # 1 ms + W 1 ms against 2 (W - 1) 0.1 ms: the ring is cheaper from the start...
    assert cm.crossover_workers(cm.DriverCost(1e-3, 0, 1e-3, 0), cm.RingCost(1e-4, 0), 0) == 2
    # ... and a ring whose hops cost more than a driver call never is.
    assert cm.crossover_workers(cm.DriverCost(0, 0, 1e-4, 0), cm.RingCost(1e-3, 0), 0, max_workers=64) is None
    assert cm.payback_steps(10.0, 0.05) == pytest.approx(200)
    assert cm.payback_steps(10.0, -0.01) == math.inf
    assert cm.scaling_efficiency(2.0, 2.5) == pytest.approx(0.8)


def test_the_projection_adds_the_network_only_beyond_one_node():
    driver = cm.DriverCost(fixed=0.0, fixed_value=0.0, worker=0.0, worker_value=0.0)
    cl = cm.Cluster(gpus_per_node=8, nic_gbps=80.0, pcie_gbytes_s=1e12)  # 10 GB/s into the driver
    assert cm.project(driver, cl, 8, 1e6)[0] == pytest.approx(0.0, abs=1e-9)
    assert cm.project(driver, cl, 16, 1e6)[0] == pytest.approx(8 * 4e6 / 10e9, rel=1e-6)
    in_node, across = cm.project(driver, cl, 8, 1e6)[1], cm.project(driver, cl, 16, 1e6)[1]
    assert across > in_node > 0  # the slower bus across nodes

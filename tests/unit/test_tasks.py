"""Sinusoid tasks (a pure function of seed, split, step and index) and the Episode type."""

from __future__ import annotations

import math

import pytest
import torch

from metadist.config import from_dict
from metadist.episode import Episode
from metadist.tasks import SinusoidTasks, build_tasks
from metadist.tasks.sinusoid import task_seed, task_seeds, uniforms


def assert_same_tasks(a: Episode, b: Episode):
    for x, y in zip(a.tensors(), b.tensors()):
        assert torch.equal(x, y)
    assert a.info.keys() == b.info.keys() and all(torch.equal(a.info[k], b.info[k]) for k in a.info)


def test_vectorised_task_seeds_equal_the_scalar_ones():
    for seed, split, step in [(0, "train", 0), (7, "val", 12345), (2**40, "test", -1)]:
        idx = [0, 1, 2, 99, 100_000]
        assert task_seeds(seed, split, step, idx).tolist() == [task_seed(seed, split, step, i) for i in idx]
    assert all(0 <= s < 2**63 for s in task_seeds(3, "train", 5, range(50)).tolist())


def test_task_is_a_pure_function_of_seed_step_and_index():
    tasks = SinusoidTasks(seed=3)
    whole = tasks.sample(5, range(8), shots=4, query=6)
    # The same tasks whichever indices they are requested with, and in whatever order.
    assert_same_tasks(tasks.sample(5, [6, 2], 4, 6), Episode.cat([whole.slice(6, 7), whole.slice(2, 3)]))
    singles = Episode.cat([tasks.sample(5, [i], 4, 6) for i in range(8)])
    assert_same_tasks(singles, whole)
    # A fresh object (a replaced worker) draws the same tasks.
    assert_same_tasks(SinusoidTasks(seed=3).sample(5, range(8), 4, 6), whole)
    # Another step, index or seed gives other tasks.
    assert not torch.equal(tasks.sample(6, range(8), 4, 6).info["amplitude"], whole.info["amplitude"])
    assert not torch.equal(SinusoidTasks(seed=4).sample(5, range(8), 4, 6).info["amplitude"],
                           whole.info["amplitude"])
    assert len(set(whole.info["amplitude"].tolist())) == 8


def test_support_and_query_come_from_one_stream():
    tasks = SinusoidTasks(seed=0)
    a = tasks.sample(0, range(4), shots=5, query=10)
    b = tasks.sample(0, range(4), shots=5, query=3)
    # Changing the query size keeps the task (amplitude, phase) and its support points.
    assert torch.equal(a.info["amplitude"], b.info["amplitude"]) and torch.equal(a.xs, b.xs)
    assert torch.equal(a.xq[:, :3], b.xq)


def test_episode_shapes_and_function():
    ep = SinusoidTasks(seed=1).sample(0, range(6), shots=10, query=20)
    assert ep.num_tasks == 6
    assert ep.xs.shape == ep.ys.shape == (6, 10, 1) and ep.xq.shape == ep.yq.shape == (6, 20, 1)
    assert ep.xs.dtype == torch.float32
    amp, phase = ep.info["amplitude"].double(), ep.info["phase"].double()
    for x, y in ((ep.xs, ep.ys), (ep.xq, ep.yq)):
        expected = amp[:, None, None] * torch.sin(x.double() + phase[:, None, None])
        torch.testing.assert_close(y.double(), expected, rtol=0, atol=1e-5)


def test_distributions_follow_the_maml_protocol():
    ep = SinusoidTasks(seed=0).sample(0, range(4000), shots=5, query=5)
    amp, phase = ep.info["amplitude"], ep.info["phase"]
    x = torch.cat([ep.xs, ep.xq], 1).flatten()
    assert amp.min() >= 0.1 and amp.max() <= 5.0
    assert phase.min() >= 0.0 and phase.max() <= math.pi
    assert x.min() >= -5.0 and x.max() <= 5.0
    # Uniform: means and deciles within a few standard errors (n = 4000 tasks, 40000 points).
    assert abs(amp.mean().item() - 2.55) < 0.08 and abs(phase.mean().item() - math.pi / 2) < 0.05
    assert abs(x.mean().item()) < 0.05
    deciles = torch.quantile(amp, torch.linspace(0.1, 0.9, 9))
    torch.testing.assert_close(deciles, 0.1 + 4.9 * torch.linspace(0.1, 0.9, 9), rtol=0, atol=0.15)
    # Independent draws: amplitude, phase and the first x of a task, and the amplitudes of neighbours.
    pairs = [(amp, phase), (amp, ep.xs[:, 0, 0]), (phase, ep.xs[:, 0, 0]), (amp[:-1], amp[1:])]
    for a, b in pairs:
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.06


def test_uniforms_are_in_the_unit_interval():
    u = uniforms(task_seeds(0, "train", 0, range(200)), 50)
    assert u.shape == (200, 50) and u.dtype == torch.float64
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005


def test_custom_ranges_from_config():
    cfg = from_dict({"seed": 9, "task": {"amplitude": [1.0, 2.0], "phase": [0.5, 0.6], "x_range": [0.0, 1.0]}})
    tasks = build_tasks(cfg)
    assert isinstance(tasks, SinusoidTasks) and tasks.seed == 9
    ep = tasks.sample(0, range(500), 5, 5)
    assert 1.0 <= ep.info["amplitude"].min() and ep.info["amplitude"].max() <= 2.0
    assert 0.5 <= ep.info["phase"].min() and ep.info["phase"].max() <= 0.6
    assert 0.0 <= ep.xs.min() and ep.xs.max() <= 1.0


def test_fixed_evaluation_tasks():
    tasks = SinusoidTasks(seed=0)
    test = tasks.fixed("test", 50, shots=5, query=100)
    assert test.num_tasks == 50 and test.xq.shape == (50, 100, 1)
    # Identical across calls and across objects (two runs, two algorithms).
    assert_same_tasks(test, tasks.fixed("test", 50, 5, 100))
    assert_same_tasks(test, SinusoidTasks(seed=0).fixed("test", 50, 5, 100))
    # A longer list extends a shorter one.
    assert_same_tasks(tasks.fixed("test", 20, 5, 100), test.slice(0, 20))
    # They are not training tasks of any early step, nor another split's tasks.
    amps = set(test.info["amplitude"].tolist())
    for step in range(200):
        assert not amps & set(tasks.sample(step, range(50), 5, 100).info["amplitude"].tolist())
    for split in ("train", "val"):
        assert not amps & set(tasks.fixed(split, 50, 5, 100).info["amplitude"].tolist())
    assert not torch.equal(SinusoidTasks(seed=1).fixed("test", 50, 5, 100).xs, test.xs)


def test_fewshot_without_a_dataset_is_a_config_error():
    from metadist.config import ConfigError

    cfg = from_dict({"task": {"family": "fewshot"}, "model": {"name": "conv4"}})
    with pytest.raises(ConfigError, match="data.path"):
        build_tasks(cfg)


# --------------------------------------------------------------------------------------------- Episode

def _episode(tasks=5):
    ep = SinusoidTasks(seed=2).sample(0, range(tasks), 3, 4)
    return ep


def test_episode_slice_chunks_and_cat():
    ep = _episode(5)
    part = ep.slice(1, 3)
    assert part.num_tasks == 2 and torch.equal(part.xs, ep.xs[1:3])
    assert torch.equal(part.info["amplitude"], ep.info["amplitude"][1:3])
    assert [c.num_tasks for c in ep.chunks(2)] == [2, 2, 1]
    assert [c.num_tasks for c in ep.chunks(0)] == [5] and [c.num_tasks for c in ep.chunks(9)] == [5]
    assert_same_tasks(Episode.cat(ep.chunks(2)), ep)
    moved = ep.to(torch.device("cpu"))
    assert_same_tasks(moved, ep)


def test_noise_image_episodes_are_a_pure_function_of_seed_step_and_index():
    from metadist.tasks import NoiseImageTasks

    tasks = NoiseImageTasks(seed=0, ways=3, channels=1, image_size=16)
    whole = tasks.sample(5, range(4), shots=2, query=3)
    part = tasks.sample(5, range(2, 4), shots=2, query=3)
    assert whole.xs.shape == (4, 6, 1, 16, 16) and whole.xq.shape == (4, 9, 1, 16, 16)
    assert torch.equal(whole.xs[2:], part.xs) and torch.equal(whole.xq[2:], part.xq)
    assert whole.ys[0].tolist() == [0, 0, 1, 1, 2, 2]
    assert not torch.equal(tasks.sample(6, range(1), 2, 3).xs[0], whole.xs[0])

"""Reducer benchmark: the driver reduce (torch tensors or numpy buffers), the all-reduce, and the same
step in-process, timed in one run at W = 2 workers.

Part 1, the step, through the real code paths (`Trainer` on each executor). Four drivers stay alive
side by side and take outer steps in turn, so that background load falls on all alike: `local` (in this
process), `ray` with W = 1 and W = 2 worker actors (the driver reduce, numpy buffers), and `collective`
with W = 2 Ray Train ranks (the all-reduce, gloo), whose ranks wait at a gate between steps so that the
driver can interleave them. Each worker, rank or in-process driver runs 1 torch thread
(runtime.threads=1: two workers on the two cores), all at the same priority (Ray's workers at nice 0,
as the driver, instead of Ray's default 15), and computes the same share of B tasks: the local and
W = 1 steps have meta-batch B, the W = 2 steps 2B (weak scaling). The compute is real: the second-order
MAML meta-gradient of the mini-ImageNet-size Conv-4 (84 px, 32 filters, 5-way 1-shot, 15 query per
class, 5 inner steps) on random-pixel episodes (no data loading).

    scaling efficiency at W = tasks/s at W / (W x tasks/s in-process) = T_local / T_W

with T the median step time. Communication is each executor's own measure: the step inside the executor
minus the slowest worker's compute (ray: parameter put, calls, result transfer, the driver's sum; collective:
packing and the all-reduce, taken on the rank that waited least).

Part 2, the communication alone, for P float32 values (Conv-4's P, 1M, 4M and ResNet-12's 12.4M), on the
real transports, interleaved within every repeat: the driver reduce at W = 1 and 2 with torch tensors
through the object store (the transport before numpy), the same with numpy buffers (what the Ray executor
sends now: zero-copy within a node, one copy by the worker to own the parameters, the driver's in-place
sum), and the gloo all-reduce of one flat buffer between 2 actors (torch.distributed, as the collective
executor's ranks call it; timed inside the ranks after a barrier, the slower rank's time).

Part 3, the cost model (bench/costmodel.py) fitted to part 2: the crossover, and the cost of each path at
8, 64 and 256 GPUs, where the network and NCCL figures are assumptions, printed as such.

    python bench/reducer.py                      # everything (4 to 5 minutes on 2 busy cores)
    python bench/reducer.py --steps 3 --repeats 3 --sizes 1M     # a smoke test
    python bench/reducer.py --steps 0            # part 2 and 3 only
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from costmodel import (Cluster, DriverCost, RingCost, crossover_params, crossover_workers,  # noqa: E402
                       payback_steps, project, scaling_efficiency)
from metadist.config import from_dict  # noqa: E402
from metadist.models import build_model  # noqa: E402
from metadist.runtime import cluster  # noqa: E402
from metadist.runtime.driver import Callback, Every, Trainer  # noqa: E402
from metadist.runtime.ray_executor import readonly_view  # noqa: E402

CONFIGS = {
    # The mini-ImageNet-size Conv-4 of bench/inner_loop.py (random pixels: no data loading).
    "conv4": {"task": {"family": "noise", "ways": 5, "shots": 1, "query": 15},
              "model": {"name": "conv4", "filters": 32, "channels": 3, "image_size": 84},
              "inner": {"lr": 0.01, "steps": 5}, "algorithm": {"task_parallel": "loop"}},
    # The sinusoid MLP: a whole step takes milliseconds, the latency floor of each path shows.
    "sinusoid": {"inner": {"lr": 0.01, "steps": 1}, "algorithm": {"task_parallel": "vmap"}},
}
SHARE = {"conv4": 2, "sinusoid": 25}  # tasks per worker per step (B)
RESNET12 = 12_400_000  # ResNet-12 as used for mini-ImageNet (64-160-320-640 channels)
PATHS = ("local", "ray W=1", "ray W=2", "collective W=2")


def param_count(name: str) -> int:
    return sum(p.numel() for p in build_model(from_dict(CONFIGS[name])).parameters())


def job(name: str, executor: str, workers: int, share: int, steps: int, out: Path):
    """The run config of one path: meta-batch share x workers, 1 thread per process, evaluation minimal."""
    return from_dict({**CONFIGS[name], "name": f"reducer-{executor}{workers}",
                      "train": {"meta_batch": share * workers, "steps": steps, "log_every": 10 ** 6,
                                "warmup_steps": 0, "out_dir": str(out)},
                      "eval": {"episodes": 1, "steps": 1, "batch": 1, "val_episodes": 1, "query": 1},
                      "tracking": {"enabled": False},
                      "runtime": {"executor": executor, "workers": workers, "threads": 1,
                                  "cpus_per_worker": 0.4, "collective_timeout_s": 600}})


# -- part 1: the step -------------------------------------------------------------------------------------
@ray.remote(num_cpus=0)
class Gate:
    """Holds the collective ranks between steps, so that the driver takes their steps in turn with the
    others', and collects each rank's timing of each step."""

    def __init__(self, world: int):
        self.world, self.opened, self.records = world, 0, {}
        self.cond = asyncio.Condition()

    async def arrive(self, rank: int, done: int, record: dict) -> None:
        """A rank finished step `done` - 1: record it, and wait until step `done` may start."""
        async with self.cond:
            self.records.setdefault(done, {})[rank] = record
            self.cond.notify_all()
            await self.cond.wait_for(lambda: self.opened >= done)

    async def open(self, step: int) -> None:
        async with self.cond:
            self.opened = max(self.opened, step)
            self.cond.notify_all()

    async def collect(self, done: int) -> dict:
        """Every rank's record of step `done` - 1, once all have arrived."""
        async with self.cond:
            await self.cond.wait_for(lambda: len(self.records.get(done, {})) == self.world)
            return self.records[done]


def at_gate(gate, trainer) -> None:
    """A rank callback: this step's times (the clock's window is this one step), then wait at the gate."""
    clock = trainer.clock.read()
    # `walls`: every step's wall time so far (warmup_steps is 0). After the first step the logging callback,
    # which runs before this one, has read the window; only the group's start cost needs that step's time.
    record = {"step_s": clock["time_step_s"], "compute_s": clock["time_compute_s"],
              "comm_s": clock["time_comm_s"], "now": time.time(), "walls": trainer.clock.steady_s}
    ray.get(gate.arrive.remote(trainer.executor.rank, trainer.step, record))


class CollectiveRun:
    """`Trainer.fit` of a collective run in a thread of this process, its ranks stepping at the gate."""

    def __init__(self, cfg):
        self.gate = Gate.remote(cfg.runtime.workers)
        self.trainer = Trainer(cfg)
        self.trainer.rank_callbacks.append(Callback(Every(1), functools.partial(at_gate, self.gate)))
        self.error: BaseException | None = None
        self.started = time.time()
        self.thread = threading.Thread(target=self._fit, daemon=True)
        self.thread.start()

    def _fit(self) -> None:
        try:
            self.trainer.fit(progress=False)
        except BaseException as err:  # raised again in the driver's thread by `step`
            self.error = err

    def step(self, done: int) -> list[dict]:
        """Let step `done` - 1 run (step 0 runs as soon as the group is up), and return its rank records."""
        if done > 1:
            ray.get(self.gate.open.remote(done - 1))
        ref = self.gate.collect.remote(done)
        while not ray.wait([ref], timeout=2.0)[0]:
            if not self.thread.is_alive():
                raise RuntimeError(f"the collective group ended before step {done - 1}: {self.error!r}")
        return list(ray.get(ref).values())

    def finish(self) -> None:
        ray.get(self.gate.open.remote(10 ** 9))  # the last step and the final checkpoint run unheld
        self.thread.join(timeout=300)
        if self.error is not None:
            raise self.error


def bench_steps(name: str, share: int, steps: int, out: Path, log) -> dict:
    """Part 1: per path, the medians of step time, compute and communication over `steps` steps after
    one warm-up step, and the start costs of the two Ray paths."""
    torch.set_num_threads(1)
    total = 2 + steps + 1  # the group's first step, one warm-up, the timed steps, an untimed last step
    log(f"part 1: {name}, {share} tasks per worker, {steps} timed steps per path")
    coll = CollectiveRun(job(name, "collective", 2, share, total, out))
    first = coll.step(1)  # alone on the machine: its start cost is not inflated by the other paths
    start_collective = max(r["now"] - r["walls"] for r in first) - coll.started
    drivers = {}
    rows = {k: [] for k in PATHS}
    try:
        t0 = time.perf_counter()
        drivers["ray W=2"] = Trainer(job(name, "ray", 2, share, 10 ** 6, out))
        drivers["ray W=2"].start()
        start_ray = time.perf_counter() - t0
        drivers["ray W=1"] = Trainer(job(name, "ray", 1, share, 10 ** 6, out))
        drivers["local"] = Trainer(job(name, "local", 1, share, 10 ** 6, out))
        for d in drivers.values():
            d.start()
        for i in range(1 + steps):
            for label in ("local", "ray W=1", "ray W=2"):
                d = drivers[label]
                d.train_step()
                c = d.clock.read()  # this one step
                rows[label].append({"step_s": c["time_step_s"], "compute_s": c["time_compute_s"],
                                    "comm_s": c["time_comm_s"]})
            recs = coll.step(2 + i)
            rows["collective W=2"].append({"step_s": max(r["step_s"] for r in recs),
                                           "compute_s": max(r["compute_s"] for r in recs),
                                           "comm_s": min(r["comm_s"] for r in recs)})
            log(f"  round {i + 1}/{1 + steps}: " + ", ".join(f"{k} {rows[k][-1]['step_s']:.3f} s" for k in PATHS))
    finally:
        for d in drivers.values():
            d.close()
        coll.finish()
    med = {k: {m: statistics.median(r[m] for r in v[1:]) for m in ("step_s", "compute_s", "comm_s")}
           for k, v in rows.items()}
    return {"config": name, "share": share, "steps": steps, "median": med,
            "start_s": {"ray W=2": start_ray, "collective W=2": start_collective}}


# -- part 2: the communication alone ------------------------------------------------------------------------
@ray.remote(num_cpus=0)
class Echo:
    """Receives the parameters as a worker does and returns a gradient-sized result: `call` as torch
    tensors (the transport before numpy), `call_np` as the Ray executor does now (a numpy buffer in, one
    copy to own it, a numpy buffer out)."""

    def call(self, flat: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(flat)

    def call_np(self, flat: np.ndarray) -> np.ndarray:
        return torch.zeros_like(torch.from_numpy(flat.copy())).numpy()


@ray.remote(num_cpus=0)
class Peer:
    """One rank of a gloo group: the collective executor's all-reduce of one flat buffer, alone."""

    def __init__(self, rank: int, world: int, address: str):
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://{address}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=120))
        self.buffers: dict[int, torch.Tensor] = {}

    def all_reduce(self, params: int) -> float:
        import torch.distributed as dist

        flat = self.buffers.setdefault(params, torch.zeros(params))
        dist.barrier()  # both ranks start together: the time is the collective's, not the other's lag
        start = time.perf_counter()
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        return time.perf_counter() - start

    def close(self) -> None:
        import torch.distributed as dist

        dist.destroy_process_group()


def driver_reduce(echos, flat: torch.Tensor, numpy: bool) -> float:
    """One step's communication on the driver path: put once, every worker's round trip, the driver's sum."""
    start = time.perf_counter()
    ref = ray.put(flat.numpy() if numpy else flat)
    driver_sum(ray.get([(e.call_np if numpy else e.call).remote(ref) for e in echos]), numpy)
    return time.perf_counter() - start


def driver_sum(outs: list, numpy: bool) -> torch.Tensor:
    """The driver's sum of the workers' results: numpy buffers read in place, as RayExecutor.compute does;
    torch tensors, which arrive as writable copies, added into the first."""
    total = readonly_view(outs[0]).clone() if numpy else outs[0]
    for out in outs[1:]:
        total.add_(readonly_view(out) if numpy else out)
    return total


def driver_serial(echos, flat: torch.Tensor, numpy: bool, results: int = 8) -> float:
    """The driver's own work per worker, which grows with W wherever the workers run: submitting the call,
    then (once every result is in the object store) receiving it and adding it; per result, of `results`."""
    ref = ray.put(flat.numpy() if numpy else flat)
    start = time.perf_counter()
    refs = [(echos[i % len(echos)].call_np if numpy else echos[i % len(echos)].call).remote(ref)
            for i in range(results)]
    submit = time.perf_counter() - start
    ray.wait(refs, num_returns=len(refs))
    start = time.perf_counter()
    driver_sum(ray.get(refs), numpy)
    return (submit + time.perf_counter() - start) / results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_transports(sizes: list[int], repeats: int, log) -> list[dict]:
    """Part 2: per size, the median over `repeats` of each transport, taken in turn within each repeat (the
    order rotating from one repeat to the next)."""
    echos = [Echo.remote() for _ in range(2)]
    address = f"127.0.0.1:{free_port()}"
    peers = [Peer.remote(rank, 2, address) for rank in range(2)]
    for e in echos:
        ray.get([e.call.remote(torch.zeros(8)), e.call_np.remote(np.zeros(8, np.float32))])
    ray.get([p.all_reduce.remote(8) for p in peers])
    rows = []
    try:
        for p in sizes:
            log(f"part 2: {p:,} values, {repeats} repeats")
            flat = torch.randn(p)
            runs = {
                "torch W=1": lambda: driver_reduce(echos[:1], flat, numpy=False),
                "torch W=2": lambda: driver_reduce(echos, flat, numpy=False),
                "numpy W=1": lambda: driver_reduce(echos[:1], flat, numpy=True),
                "numpy W=2": lambda: driver_reduce(echos, flat, numpy=True),
                "all-reduce W=2": lambda: max(ray.get([q.all_reduce.remote(p) for q in peers])),
                "torch serial": lambda: driver_serial(echos, flat, numpy=False),
                "numpy serial": lambda: driver_serial(echos, flat, numpy=True),
            }
            for fn in runs.values():  # one untimed call each: the buffers and the store's pages
                fn()
            times = {k: [] for k in runs}
            for r in range(repeats):
                order = list(runs)[r % len(runs):] + list(runs)[:r % len(runs)]
                for k in order:
                    times[k].append(runs[k]())
            rows.append({"params": p, **{k: statistics.median(v) for k, v in times.items()}})
    finally:
        ray.get([q.close.remote() for q in peers])
        for actor in echos + peers:
            ray.kill(actor)
    return rows


# -- output ---------------------------------------------------------------------------------------------
def ms(s: float) -> str:
    return f"{1e3 * s:.1f}" if s < 10 else f"{s:.0f} s"


def short(p: float) -> str:
    return f"{p / 1e6:g}M" if p >= 1e6 else f"{p / 1e3:.0f}k"


def print_steps(res: dict) -> dict:
    med, b = res["median"], res["share"]
    local = med["local"]["step_s"]
    print(f"\n### The step: {res['config']}, {b} tasks per worker, medians of {res['steps']} interleaved steps\n")
    print("| path | W | tasks per step | step (s) | slowest worker's compute (s) | communication (ms) | tasks/s | "
          "scaling efficiency | of which: compute (the cores) | of which: step in compute (the reducer) |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    names = {"local": "in-process (`local`)", "ray W=1": "driver reduce (`ray`), numpy",
             "ray W=2": "driver reduce (`ray`), numpy", "collective W=2": "all-reduce (`collective`), gloo"}
    eff = {}
    for k in PATHS:
        w = 2 if k.endswith("W=2") else 1
        m = med[k]
        eff[k] = scaling_efficiency(local, m["step_s"])
        if k == "local":
            note = "- | - | -"
        elif w == 1:
            note = f"overhead {100 * (m['step_s'] / local - 1):+.1f}% | - | -"
        else:  # T_local / T_W = (C_local / C_W) (C_W / T_W), as T_local is all compute
            note = (f"{100 * eff[k]:.1f}% | {100 * med['local']['compute_s'] / m['compute_s']:.1f}% | "
                    f"{100 * m['compute_s'] / m['step_s']:.1f}%")
        print(f"| {names[k]} | {w} | {b * w} | {m['step_s']:.4g} | {m['compute_s']:.4g} | {ms(m['comm_s'])} | "
              f"{b * w / m['step_s']:.2f} | {note} |")
    s = res["start_s"]
    print(f"\nStart: the `ray` executor's 2 workers {s['ray W=2']:.1f} s; the `collective` group "
          f"{s['collective W=2']:.1f} s (from `fit` until its first step began).")
    return eff


def print_transports(rows: list[dict]) -> None:
    print("\n### Communication alone, W = 2 (medians, ms per step, interleaved)\n")
    print("| params P | MB | driver, torch | driver, numpy | all-reduce (gloo) | torch / numpy | "
          "all-reduce / torch | all-reduce / numpy | driver W=1: torch / numpy | driver's serial part per worker: "
          "torch / numpy |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ar, t2, n2 = r["all-reduce W=2"], r["torch W=2"], r["numpy W=2"]
        print(f"| {r['params']:,} | {4 * r['params'] / 1e6:.2f} | {ms(t2)} | {ms(n2)} | {ms(ar)} | {t2 / n2:.1f}x | "
              f"{ar / t2:.2f} | {ar / n2:.2f} | {ms(r['torch W=1'])} / {ms(r['numpy W=1'])} | "
              f"{ms(r['torch serial'])} / {ms(r['numpy serial'])} |")


def fit_models(rows: list[dict]) -> dict:
    fits = {kind: DriverCost.fit({r["params"]: r[f"{kind} W=1"] for r in rows},
                                 {r["params"]: r[f"{kind} serial"] for r in rows}) for kind in ("torch", "numpy")}
    fits["gloo"] = RingCost.fit({r["params"]: r["all-reduce W=2"] for r in rows})
    return fits


def print_model(fits: dict, rows: list[dict], start: dict | None, cl: Cluster) -> None:
    sizes = [r["params"] for r in rows]
    print("\n### Cost model fitted to the table above (least squares on relative errors)\n")
    print("T_drv(W, P) = fixed + W x per worker (the driver's serial part); T_ar(W, P) = 2(W-1) hops + "
          "2(W-1)/W x 4P bytes\n")
    print("| path | fixed per step | fixed per MB | per worker | per worker per MB | model at W=2 against "
          "measured (" + ", ".join(short(p) for p in sizes) + ") |\n|---|---|---|---|---|---|")
    for kind in ("torch", "numpy"):
        f = fits[kind]
        check = ", ".join(f"{ms(f(2, r['params']))}/{ms(r[f'{kind} W=2'])}" for r in rows)
        print(f"| driver reduce, {kind} | {1e3 * f.fixed:.2f} ms | {1e3 * f.fixed_value * 2.5e5:.2f} ms | "
              f"{1e3 * f.worker:.2f} ms | {1e3 * f.worker_value * 2.5e5:.2f} ms | {check} |")
    g = fits["gloo"]
    print(f"| all-reduce, gloo | {1e3 * g.hop:.2f} ms per hop | {1e3 * g.value * 2.5e5:.2f} ms per MB per rank "
          f"| - | - | " + ", ".join(f"{ms(g(2, r['params']))}/{ms(r['all-reduce W=2'])}" for r in rows) + " |")
    print("\nCrossover, this machine's fitted costs:")
    for kind in ("torch", "numpy"):
        f = fits[kind]
        p_star, ring_first = crossover_params(f, g, 2), g(2, 0) < f(2, 0)
        where = (("at every P" if ring_first else "at no P") if p_star is None else
                 f"{'below' if ring_first else 'above'} P = {p_star:,.0f}")
        ws = [crossover_workers(f, g, p) for p in sizes]
        print(f"- gloo all-reduce against the {kind} driver reduce: cheaper at W=2 {where}; the smallest W where "
              f"it is cheaper: " + ", ".join(f"{w} ({short(p)})" for p, w in zip(sizes, ws)))
    if start is not None:
        extra = start["collective W=2"] - start["ray W=2"]
        print(f"- per run: the group starts {extra:.1f} s later than the workers, which the all-reduce pays back "
              f"after " + ", ".join(f"{payback_steps(extra, r['numpy W=2'] - r['all-reduce W=2']):,.0f} ({short(r['params'])})"
                                    for r in rows) + " steps at W=2 against the numpy driver reduce")

    print(f"\n### Projection (ms per step): the driver's costs as fitted here, plus ASSUMED hardware (not measured): "
          f"{cl.gpus_per_node} GPUs per node, driver NIC {cl.nic_gbps:g} Gb/s, PCIe {cl.pcie_gbytes_s:g} GB/s, NCCL "
          f"bus bandwidth {cl.nvlink_gbytes_s:g} GB/s in a node and {cl.network_gbytes_s:g} GB/s across nodes, "
          f"{1e6 * cl.hop_s:g} us per NCCL step, {'2 log2 W (tree)' if cl.tree else '2(W-1) (ring)'} steps\n")
    print("| params P | GPUs | driver, torch | driver, numpy | all-reduce (NCCL) | compute per worker for 90% "
          "efficiency: numpy driver / all-reduce |\n|---|---|---|---|---|---|")
    for p in sizes:
        for w in (8, 64, 256):
            t_drv, ring = project(fits["torch"], cl, w, p)
            n_drv, _ = project(fits["numpy"], cl, w, p)
            print(f"| {short(p)} | {w} | {ms(t_drv)} | {ms(n_drv)} | {1e3 * ring:.2f} | {ms(9 * n_drv)} / "
                  f"{1e3 * 9 * ring:.1f} |")


def print_goals(eff: dict | None, rows: list[dict], config: str) -> None:
    by = {r["params"]: r for r in rows}
    lines = []
    if eff is not None and config == "conv4":  # the goal is set for Conv-4
        for k, label in (("ray W=2", "ray"), ("collective W=2", "collective")):
            lines.append(f"| {config}, W=2: scaling efficiency of `{label}` >= 85% | {100 * eff[k]:.1f}% | "
                         f"{'yes' if eff[k] >= 0.85 else 'no'} |")
    if RESNET12 in by:
        r = by[RESNET12]
        q = r["all-reduce W=2"] / r["torch W=2"]
        lines.append(f"| 12.4M: all-reduce <= 1/3 of the torch-tensor driver reduce | {q:.2f} | "
                     f"{'yes' if q <= 1 / 3 else 'no'} |")
    for p in sorted(by):
        if p >= 4_000_000:
            x = by[p]["torch W=2"] / by[p]["numpy W=2"]
            lines.append(f"| {short(p)}: numpy driver reduce >= 3x faster than torch tensors | {x:.1f}x | "
                         f"{'yes' if x >= 3 else 'no'} |")
    if lines:
        print("\n### Goals (ratios within this run)\n\n| goal | measured | met |\n|---|---|---|")
        print("\n".join(lines))


def parse_size(text: str) -> int:
    text = text.strip()
    if text.lower() == "conv4":
        return param_count("conv4")
    scale = {"k": 1e3, "m": 1e6}.get(text[-1].lower(), 1)
    return int(float(text[:-1] if scale != 1 else text) * scale)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=list(CONFIGS), default="conv4", help="the model of part 1")
    ap.add_argument("--share", type=int, help="tasks per worker per step (default: 2 for conv4, 25 sinusoid)")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per path in part 1; 0 skips part 1")
    ap.add_argument("--sizes", default="conv4,1M,4M,12.4M", help="parameter counts of part 2; '' skips it")
    ap.add_argument("--repeats", type=int, default=15, help="repeats per size and transport in part 2")
    ap.add_argument("--store-mb", type=int, default=1500, help="object store of the local Ray")
    args = ap.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    # Ray starts its workers at nice 15 and leaves the driver at 0: on a busy machine the in-process path
    # would then compete at a higher priority than the workers it is compared with. Equal footing: 0.
    os.environ.setdefault("RAY_worker_niceness", "0")
    # A local Ray of its own (never a cluster on this machine), 2 CPUs: the five workers of part 1 ask 0.4
    # each (they take turns: one path computes at a time). The
    # dashboard is on because Ray Train's placement-group cleaner needs its state API.
    cluster.connect(None, num_cpus=2, object_store_mb=args.store_mb, dashboard=True, log_to_driver=False)
    torch.set_num_threads(1)  # the driver's sums, as the Trainer of part 1 leaves it (runtime.threads=1)
    began = time.perf_counter()
    try:
        steps = rows = None
        if args.steps > 0:
            with tempfile.TemporaryDirectory() as out:
                steps = bench_steps(args.config, args.share or SHARE[args.config], args.steps, Path(out), log)
        if sizes:
            rows = bench_transports(sizes, args.repeats, log)
    finally:
        ray.shutdown()
    print("`python bench/reducer.py" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv)) + "`")
    print(f"torch {torch.__version__}, ray {ray.__version__}, {torch.get_num_threads()} torch thread(s) in the "
          f"driver; Ray workers at nice {os.environ['RAY_worker_niceness']} (the driver at {os.nice(0)}); load average "
          f"at the end {', '.join(f'{x:.1f}' for x in os.getloadavg())}; "
          f"{time.perf_counter() - began:.0f} s")
    eff = print_steps(steps) if steps else None
    if rows:
        print_transports(rows)
        if len(rows) >= 2:
            print_model(fit_models(rows), rows, steps["start_s"] if steps else None, Cluster())
        print_goals(eff, rows, args.config)
    elif eff:
        print_goals(eff, [], args.config)


if __name__ == "__main__":
    main()

"""Ray executor overhead and scaling, measured against the local executor in the same run.

For each config, three drivers stay alive side by side and take outer steps in turn (so background load
falls on all alike): `local` (in-process, 1 thread), `ray` with W=1 worker and `ray` with W=2 workers
(1 thread each). Reported per config: median step time of each, the Ray overhead at W=1
(ray W=1 / local - 1), the time split of a Ray step (worker compute / communication / driver), and the
scaling efficiency at W=2 (tasks/s at W=2 over twice the tasks/s at W=1).

Then the pieces of a cost model (docs/scaling.md): for a flat gradient of P float32 values, the time to
`ray.put` the parameters, the round trip of a worker call that receives them and returns a gradient of
the same size, and the driver's sum per worker result.

    python bench/ray_overhead.py                 # both configs (about 5 minutes on 2 cores)
    python bench/ray_overhead.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metadist.config import from_dict  # noqa: E402
from metadist.runtime.driver import StepClock, Trainer  # noqa: E402
from metadist.runtime.ray_executor import readonly_view  # noqa: E402

CONFIGS = {
    # The mini-ImageNet-size Conv-4 config of bench/inner_loop.py: 84 px, 3 channels, 32 filters,
    # 5-way 1-shot, 15 query per class, 5 inner steps, meta-batch 4 (random pixels: no data loading).
    "miniimagenet": {"task": {"family": "noise", "ways": 5, "shots": 1, "query": 15},
                     "model": {"name": "conv4", "filters": 32, "channels": 3, "image_size": 84},
                     "inner": {"lr": 0.01, "steps": 5}, "train": {"meta_batch": 4},
                     "algorithm": {"task_parallel": "loop"}},
    "sinusoid": {"inner": {"lr": 0.01, "steps": 1}, "train": {"meta_batch": 25},
                 "algorithm": {"task_parallel": "vmap"}},
}


def driver(base: dict, executor: str, workers: int, tmp: Path) -> Trainer:
    cfg = from_dict({**base, "name": f"bench-{executor}{workers}",
                     "train": {**base["train"], "steps": 10 ** 6, "log_every": 10 ** 6, "out_dir": str(tmp)},
                     "runtime": {"executor": executor, "workers": workers, "threads": 1,
                                 "cpus_per_worker": 0.5}})
    trainer = Trainer(cfg)
    trainer.start()
    return trainer


def bench_config(name: str, steps: int, tmp: Path) -> dict:
    base = CONFIGS[name]
    torch.set_num_threads(1)
    drivers = {"local": driver(base, "local", 1, tmp), "ray W=1": driver(base, "ray", 1, tmp),
               "ray W=2": driver(base, "ray", 2, tmp)}
    wall = {k: [] for k in drivers}
    for i in range(steps + 2):
        for label, d in drivers.items():
            if i == 2:
                d.clock = StepClock(0)  # two warm-up steps each, left out of the time split
            start = time.perf_counter()
            d.train_step()
            if i >= 2:
                wall[label].append(time.perf_counter() - start)
    split = {k: d.clock.read() for k, d in drivers.items()}
    for d in drivers.values():
        d.close()
    tasks = base["train"]["meta_batch"]
    med = {k: statistics.median(v) for k, v in wall.items()}
    return {"config": name, "median_step_s": med, "tasks_per_s": {k: tasks / v for k, v in med.items()},
            "split": split,
            "overhead_w1": med["ray W=1"] / med["local"] - 1,
            "efficiency_w2": (tasks / med["ray W=2"]) / (2 * tasks / med["ray W=1"])}


@ray.remote(num_cpus=0.5)
class Echo:
    """Receives the parameters like a worker does and returns a gradient-sized result: `call` as torch
    tensors (the transport before numpy), `call_np` as the Ray executor does now (a numpy buffer in, one
    copy to own it, a numpy buffer out)."""

    def call(self, flat: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(flat)

    def call_np(self, flat: np.ndarray) -> np.ndarray:
        return torch.zeros_like(torch.from_numpy(flat.copy())).numpy()


def cost_model(sizes: list[int], repeats: int) -> list[dict]:
    """Per size, interleaved so that load falls on both alike: put, round trip and driver sum of the
    torch transport, and the numpy transport's round trip (put included, as one step pays it)."""
    echo = Echo.remote()
    ray.get([echo.call.remote(torch.zeros(10)), echo.call_np.remote(np.zeros(10, np.float32))])
    rows = []
    for p in sizes:
        flat = torch.randn(p)
        put, trip, add, trip_np = [], [], [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            ref = ray.put(flat)
            t1 = time.perf_counter()
            out = ray.get(echo.call.remote(ref))
            t2 = time.perf_counter()
            _ = flat + out
            t3 = time.perf_counter()
            out_np = ray.get(echo.call_np.remote(ray.put(flat.numpy())))
            _ = flat + readonly_view(out_np)  # the driver reads the workers' buffers in place
            t4 = time.perf_counter()
            put.append(t1 - t0)
            trip.append(t2 - t1)
            add.append(t3 - t2)
            trip_np.append(t4 - t3)
        rows.append({"params": p, "MB": 4 * p / 1e6, "put_ms": 1e3 * statistics.median(put),
                     "round_trip_ms": 1e3 * statistics.median(trip), "sum_ms": 1e3 * statistics.median(add),
                     "numpy_ms": 1e3 * statistics.median(trip_np)})
    ray.kill(echo)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--quick", action="store_true", help="a few steps only: a smoke test")
    args = ap.parse_args(argv)
    import tempfile

    ray.init(num_cpus=2, object_store_memory=400 * 1024 * 1024, include_dashboard=False,
             configure_logging=False, log_to_driver=False)
    try:
        results = []
        with tempfile.TemporaryDirectory() as tmp:
            for name in filter(None, args.configs.split(",")):  # --configs "": the cost model only
                steps = {"miniimagenet": 3 if args.quick else 12, "sinusoid": 20 if args.quick else 300}[name]
                print(f"{name}: {steps} timed steps per driver", file=sys.stderr, flush=True)
                results.append(bench_config(name, steps, Path(tmp)))
        print("| config | local step (s) | ray W=1 step (s) | ray W=2 step (s) | overhead at W=1 | "
              "W=1 compute / comm / driver (ms) | scaling efficiency W=2 |\n|---|---|---|---|---|---|---|")
        for r in results:
            m, s = r["median_step_s"], r["split"]["ray W=1"]
            print(f"| {r['config']} | {m['local']:.4f} | {m['ray W=1']:.4f} | {m['ray W=2']:.4f} | "
                  f"{100 * r['overhead_w1']:+.1f}% | {1e3 * s['time_compute_s']:.1f} / {1e3 * s['time_comm_s']:.1f} / "
                  f"{1e3 * s['time_driver_s']:.1f} | {100 * r['efficiency_w2']:.0f}% |")
        from metadist.models import build_model
        counts = {n: sum(p.numel() for p in build_model(from_dict(c)).parameters()) for n, c in CONFIGS.items()}
        # ResNet-12 as used for mini-ImageNet (64-160-320-640 channels): about 12.4M parameters.
        sizes = [counts["sinusoid"], counts["miniimagenet"], 1_000_000, 4_000_000, 12_400_000]
        print("\n| params P | gradient MB | torch: ray.put (ms) | torch: worker round trip (ms) | "
              "torch: driver sum (ms) | numpy: put + round trip + sum (ms) | torch / numpy |\n"
              "|---|---|---|---|---|---|---|")
        for row in cost_model(sizes, 3 if args.quick else 10):
            torch_ms = row["put_ms"] + row["round_trip_ms"] + row["sum_ms"]
            print(f"| {row['params']:,} | {row['MB']:.2f} | {row['put_ms']:.2f} | {row['round_trip_ms']:.2f} | "
                  f"{row['sum_ms']:.2f} | {row['numpy_ms']:.2f} | {torch_ms / row['numpy_ms']:.1f}x |")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()

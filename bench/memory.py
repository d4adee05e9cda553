"""Peak memory and time per task of second-order MAML, with and without checkpointed inner steps.

For each model (Conv-4 with 32 filters, ResNet-12 64-160-320-640), 5-way 1-shot tasks with 15 query
images per class at 84 px, and 1, 5, 10 and 20 inner steps, one task's meta-gradient is computed by
`metadist.algorithms.maml` (task_parallel loop, batch statistics) with `inner.checkpoint` off and on.

Peak memory is what one task's meta-gradient allocates at most at once beyond what existed before it
(the model, the meta-parameters and the task), by `metadist.runtime.memory.PeakMemory`:
- CPU: every storage PyTorch's operations return, recorded through a dispatch mode with its size and
  forgotten when torch frees it (this sees the tensors autograd saves and those the backward pass makes;
  not the allocator's slack, nor memory outside PyTorch);
- CUDA: `torch.cuda.max_memory_allocated` above the memory allocated before the call.
The memory is measured on a first call (the warm-up); the time per task is the median of `--repeats`
calls after it, outside the tracker (whose Python hook on every CPU operation would be timed too).

The report gives both modes side by side with their ratios, the slope of peak memory against inner
steps (a least-squares line through the steps measured, MB per step) and the issue's goals for 10 steps:
checkpointed peak at most 1/3 of the plain one, at most 1.5x its time.

    python bench/memory.py                                   # the README table (about 20 min on 2 cores)
    python bench/memory.py --models conv4 --steps 1,5,10,20  # Conv-4 rows only
    python bench/memory.py --device cuda --precision bf16    # on a GPU, autocast bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metadist.algorithms.maml import maml  # noqa: E402
from metadist.algorithms.spec import InnerSpec  # noqa: E402
from metadist.episode import Episode  # noqa: E402
from metadist.models.conv4 import Conv4  # noqa: E402
from metadist.models.resnet12 import ResNet12  # noqa: E402
from metadist.runtime.memory import PeakMemory  # noqa: E402

MODELS = ("conv4", "resnet12")
GOAL_MEMORY, GOAL_TIME, GOAL_STEPS = 1 / 3, 1.5, 10


def build(model: str, ways: int, image_size: int, steps: int) -> torch.nn.Module:
    if model == "conv4":
        return Conv4(ways=ways, channels=3, filters=32, image_size=image_size, bn_steps=steps + 1)
    return ResNet12(ways=ways, channels=3, image_size=image_size, bn_steps=steps + 1)


def measure(model: str, steps: int, checkpoint: bool, ways: int, shots: int, query: int, image_size: int,
            lr: float, repeats: int, device: str, precision: str, threads: int) -> dict:
    """One configuration: peak memory of the first meta-gradient and the median time of the next calls."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    net = build(model, ways, image_size, steps).to(dev)
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    labels = torch.arange(ways, device=dev)
    batch = Episode(torch.rand(1, ways * shots, 3, image_size, image_size, device=dev),
                    labels.repeat(shots)[None], torch.rand(1, ways * query, 3, image_size, image_size, device=dev),
                    labels.repeat(query)[None])
    spec = InnerSpec(loss="ce", steps=steps, lr=lr, task_parallel="loop", checkpoint=checkpoint,
                     precision=precision, report_before=False)

    def call():
        grads, _ = maml(net, params, batch, spec)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return grads

    with PeakMemory(dev) as mem:
        grads = call()
    finite = all(torch.isfinite(g).all() for g in grads.values())
    del grads
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return {"model": model, "steps": steps, "checkpoint": checkpoint, "peak_mb": mem.peak / 2 ** 20,
            "time_s": statistics.median(times), "finite": finite,
            "params_m": sum(p.numel() for p in params.values()) / 1e6, "device": device,
            "precision": precision}


def slope(rows: list[dict]) -> float:
    """Least-squares MB per inner step through (steps, peak) of `rows`."""
    if len(rows) < 2:
        return float("nan")
    xs, ys = [r["steps"] for r in rows], [r["peak_mb"] for r in rows]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def report(results: list[dict]) -> list[str]:
    """The markdown table, the slopes and the goal lines."""
    lines = ["| model | inner steps | peak MB | peak MB, checkpointed | ratio | s/task | s/task, checkpointed | ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    goals = []
    for model in dict.fromkeys(r["model"] for r in results):
        plain = {r["steps"]: r for r in results if r["model"] == model and not r["checkpoint"]}
        ckpt = {r["steps"]: r for r in results if r["model"] == model and r["checkpoint"]}
        for steps in sorted(plain.keys() & ckpt.keys()):
            p, c = plain[steps], ckpt[steps]
            lines.append(f"| {model} | {steps} | {p['peak_mb']:.0f} | {c['peak_mb']:.0f} | "
                         f"{c['peak_mb'] / p['peak_mb']:.2f} | {p['time_s']:.2f} | {c['time_s']:.2f} | "
                         f"{c['time_s'] / p['time_s']:.2f} |")
        goals.append(f"{model}: slope {slope(list(plain.values())):.1f} MB per inner step, "
                     f"{slope(list(ckpt.values())):.1f} checkpointed")
        if GOAL_STEPS in plain and GOAL_STEPS in ckpt:
            p, c = plain[GOAL_STEPS], ckpt[GOAL_STEPS]
            mem, tim = c["peak_mb"] / p["peak_mb"], c["time_s"] / p["time_s"]
            goals.append(f"{model}, {GOAL_STEPS} steps: checkpointed peak {mem:.2f}x (goal <= {GOAL_MEMORY:.2f}: "
                         f"{'met' if mem <= GOAL_MEMORY else 'MISSED'}), time {tim:.2f}x (goal <= {GOAL_TIME}: "
                         f"{'met' if tim <= GOAL_TIME else 'MISSED'})")
    bad = [r for r in results if not r["finite"]]
    if bad:
        goals.append(f"non-finite meta-gradients in {len(bad)} configurations")
    return lines + [""] + goals


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated: conv4, resnet12")
    ap.add_argument("--steps", default="1,5,10,20", help="comma-separated inner steps")
    ap.add_argument("--ways", type=int, default=5)
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--query", type=int, default=15, help="query images per class")
    ap.add_argument("--image-size", type=int, default=84)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--repeats", type=int, default=2, help="timed calls after the measured first one")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    models = args.models.split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        print(f"--models: unknown {', '.join(unknown)}; allowed: {', '.join(MODELS)}", file=sys.stderr)
        return 2
    try:
        steps = [int(s) for s in args.steps.split(",")]
    except ValueError:
        print(f"--steps: {args.steps!r} is not a comma-separated list of integers", file=sys.stderr)
        return 2
    if args.repeats < 1:
        print("--repeats: at least 1 (the timed calls; the first call is the memory measurement)", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    print(f"# {args.ways}-way {args.shots}-shot, {args.query} query/class, {args.image_size} px, second-order "
          f"MAML, one task, {args.device} {args.precision}, torch {torch.__version__}, "
          f"{torch.get_num_threads() if not args.threads else args.threads} threads", flush=True)
    results = []
    for model in models:
        for k in steps:
            for ckpt in (False, True):
                r = measure(model, k, ckpt, args.ways, args.shots, args.query, args.image_size, args.lr,
                            args.repeats, args.device, args.precision, args.threads)
                print(f"{model} steps={k} checkpoint={ckpt}: {r['peak_mb']:.0f} MB, {r['time_s']:.2f} s",
                      file=sys.stderr, flush=True)
                results.append(r)
    print("\n".join(report(results)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

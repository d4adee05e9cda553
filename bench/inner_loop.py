"""Meta-gradient throughput (tasks/s) of metadist against higher and TorchOpt, in one process.

Every variant computes the same thing: the gradient, w.r.t. the initial weights, of the summed query
losses after `steps` inner SGD steps per task, second order (through the inner gradients), BatchNorm
with the statistics of the batch being passed. Before timing, the script stops unless every variant's
meta-gradient matches ours-vmap: in float64 on the first two tasks to 1e-9 (a tight check that they
compute the same function), and on the first float32 call, the one timed, to a looser tolerance.
(Float32 cannot do better on Conv-4: a rounding-level change can flip a ReLU or a max-pool choice, and
the second-order meta-gradient is discontinuous there; in float64, perturbing the Mini-ImageNet
config's weights by 6e-8 relative moves its meta-gradient by 6e-3.)

Variants:
- ours-vmap / ours-loop: `metadist.algorithms.maml` with `task_parallel` vmap / loop.
- ours-auto: the mode `choose_task_parallel` picks (measured on the first tasks of the batch, as the
  runtime does at start-up); its tasks/s is that mode's.
- higher: `higher.innerloop_ctx` per task with `torch.optim.SGD`, query loss backward per task, as in
  higher's MAML example.
- TorchOpt: `torchopt.MetaSGD` on the module, `extract_state_dict`/`recover_state_dict` around each
  task, as in TorchOpt's MAML example (backward per task rather than over the stacked losses: the same
  gradient, one task's graph in memory at a time).
The peers use standard modules (nn.Conv2d, nn.BatchNorm2d in train mode, nn.ReLU, nn.MaxPool2d,
nn.Linear) holding the same initial weights as our model.

Our variants run as the trainer does on the steps it does not log: meta-gradient and post-adaptation
query metrics, without the pre-adaptation query forward (one more forward per task, about a tenth of a
Conv-4 task's cost), which the peers do not compute either.

Timing: each variant is called once (checked, warm-up), then `repeats` times round-robin so that
background load falls on all alike; the median call is reported. Images are random tensors: data
loading is not part of this benchmark.

    python bench/inner_loop.py                 # all configs, 1 and 2 threads (about 10 minutes on 2 cores)
    python bench/inner_loop.py --quick         # smoke test
    python bench/inner_loop.py --configs sinusoid --threads 1 --repeats 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metadist.algorithms.batching import choose_task_parallel  # noqa: E402
from metadist.algorithms.maml import maml  # noqa: E402
from metadist.algorithms.spec import InnerSpec  # noqa: E402
from metadist.models.conv4 import Conv4  # noqa: E402
from metadist.models.mlp import MLP  # noqa: E402
from metadist.episode import Episode  # noqa: E402
from metadist.tasks.sinusoid import SinusoidTasks  # noqa: E402


@dataclass(frozen=True)
class Config:
    name: str
    description: str
    model: str  # "mlp" or "conv4"
    tasks: int
    steps: int
    lr: float
    ways: int = 5
    shots: int = 1
    query: int = 15  # per class for images; points for the sinusoid
    channels: int = 1
    filters: int = 64
    image_size: int = 28
    tolerance: float = 1e-4
    """Largest float32 |peer - ours| allowed, relative to the largest meta-gradient entry."""


CONFIGS = {
    "sinusoid": Config("sinusoid", "MLP 1-40-40-1, K=10, 10 query, 1 step, meta-batch 25",
                       "mlp", tasks=25, steps=1, lr=0.01, shots=10, query=10),
    # Conv-4 in float32: see the module docstring; the float64 check is the tight one.
    "omniglot": Config("omniglot", "Conv-4 28px 1ch 64 filters, 5-way 1-shot, 15 query/class, 1 step, "
                       "meta-batch 32", "conv4", tasks=32, steps=1, lr=0.4, tolerance=2e-3),
    "miniimagenet": Config("miniimagenet", "Conv-4 84px 3ch 32 filters, 5-way 1-shot, 15 query/class, "
                           "5 steps, meta-batch 4", "conv4", tasks=4, steps=5, lr=0.01, channels=3,
                           filters=32, image_size=84, tolerance=5e-2),
}


# ---------------------------------------------------------------------------------------------- setup

def make_batch(cfg: Config, gen: torch.Generator) -> Episode:
    if cfg.model == "mlp":
        return SinusoidTasks(seed=0).sample(0, range(cfg.tasks), cfg.shots, cfg.query)
    shape = (cfg.channels, cfg.image_size, cfg.image_size)
    n_s, n_q = cfg.ways * cfg.shots, cfg.ways * cfg.query
    ys = torch.arange(cfg.ways).repeat_interleave(cfg.shots).expand(cfg.tasks, -1).contiguous()
    yq = torch.arange(cfg.ways).repeat_interleave(cfg.query).expand(cfg.tasks, -1).contiguous()
    return Episode(torch.randn(cfg.tasks, n_s, *shape, generator=gen), ys,
                   torch.randn(cfg.tasks, n_q, *shape, generator=gen), yq)


def make_models(cfg: Config) -> tuple[nn.Module, nn.Module, dict[str, str]]:
    """(our model, the peers' standard-module model with the same weights, peer name -> our name)."""
    if cfg.model == "mlp":
        ours = MLP(1, [40, 40], 1)
        peer = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
        names = dict(zip([n for n, _ in peer.named_parameters()], [n for n, _ in ours.named_parameters()]))
    else:
        ours = Conv4(ways=cfg.ways, channels=cfg.channels, filters=cfg.filters,
                     image_size=cfg.image_size, bn_steps=cfg.steps + 1)
        layers: list[nn.Module] = []
        width = cfg.channels
        for _ in range(4):
            # As in the higher and TorchOpt MAML examples: BatchNorm in train mode, momentum 1.
            layers += [nn.Conv2d(width, cfg.filters, 3, padding=1),
                       nn.BatchNorm2d(cfg.filters, momentum=1.0, affine=True), nn.ReLU(), nn.MaxPool2d(2)]
            width = cfg.filters
        peer = nn.Sequential(*layers, nn.Flatten(), nn.Linear(ours.feature_dim, cfg.ways))
        names = {}
        for i in range(4):
            names.update({f"{4 * i}.weight": f"body.conv.{i}.weight", f"{4 * i}.bias": f"body.conv.{i}.bias",
                          f"{4 * i + 1}.weight": f"body.norm.{i}.weight",
                          f"{4 * i + 1}.bias": f"body.norm.{i}.bias"})
        names.update({"17.weight": "head.weight", "17.bias": "head.bias"})
    ours_params = dict(ours.named_parameters())
    with torch.no_grad():
        for pn, p in peer.named_parameters():
            p.copy_(ours_params[names[pn]])
    return ours, peer.train(), names


def loss_fn(cfg: Config):
    return F.mse_loss if cfg.model == "mlp" else F.cross_entropy


# ------------------------------------------------------------------------------------------- variants

def ours(model: nn.Module, params, batch: Episode, spec: InnerSpec):
    return lambda: maml(model, params, batch, spec)[0]


def higher_variant(cfg: Config, peer: nn.Module, batch: Episode, names: dict[str, str]):
    import higher

    loss = loss_fn(cfg)
    inner_opt = torch.optim.SGD(peer.parameters(), lr=cfg.lr)

    def run():
        peer.zero_grad(set_to_none=True)
        for t in range(batch.num_tasks):
            xs, ys, xq, yq = (x[t] for x in batch.tensors())
            with higher.innerloop_ctx(peer, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(cfg.steps):
                    diffopt.step(loss(fmodel(xs), ys))
                loss(fmodel(xq), yq).backward()
        return {names[n]: p.grad for n, p in peer.named_parameters()}
    return run


def torchopt_variant(cfg: Config, peer: nn.Module, batch: Episode, names: dict[str, str]):
    import torchopt

    loss = loss_fn(cfg)
    inner_opt = torchopt.MetaSGD(peer, lr=cfg.lr)

    def run():
        peer.zero_grad(set_to_none=True)
        net_state = torchopt.extract_state_dict(peer, by="reference", detach_buffers=True)
        opt_state = torchopt.extract_state_dict(inner_opt, by="reference")
        for t in range(batch.num_tasks):
            xs, ys, xq, yq = (x[t] for x in batch.tensors())
            for _ in range(cfg.steps):
                inner_opt.step(loss(peer(xs), ys))
            loss(peer(xq), yq).backward()
            torchopt.recover_state_dict(peer, net_state)
            torchopt.recover_state_dict(inner_opt, opt_state)
        return {names[n]: p.grad for n, p in peer.named_parameters()}
    return run


def max_rel_diff(got: dict, ref: dict) -> float:
    # Relative to the largest entry over all tensors: conv biases in front of BatchNorm have an exact
    # meta-gradient of zero, so their float32 values are pure rounding and a per-tensor ratio means nothing.
    scale = max(v.abs().max().item() for v in ref.values())
    return max((got[k] - ref[k]).abs().max().item() for k in ref) / scale


# ------------------------------------------------------------------------------------------------ run

def setup(cfg: Config, dtype=torch.float32, tasks: int | None = None):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model, peer, names = make_models(cfg)
    batch = make_batch(cfg, gen)
    if tasks is not None:
        batch = batch.slice(0, tasks)
    model, peer = model.to(dtype), peer.to(dtype)
    batch = Episode(*(t.to(dtype) if t.is_floating_point() else t for t in batch.tensors()))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    # As the trainer runs on steps it does not log: the meta-gradient and post-adaptation metrics only,
    # without the pre-adaptation query forward the peers do not compute either.
    spec = InnerSpec(loss="mse" if cfg.model == "mlp" else "ce", steps=cfg.steps, lr=cfg.lr,
                     report_before=False)
    variants = {
        "ours-vmap": ours(model, params, batch, spec.with_(task_parallel="vmap")),
        "ours-loop": ours(model, params, batch, spec.with_(task_parallel="loop")),
        "higher": higher_variant(cfg, peer, batch, names),
        "TorchOpt": torchopt_variant(cfg, peer, batch, names),
    }
    return model, params, batch, spec, variants


def check_same(cfg: Config, results: dict, tolerance: float, what: str, log) -> None:
    ref = results["ours-vmap"]
    diffs = {name: max_rel_diff(g, ref) for name, g in results.items() if name != "ours-vmap"}
    log(f"  {what}: max |x - ours-vmap| / max |ours-vmap|: " + ", ".join(f"{n} {d:.1e}" for n, d in diffs.items()))
    for name, d in diffs.items():
        if not d <= tolerance:
            raise SystemExit(f"{cfg.name}: {name} computes a different meta-gradient ({what}: {d:.2e} > {tolerance})")


def check_float64(cfg: Config, log) -> None:
    """Every variant on the first two tasks in float64: the same function to 1e-9."""
    *_, variants = setup(cfg, torch.float64, tasks=min(cfg.tasks, 2))
    check_same(cfg, {name: fn() for name, fn in variants.items()}, 1e-9, "float64, 2 tasks", log)


def bench(cfg: Config, threads: int, repeats: int, log, only: list[str] | None = None) -> dict:
    torch.set_num_threads(threads)
    model, params, batch, spec, variants = setup(cfg)
    if only:
        variants = {name: fn for name, fn in variants.items() if name in only or name == "ours-vmap"}
    # First calls: the check that every variant computes the same meta-gradient, and the warm-up.
    check_same(cfg, {name: fn() for name, fn in variants.items()}, cfg.tolerance,
               f"float32, {threads} thread(s), first call", log)

    # What `task_parallel: auto` would run: measured on at most 8 tasks, as a runtime would at start-up.
    if only and "ours-vmap" not in only:
        del variants["ours-vmap"]
    start = time.perf_counter()
    auto = "-" if only and "ours-auto" not in only else choose_task_parallel(maml, model, params, batch.slice(0, min(cfg.tasks, 8)), spec,
                                repeats=repeats)
    log(f"  [{cfg.name}, {threads} thread(s)] auto chose {auto} in {time.perf_counter() - start:.1f} s")

    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    rate = {name: cfg.tasks / statistics.median(t) for name, t in times.items()}
    log(f"  [{cfg.name}, {threads} thread(s)] median s/call: "
        + ", ".join(f"{n} {statistics.median(t):.3f}" for n, t in times.items()))
    rate["ours-auto"] = rate.get(f"ours-{auto}", float("nan"))
    return {"config": cfg.name, "threads": threads, "auto": auto, "rate": rate,
            "spread": {name: (min(t), max(t)) for name, t in times.items()}}


def ratio(rate: dict, peer: str) -> str:
    if "ours-auto" not in rate or peer not in rate or rate["ours-auto"] != rate["ours-auto"]:
        return "-"
    return f"{rate['ours-auto'] / rate[peer]:.2f}x"


def table(rows: list[dict]) -> str:
    cols = ["ours-vmap", "ours-loop", "ours-auto", "higher", "TorchOpt"]
    out = ["| config | threads | " + " | ".join(c + " (tasks/s)" for c in cols)
           + " | auto picked | ours-auto / TorchOpt | ours-auto / higher |",
           "|" + "---|" * (len(cols) + 5)]
    for r in rows:
        rate = r["rate"]
        out.append(f"| {r['config']} | {r['threads']} | " + " | ".join(f"{rate.get(c, float('nan')):.1f}" for c in cols)
                   + f" | {r['auto']} | {ratio(rate, 'TorchOpt')} | {ratio(rate, 'higher')} |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {list(CONFIGS)}")
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per variant (default 5, --quick 1)")
    ap.add_argument("--quick", action="store_true", help="one timed call per variant: a smoke test")
    ap.add_argument("--variants", default="", help="time only these (comma-separated; ours-vmap is always "
                    "run once as the reference for the checks)")
    ap.add_argument("--no-float64-check", action="store_true", help="skip the float64 check")
    args = ap.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 5)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")
    threads = [int(t) for t in args.threads.split(",")]
    only = [v.strip() for v in args.variants.split(",") if v.strip()] or None

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    log(f"torch {torch.__version__}, {repeats} timed call(s) per variant")
    rows = []
    for name in names:
        log(f"{name}: {CONFIGS[name].description}")
        if not args.no_float64_check:
            check_float64(CONFIGS[name], log)
        for n in threads:
            rows.append(bench(CONFIGS[name], n, repeats, log, only))
    print(table(rows))


if __name__ == "__main__":
    main()

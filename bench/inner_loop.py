"""Meta-gradient throughput (tasks/s) of metadist against higher, TorchOpt and torch.func, in one process.

Every variant computes the same thing: the gradient, w.r.t. the initial weights, of the summed query
losses after `steps` inner SGD steps per task, second order (through the inner gradients), BatchNorm
with the statistics of the batch being passed. Before timing, the script stops unless every variant's
meta-gradient matches ours-vmap: in float64 on the first two tasks to 1e-9 (a tight check that they
compute the same function), and on the first float32 call (the warm-up) to a looser tolerance.
ours-auto builds its own float32 model replica and batch, so it is checked on its first float32 call
only; agreeing there also shows that it ran on the same tasks as the others.
(Float32 cannot do better on Conv-4: a rounding-level change can flip a ReLU or a max-pool choice, and
the second-order meta-gradient is discontinuous there; in float64, perturbing the Mini-ImageNet
config's weights by 6e-8 relative moves its meta-gradient by 6e-3.)

A peer that fails either check is reported as `wrong grad` and not timed; one of ours failing stops
the script. (torch.func-vmap and TorchOpt-functorch fail on Conv-4 with torch 2.13: under `vmap`,
the second-order gradient through BatchNorm's batch statistics comes out wrong, 6e-3 relative in
float64 on the Omniglot config, with non-zero meta-gradients for the conv biases in front of
BatchNorm, which are exactly zero; the same task function without vmap, torch.func-loop, agrees.)

Variants:
- ours-vmap / ours-loop: `metadist.algorithms.maml` with `task_parallel` vmap / loop.
- ours-loop-ckpt (ResNet-12 configs): ours-loop with checkpointed inner steps (`inner.checkpoint: true`),
  which recompute each step's activations in the backward pass.
- ours-auto: the runtime's own unit of work, `metadist.runtime.local.TaskShard` of a run config with
  `algorithm.task_parallel: auto`, used as the runtime uses it: `TaskShard.choose_task_parallel`
  resolves auto once by timing both modes on the first batch, then `TaskShard.compute` runs the chosen
  mode. The selection and the first step are reported on their own, as the one-off cost of a run, and
  the steady calls after them are timed like the others. A
  shard draws its tasks itself, so every variant runs on the batch of the run config's task family
  (`sinusoid`, or `noise`: random-pixel episodes of the few-shot shape), and the steady auto calls
  include drawing that batch (the log reports its cost; next to a Conv-4 call it is nothing).
- higher: `higher.innerloop_ctx` per task with `torch.optim.SGD`, query loss backward per task, as in
  higher's MAML example.
- TorchOpt: `torchopt.MetaSGD` on the module, `extract_state_dict`/`recover_state_dict` around each
  task, as in TorchOpt's MAML example (backward per task rather than over the stacked losses: the same
  gradient, one task's graph in memory at a time).
- torch.func-vmap: PyTorch's functorch MAML example written with `torch.func`: `functional_call` of
  the module, `grad` of the support loss for the inner steps, `vmap` of that task function over the
  tasks, one backward of the summed query losses. BatchNorm without running statistics
  (`torch.func.replace_all_batch_norm_modules_`, as that example does), so batch statistics as in the
  other peers.
- torch.func-loop: the same task function called task by task, backward per task.
- TorchOpt-functorch: TorchOpt's FuncTorch MAML example: the torch.func task function with the inner
  step taken by TorchOpt's functional `torchopt.sgd` (`update` and `apply_updates` with
  `inplace=False`), `vmap` over the tasks.
The peers use standard modules (nn.Conv2d, nn.BatchNorm2d in train mode, nn.ReLU or leaky ReLU,
nn.MaxPool2d, nn.Linear; `PeerResNet12` for ResNet-12) holding the same initial weights as our model.
The report gives each of our modes against
the strongest peer of the row (the fastest of the five), and vmap and loop against their like-for-like
torch.func peers.

Our variants run as the trainer does on the steps it does not log: meta-gradient and post-adaptation
query metrics, without the pre-adaptation query forward (one more forward per task, about a tenth of a
Conv-4 task's cost), which the peers do not compute either.

Timing: each variant is called once (checked, warm-up), then `repeats` times round-robin so that
background load falls on all alike; the median call is reported. Images are random tensors: data
loading is not part of this benchmark.

    python bench/inner_loop.py                 # all CPU configs, 1 and 2 threads (about 40 minutes on 2 cores)
    python bench/inner_loop.py --configs resnet12 --threads 2     # the ResNet-12 rows
    python bench/inner_loop.py --configs resnet12-84 --threads 16 # mini-ImageNet size (a big machine)
    python bench/inner_loop.py --quick         # smoke test
    python bench/inner_loop.py --configs sinusoid --threads 1 --repeats 10
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metadist import config as run_config  # noqa: E402
from metadist.algorithms.maml import maml  # noqa: E402
from metadist.algorithms.spec import InnerSpec  # noqa: E402
from metadist.models.conv4 import Conv4  # noqa: E402
from metadist.models.mlp import MLP  # noqa: E402
from metadist.models.resnet12 import ResNet12  # noqa: E402
from metadist.episode import Episode  # noqa: E402
from metadist.runtime.local import TaskShard  # noqa: E402
from metadist.tasks import build_tasks  # noqa: E402

PEERS = ("higher", "TorchOpt", "torch.func-vmap", "torch.func-loop", "TorchOpt-functorch")
OURS = ("ours-vmap", "ours-loop", "ours-auto", "ours-loop-ckpt")


@dataclass(frozen=True)
class Config:
    name: str
    description: str
    model: str  # "mlp", "conv4" or "resnet12"
    tasks: int
    steps: int
    lr: float
    ways: int = 5
    shots: int = 1
    query: int = 15  # per class for images; points for the sinusoid
    channels: int = 1
    filters: int = 64
    image_size: int = 28
    downsample: str = "pool"  # Conv-4: 2x2 max-pools, or stride-2 convolutions (the paper's Omniglot network)
    widths: tuple[int, ...] = (64, 160, 320, 640)  # ResNet-12's blocks
    tolerance: float = 1e-4
    """Largest float32 |peer - ours| allowed, relative to the largest meta-gradient entry."""


CONFIGS = {
    "sinusoid": Config("sinusoid", "MLP 1-40-40-1, K=10, 10 query, 1 step, meta-batch 25",
                       "mlp", tasks=25, steps=1, lr=0.01, shots=10, query=10),
    # Conv-4 in float32: see the module docstring; the float64 check is the tight one.
    "omniglot": Config("omniglot", "Conv-4 28px 1ch 64 filters, 5-way 1-shot, 15 query/class, 1 step, "
                       "meta-batch 32", "conv4", tasks=32, steps=1, lr=0.4, tolerance=2e-3),
    # The same with the paper's Omniglot network: stride-2 convolutions instead of max-pooling.
    "omniglot-stride": Config("omniglot-stride", "Conv-4 28px 1ch 64 filters, stride-2 convolutions, 5-way "
                              "1-shot, 15 query/class, 1 step, meta-batch 32", "conv4", tasks=32, steps=1, lr=0.4,
                              downsample="stride", tolerance=2e-3),
    "miniimagenet": Config("miniimagenet", "Conv-4 84px 3ch 32 filters, 5-way 1-shot, 15 query/class, "
                           "5 steps, meta-batch 4", "conv4", tasks=4, steps=5, lr=0.01, channels=3,
                           filters=32, image_size=84, tolerance=5e-2),
    # ResNet-12 (12.4M parameters) at 32 px, sized for a 2-core CPU; resnet12-84 is the mini-ImageNet size.
    "resnet12": Config("resnet12", "ResNet-12 32px 3ch 64-160-320-640, 5-way 1-shot, 15 query/class, 2 steps, "
                       "meta-batch 2", "resnet12", tasks=2, steps=2, lr=0.01, channels=3, image_size=32,
                       tolerance=5e-2),
    "resnet12-84": Config("resnet12-84", "ResNet-12 84px 3ch 64-160-320-640, 5-way 1-shot, 15 query/class, "
                          "5 steps, meta-batch 4", "resnet12", tasks=4, steps=5, lr=0.01, channels=3,
                          image_size=84, tolerance=5e-2),
}
CPU_CONFIGS = [name for name in CONFIGS if name != "resnet12-84"]
"""The default selection: resnet12-84 takes minutes per call on a CPU (pass --configs for it)."""


# ---------------------------------------------------------------------------------------------- setup

def job(cfg: Config, threads: int = 0) -> run_config.Config:
    """The run config whose `TaskShard` is ours-auto: this bench config with `task_parallel: auto`."""
    if cfg.model == "mlp":
        task, model = {"family": "sinusoid"}, {"name": "mlp", "hidden": [40, 40]}
    elif cfg.model == "conv4":
        task = {"family": "noise", "ways": cfg.ways}
        model = {"name": "conv4", "channels": cfg.channels, "filters": cfg.filters, "image_size": cfg.image_size,
                 "downsample": cfg.downsample}
    else:
        task = {"family": "noise", "ways": cfg.ways}
        model = {"name": "resnet12", "channels": cfg.channels, "widths": list(cfg.widths),
                 "image_size": cfg.image_size}
    task.update(shots=cfg.shots, query=cfg.query)
    return run_config.from_dict({
        "seed": 0, "task": task, "model": model,
        "algorithm": {"name": "maml", "task_parallel": "auto"},
        # eval.steps = steps: the shard's Conv-4 then has the bench model's per-step BatchNorm buffers.
        "inner": {"steps": cfg.steps, "lr": cfg.lr}, "eval": {"steps": cfg.steps},
        "train": {"meta_batch": cfg.tasks}, "runtime": {"threads": threads}, "tracking": {"enabled": False}})


def make_batch(cfg: Config) -> Episode:
    """Outer step 0's tasks of the run config's task family: the batch the shard of ours-auto draws."""
    return build_tasks(job(cfg)).sample(0, range(cfg.tasks), cfg.shots, cfg.query)


class PeerResNet12(nn.Module):
    """ResNet-12 from standard modules, as a peer's user writes it: nn.Conv2d, nn.BatchNorm2d in train
    mode (momentum 1, as the peers' MAML examples), leaky ReLU 0.1, 2x2 max-pooling, global average
    pooling and nn.Linear. Its parameter names are ours without the `body.` prefix."""

    def __init__(self, widths, channels: int, ways: int):
        super().__init__()
        self.blocks = nn.ModuleList()
        width = channels
        for out in widths:
            def conv(i, o, k=3):
                return nn.Conv2d(i, o, k, padding=k // 2, bias=False)
            self.blocks.append(nn.ModuleDict({
                "conv1": conv(width, out), "norm1": nn.BatchNorm2d(out, momentum=1.0),
                "conv2": conv(out, out), "norm2": nn.BatchNorm2d(out, momentum=1.0),
                "conv3": conv(out, out), "norm3": nn.BatchNorm2d(out, momentum=1.0),
                "shortcut": conv(width, out, 1), "shortcut_norm": nn.BatchNorm2d(out, momentum=1.0)}))
            width = out
        self.head = nn.Linear(width, ways)

    def forward(self, x):
        for b in self.blocks:
            h = F.leaky_relu(b["norm1"](b["conv1"](x)), 0.1)
            h = F.leaky_relu(b["norm2"](b["conv2"](h)), 0.1)
            h = b["norm3"](b["conv3"](h)) + b["shortcut_norm"](b["shortcut"](x))
            x = F.max_pool2d(F.leaky_relu(h, 0.1), 2)
        return self.head(x.mean((2, 3)))


def make_models(cfg: Config) -> tuple[nn.Module, nn.Module, dict[str, str]]:
    """(our model, the peers' standard-module model with the same weights, peer name -> our name)."""
    if cfg.model == "resnet12":
        ours = ResNet12(ways=cfg.ways, channels=cfg.channels, widths=cfg.widths, image_size=cfg.image_size,
                        bn_steps=cfg.steps + 1)
        peer = PeerResNet12(cfg.widths, cfg.channels, cfg.ways)
        names = {n: n if n.startswith("head.") else f"body.{n}" for n, _ in peer.named_parameters()}
    elif cfg.model == "mlp":
        ours = MLP(1, [40, 40], 1)
        peer = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
        names = dict(zip([n for n, _ in peer.named_parameters()], [n for n, _ in ours.named_parameters()]))
    else:
        ours = Conv4(ways=cfg.ways, channels=cfg.channels, filters=cfg.filters,
                     image_size=cfg.image_size, bn_steps=cfg.steps + 1, downsample=cfg.downsample)
        pool = cfg.downsample == "pool"
        layers: list[nn.Module] = []
        width = cfg.channels
        for _ in range(4):
            # As in the higher and TorchOpt MAML examples: BatchNorm in train mode, momentum 1.
            layers += [nn.Conv2d(width, cfg.filters, 3, stride=1 if pool else 2, padding=1),
                       nn.BatchNorm2d(cfg.filters, momentum=1.0, affine=True), nn.ReLU()]
            layers += [nn.MaxPool2d(2)] if pool else []
            width = cfg.filters
        peer = nn.Sequential(*layers, nn.Flatten(), nn.Linear(ours.feature_dim, cfg.ways))
        per_block = 4 if pool else 3
        names = {}
        for i in range(4):
            k = per_block * i
            names.update({f"{k}.weight": f"body.conv.{i}.weight", f"{k}.bias": f"body.conv.{i}.bias",
                          f"{k + 1}.weight": f"body.norm.{i}.weight", f"{k + 1}.bias": f"body.norm.{i}.bias"})
        head = 4 * per_block + 1  # after the blocks and the Flatten
        names.update({f"{head}.weight": "head.weight", f"{head}.bias": "head.bias"})
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


def torch_func_variant(cfg: Config, peer: nn.Module, batch: Episode, names: dict[str, str],
                       mode: str, inner: str = "plain"):
    """PyTorch's functorch MAML recipe on `torch.func`: `mode` vmap or loop over the tasks; the inner
    step written out (`plain`) or taken by TorchOpt's functional SGD (`torchopt`, its FuncTorch example)."""
    from torch.func import functional_call, grad, replace_all_batch_norm_modules_, vmap

    loss = loss_fn(cfg)
    # Under vmap a BatchNorm cannot update running statistics in place; the recipe drops them (in
    # training mode the output is the same: batch statistics).
    net = replace_all_batch_norm_modules_(copy.deepcopy(peer))
    params = dict(net.named_parameters())
    buffers = dict(net.named_buffers())

    def support_loss(p, x, y):
        return loss(functional_call(net, (p, buffers), (x,)), y)

    def task_loss(p, xs, ys, xq, yq):
        if inner == "torchopt":
            import torchopt
            opt = torchopt.sgd(lr=cfg.lr)
            state = opt.init(p)
        for _ in range(cfg.steps):
            g = grad(support_loss)(p, xs, ys)
            if inner == "torchopt":
                updates, state = opt.update(g, state, inplace=False)
                p = torchopt.apply_updates(p, updates, inplace=False)
            else:
                p = {k: p[k] - cfg.lr * g[k] for k in p}
        return loss(functional_call(net, (p, buffers), (xq,)), yq)

    def run():
        net.zero_grad(set_to_none=True)
        if mode == "vmap":
            vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(params, *batch.tensors()).sum().backward()
        else:
            for t in range(batch.num_tasks):
                task_loss(params, *(x[t] for x in batch.tensors())).backward()
        return {names[n]: p.grad for n, p in net.named_parameters()}
    return run


def max_rel_diff(got: dict, ref: dict) -> float:
    # Relative to the largest entry over all tensors: conv biases in front of BatchNorm have an exact
    # meta-gradient of zero, so their float32 values are pure rounding and a per-tensor ratio means nothing.
    scale = max(v.abs().max().item() for v in ref.values())
    return max((got[k] - ref[k]).abs().max().item() for k in ref) / scale


# ------------------------------------------------------------------------------------------------ run

def setup(cfg: Config, dtype=torch.float32, tasks: int | None = None):
    torch.manual_seed(0)
    model, peer, names = make_models(cfg)
    batch = make_batch(cfg)
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
        # Checkpointed inner steps (inner.checkpoint), where memory is what limits: ResNet-12.
        **({"ours-loop-ckpt": ours(model, params, batch, spec.with_(task_parallel="loop", checkpoint=True))}
           if cfg.model == "resnet12" else {}),
        "higher": higher_variant(cfg, peer, batch, names),
        "TorchOpt": torchopt_variant(cfg, peer, batch, names),
        "torch.func-vmap": torch_func_variant(cfg, peer, batch, names, "vmap"),
        "torch.func-loop": torch_func_variant(cfg, peer, batch, names, "loop"),
        "TorchOpt-functorch": torch_func_variant(cfg, peer, batch, names, "vmap", inner="torchopt"),
    }
    return params, batch, spec, variants


def check_same(cfg: Config, results: dict, tolerance: float, what: str, log) -> set[str]:
    """The peers whose meta-gradient differs from ours-vmap's; stops if one of ours differs."""
    ref = results["ours-vmap"]
    diffs = {name: max_rel_diff(g, ref) for name, g in results.items() if name != "ours-vmap"}
    log(f"  {what}: max |x - ours-vmap| / max |ours-vmap|: " + ", ".join(f"{n} {d:.1e}" for n, d in diffs.items()))
    wrong = {name for name, d in diffs.items() if not d <= tolerance}
    for name in sorted(wrong):
        if name in OURS:
            raise SystemExit(f"{cfg.name}: {name} computes a different meta-gradient "
                             f"({what}: {diffs[name]:.2e} > {tolerance})")
        # A peer that computes something else is not timed: its speed would not be comparable.
        log(f"  {name} computes a different meta-gradient ({what}: {diffs[name]:.2e} > {tolerance}): not timed")
    return wrong


def check_float64(cfg: Config, log, only: list[str] | None = None) -> set[str]:
    """Every variant on the first two tasks in float64: the same function to 1e-9. Returns the peers that differ."""
    *_, variants = setup(cfg, torch.float64, tasks=min(cfg.tasks, 2))
    return check_same(cfg, {name: fn() for name, fn in variants.items()
                            if not only or name in only or name == "ours-vmap"}, 1e-9, "float64, 2 tasks", log)


def bench(cfg: Config, threads: int, repeats: int, log, only: list[str] | None = None,
          wrong: set[str] = frozenset()) -> dict:
    torch.set_num_threads(threads)
    params, batch, spec, variants = setup(cfg)
    variants = {name: fn for name, fn in variants.items()
                if name not in wrong and (not only or name in only or name == "ours-vmap")}
    # First calls: the check that every variant computes the same meta-gradient, and the warm-up.
    first = {name: fn() for name, fn in variants.items()}

    selection_s = float("nan")
    auto = "-"
    if not only or "ours-auto" in only:
        # The runtime's unit of work, as the driver uses it: at start `auto` is resolved once (both modes
        # timed on the first batch), then every step runs the chosen mode.
        shard = TaskShard(job(cfg, threads))
        indices = range(cfg.tasks)
        start = time.perf_counter()
        auto = shard.choose_task_parallel(params, 0, spec, indices)
        auto_spec = spec.with_(task_parallel=auto)
        first["ours-auto"] = shard.compute(params, 0, auto_spec, indices)[0]
        selection_s = time.perf_counter() - start
        variants["ours-auto"] = lambda: shard.compute(params, 0, auto_spec, indices)[0]
        log(f"  [{cfg.name}, {threads} thread(s)] auto chose {auto}; its first call (selection and the step) "
            f"took {selection_s:.2f} s")
    wrong = set(wrong) | check_same(cfg, first, cfg.tolerance, f"float32, {threads} thread(s), first call", log)
    for name in wrong:
        variants.pop(name, None)
    if only and "ours-vmap" not in only:
        del variants["ours-vmap"]

    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    rate = {name: cfg.tasks / statistics.median(t) for name, t in times.items()}
    log(f"  [{cfg.name}, {threads} thread(s)] median s/call: "
        + ", ".join(f"{n} {statistics.median(t):.4f}" for n, t in times.items()))
    if "ours-auto" in variants:
        # What the shard's steady calls do besides the meta-gradient: draw the batch.
        tasks = build_tasks(job(cfg))
        draws = []
        for _ in range(max(repeats, 3)):
            start = time.perf_counter()
            tasks.sample(0, range(cfg.tasks), cfg.shots, cfg.query)
            draws.append(time.perf_counter() - start)
        log(f"  [{cfg.name}, {threads} thread(s)] drawing the batch (inside each ours-auto call): "
            f"{1e3 * statistics.median(draws):.2f} ms")
    return {"config": cfg.name, "threads": threads, "auto": auto, "selection_s": selection_s, "rate": rate,
            "wrong": sorted(wrong), "spread": {name: (min(t), max(t)) for name, t in times.items()}}


def strongest(rate: dict) -> str | None:
    """The fastest peer of a row, or None when no peer was timed."""
    peers = [p for p in PEERS if p in rate]
    return max(peers, key=lambda p: rate[p]) if peers else None


def ratio(rate: dict, ours_name: str, peer: str | None) -> str:
    if ours_name not in rate or peer not in rate:
        return "-"
    return f"{rate[ours_name] / rate[peer]:.2f}x"


def table(rows: list[dict]) -> str:
    """Two markdown tables: tasks/s of every variant, then our modes' ratios to the peers."""
    cols = [*OURS, *PEERS]
    out = ["| config | threads | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for r in rows:
        rate = r["rate"]
        out.append(f"| {r['config']} | {r['threads']} | "
                   + " | ".join(f"{rate[c]:.1f}" if c in rate else "wrong grad" if c in r["wrong"] else "-"
                                for c in cols) + " |")
    out += ["", "| config | threads | auto picked | auto's first call (s) | strongest peer | ours-auto / strongest "
            "| ours-vmap / strongest | ours-loop / strongest | ours-vmap / torch.func-vmap "
            "| ours-loop / torch.func-loop | ours-auto / TorchOpt | ours-auto / higher |", "|" + "---|" * 12]
    for r in rows:
        rate, best = r["rate"], strongest(r["rate"])
        out.append(f"| {r['config']} | {r['threads']} | {r['auto']} | {r['selection_s']:.2f} | {best or '-'} | "
                   + " | ".join([ratio(rate, "ours-auto", best), ratio(rate, "ours-vmap", best),
                                 ratio(rate, "ours-loop", best), ratio(rate, "ours-vmap", "torch.func-vmap"),
                                 ratio(rate, "ours-loop", "torch.func-loop"), ratio(rate, "ours-auto", "TorchOpt"),
                                 ratio(rate, "ours-auto", "higher")]) + " |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default=",".join(CPU_CONFIGS), help=f"comma-separated subset of {list(CONFIGS)} "
                    f"(default: all but resnet12-84)")
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per variant (default 5, --quick 1)")
    ap.add_argument("--quick", action="store_true", help="one timed call per variant: a smoke test")
    ap.add_argument("--variants", default="", help=f"time only these (comma-separated, of {[*OURS, *PEERS]}; "
                    "ours-vmap is always run once as the reference for the checks)")
    ap.add_argument("--no-float64-check", action="store_true", help="skip the float64 check")
    args = ap.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 5)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")
    threads = [int(t) for t in args.threads.split(",")]
    only = [v.strip() for v in args.variants.split(",") if v.strip()] or None
    bad = [v for v in only or [] if v not in (*OURS, *PEERS)]
    if bad:
        ap.error(f"unknown variant(s) {bad}; choose from {[*OURS, *PEERS]}")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    log(f"torch {torch.__version__}, {repeats} timed call(s) per variant")
    rows = []
    for name in names:
        log(f"{name}: {CONFIGS[name].description}")
        wrong = set() if args.no_float64_check else check_float64(CONFIGS[name], log, only)
        for n in threads:
            rows.append(bench(CONFIGS[name], n, repeats, log, only, wrong))
    print(table(rows))


if __name__ == "__main__":
    main()

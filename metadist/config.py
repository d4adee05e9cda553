"""Typed run configuration: one tree of dataclasses, loaded from YAML with `--set a.b=c` overrides.

Every field carries a docstring (the string literal under it); `metadist config JOB --keys` and the docs
read them. Validation is done by pydantic's dataclass support; its errors are rewritten into one
`ConfigError` that names the key path and what is allowed, so users never see a traceback.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union, get_args

import yaml
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from metadist.errors import UserError

STRICT = ConfigDict(extra="forbid", use_attribute_docstrings=True)

PositiveFloat = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
Split = Literal["train", "val", "test"]
SPLITS = {name: code for code, name in enumerate(get_args(Split))}
"""The dataset splits in order, each with its code in the seeds that draw its tasks and episodes."""


RL_FAMILIES = {"navigation": (2, 2), "locomotion": (17, 6)}
"""The reinforcement-learning task families, a policy meta-trained on sampled trajectories, and their
(observation, action) sizes: a position and a velocity; gymnasium's half-cheetah's 17 numbers and 6
actuators."""


class ConfigError(UserError, ValueError):
    """A config problem, phrased for the user: which key, what was given, what is allowed."""


@dataclass(config=STRICT)
class TaskConfig:
    family: Literal["sinusoid", "fewshot", "noise", "navigation", "locomotion"] = "sinusoid"
    """Task family: `sinusoid` regression (MAML paper 5.1), `fewshot` N-way K-shot image episodes,
    `navigation` (2-D point navigation to a goal, reinforcement learning: MAML paper 5.3), `locomotion`
    (half-cheetah goal velocity or direction on gymnasium's MuJoCo, MAML paper 5.3; the `mujoco` extra),
    or `noise` (random-pixel episodes of the fewshot shape, nothing to learn: for benchmarks and tests)."""
    ways: Annotated[int, Field(ge=2)] = 5
    """N, the number of classes per episode (fewshot only; at least 2)."""
    shots: PositiveInt = 10
    """K, support examples per class (fewshot), support points per task (sinusoid), or trajectories per
    task sampled before the inner step (navigation, locomotion) in training."""
    query: PositiveInt = 10
    """Query examples per class (fewshot), query points per task (sinusoid), or trajectories per task
    sampled after the inner step (navigation, locomotion) in training."""
    rotations: tuple[Literal[0, 90, 180, 270], ...] = (0,)
    """Fewshot: the rotations (degrees) a class of an episode may be turned by, one drawn per class per
    episode for all its images (Omniglot's augmentation: [0, 90, 180, 270], so a rotated character is a
    new class). The default, [0], turns nothing."""
    amplitude: tuple[float, float] = (0.1, 5.0)
    """Sinusoid amplitude range A ~ U[lo, hi]."""
    phase: tuple[float, float] = (0.0, 3.141592653589793)
    """Sinusoid phase range phi ~ U[lo, hi]."""
    x_range: tuple[float, float] = (-5.0, 5.0)
    """Sinusoid input range x ~ U[lo, hi]."""
    goal_range: Optional[tuple[float, float]] = None
    """Navigation goal coordinates ~ U[lo, hi] each (default [-0.5, 0.5]); locomotion (`objective:
    velocity`) goal velocity ~ U[lo, hi] (default the paper's [0, 2])."""
    horizon: Optional[PositiveInt] = None
    """Steps per trajectory at most: by default navigation's 100 (a trajectory also ends within 0.01 of
    the goal), locomotion's 200."""
    max_action: Optional[PositiveFloat] = None
    """Action clip per coordinate: by default navigation's velocity box (0.1), locomotion's actuator box
    (1.0)."""
    action_scale: Optional[PositiveFloat] = None
    """The environment's action per unit of the policy's, before the clip. By default 0.1 for navigation:
    the MAML authors' code maps actions in [-1, 1] onto [-max_action, max_action] (rllab's `normalize`),
    and with 1.0 the policy's output is the velocity itself; 1.0 for locomotion, whose actuators take
    [-1, 1]."""
    objective: Literal["velocity", "direction"] = "velocity"
    """Locomotion: run at a goal velocity drawn from `goal_range` (`velocity`), or forward or backward,
    each with probability 1/2 (`direction`)."""

    @property
    def rl(self) -> bool:
        """Whether this family is reinforcement learning (a policy, trajectories, returns)."""
        return self.family in RL_FAMILIES


@dataclass(config=STRICT)
class ModelConfig:
    name: Literal["mlp", "conv4", "resnet12", "policy"] = "mlp"
    """Network: `mlp` (regression, 1-40-40-1 ReLU by default), `conv4` (four conv blocks + linear head),
    `resnet12` (four residual blocks of three convolutions, 64-160-320-640 wide by default, leaky ReLU,
    global average pooling and a linear head: about 12.4M parameters), or `policy` (navigation,
    locomotion: a ReLU MLP giving a Gaussian's mean, with a learned state-independent log standard
    deviation)."""
    hidden: list[PositiveInt] = field(default_factory=lambda: [40, 40])
    """Hidden layer widths of the MLP and the policy (the MAML paper's policy: [100, 100])."""
    init_std: PositiveFloat = 1.0
    """The policy's initial action standard deviation."""
    in_features: PositiveInt = 1
    """MLP input width."""
    out_features: PositiveInt = 1
    """MLP output width."""
    filters: PositiveInt = 32
    """Conv-4 filters per block (32 for mini-ImageNet, 64 for Omniglot)."""
    channels: PositiveInt = 3
    """Image channels of conv4 and resnet12 (3 for RGB, 1 for grayscale)."""
    image_size: Annotated[int, Field(ge=16)] = 84
    """Image height and width in pixels (conv4, resnet12)."""
    downsample: Literal["pool", "stride"] = "pool"
    """How Conv-4's blocks halve the resolution: `pool` (2x2 max-pooling after each block, the MAML
    paper's mini-ImageNet network) or `stride` (stride-2 convolutions and no pooling, its Omniglot
    network)."""
    bn: Literal["transductive", "per_step"] = "transductive"
    """BatchNorm statistics. `transductive`: batch statistics always, in training and at test, as in the
    MAML paper (a test episode's query batch is normalised with its own statistics). `per_step`: running
    statistics kept separately for each inner step, as in MAML++; training normalises with batch
    statistics and updates them, evaluation normalises with the running statistics of that step."""
    bn_momentum: Annotated[float, Field(gt=0, le=1)] = 0.1
    """Momentum of the per-step running statistics (per_step only)."""
    bn_weights: Literal["shared", "per_step"] = "shared"
    """BatchNorm weights and biases: one set for every inner step (`shared`), or one per inner step
    (`per_step`, MAML++'s BNWB: step k normalises with its own affine map; test-time steps beyond the
    trained ones take the last). conv4 and resnet12."""
    widths: list[PositiveInt] = field(default_factory=lambda: [64, 160, 320, 640])
    """ResNet-12's four block widths."""
    drop_rate: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """ResNet-12 DropBlock: the fraction of units dropped in the last two blocks during meta-training (0:
    off; never at test time). The masks come from torch's generator, seeded by (seed, step, the shard's
    first task): bit-identical for the same number of workers, different for another number."""
    drop_block_size: PositiveInt = 5
    """ResNet-12 DropBlock: the side of the dropped squares (capped at the feature map)."""


@dataclass(config=STRICT)
class AlgorithmConfig:
    name: Literal["maml", "fomaml", "reptile", "anil", "metasgd", "pretrain"] = "maml"
    """Meta-learning algorithm. `pretrain` is the MAML paper's baseline: one network trained on all tasks
    jointly, fine-tuned at test time."""
    task_parallel: Literal["auto", "vmap", "loop"] = "auto"
    """How the tasks of a batch are processed: `vmap` (all at once), `loop` (one at a time), or `auto`
    (whichever was measured faster for this model and device)."""
    chunk: NonNegInt = 0
    """Tasks per vmap call; bounds memory. 0 processes the whole batch in one call."""
    msl: bool = False
    """MAML++ multi-step loss: the meta-loss is a weighted sum of the query losses after every inner step."""
    msl_anneal_steps: NonNegInt = 10000
    """Outer steps over which the multi-step loss weights anneal towards the final step only."""
    lslr: bool = False
    """MAML++ learned per-layer, per-step inner learning rates (maml and fomaml)."""
    first_order_until: NonNegInt = 0
    """MAML++ derivative-order annealing: use first-order gradients for outer steps below this number."""
    reptile_optimizer: Literal["sgd", "adam"] = "sgd"
    """Reptile's inner optimizer on each task, in training and at test time (`adam`: beta1 0, its moments
    fresh on every task; the Reptile code also adapts its test tasks with it)."""


@dataclass(config=STRICT)
class InnerConfig:
    lr: PositiveFloat = 0.01
    """Inner-loop (adaptation) learning rate alpha; also the initial value of learned rates."""
    steps: PositiveInt = 1
    """Inner-loop gradient steps during meta-training."""
    checkpoint: Union[bool, Literal["auto"]] = False
    """Memory-bounded second order. `true`: each inner step (and each multi-step-loss query) keeps only its
    input weights and recomputes its activations in the backward pass, so memory no longer grows by a
    step's activations per inner step; the meta-gradient is the same. Tasks then run one at a time
    (`task_parallel` loop). `auto`: true when the estimated peak of one task does not fit the device's
    free memory (see docs/memory.md)."""
    batch: NonNegInt = 0
    """Support examples per inner step (the Reptile code's inner batch): each step takes the next `batch`
    of the support set in a shuffled order, and a new order starts when it runs out (a pure function of
    (seed, outer step), shared by the tasks of a step). 0 takes the whole support set at every step."""


@dataclass(config=STRICT)
class OuterConfig:
    optimizer: Literal["adam", "sgd", "trpo"] = "adam"
    """Outer (meta) optimizer. Reptile's outer step size epsilon is `outer.lr` with `sgd`. `trpo`
    (navigation and locomotion only: the MAML paper's RL outer step) takes the natural-gradient step under a bound on
    the adapted policies' mean KL (the `rl.*` settings) and ignores `outer.lr`."""
    lr: PositiveFloat = 0.001
    """Meta learning rate."""
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    """The meta learning rate over `train.steps`: `constant`, annealed to `outer.min_lr` along a cosine
    (MAML++) or along a straight line (Reptile's outer step size, from `outer.lr` to its final value)."""
    min_lr: Annotated[float, Field(ge=0)] = 0.0
    """Final meta learning rate of the `cosine` and `linear` schedules (at most `outer.lr` for `linear`)."""


@dataclass(config=STRICT)
class RLConfig:
    gamma: Annotated[float, Field(gt=0, le=1)] = 0.99
    """Discount of the returns the baseline is fitted to and the advantages are computed from."""
    gae_lambda: Annotated[float, Field(ge=0, le=1)] = 1.0
    """Generalised advantage estimation's lambda (1: discounted returns minus the baseline)."""
    max_kl: PositiveFloat = 0.01
    """TRPO: bound on the mean KL of the adapted policies from those that sampled (outer.optimizer trpo)."""
    cg_iters: PositiveInt = 10
    """TRPO: conjugate-gradient iterations for the natural-gradient direction."""
    cg_damping: Annotated[float, Field(ge=0)] = 1e-5
    """TRPO: damping added to the Fisher-vector products."""
    hvp: Literal["exact", "finite_difference"] = "exact"
    """TRPO: the KL's Hessian-vector products `exact` (at the sampling parameters, J'HJ through the inner
    step from one kept graph, equal to a double backward), or by finite differences of the KL's gradient
    (`finite_difference`, the paper's choice; step `rl.fd_eps`)."""
    fd_eps: PositiveFloat = 1e-5
    """TRPO: the finite-difference step of `rl.hvp: finite_difference`."""
    line_search_steps: PositiveInt = 15
    """TRPO: backtracking line-search steps at most."""
    backtrack: Annotated[float, Field(gt=0, lt=1)] = 0.8
    """TRPO: the factor the step shrinks by at each line-search step."""


@dataclass(config=STRICT)
class TrainConfig:
    steps: PositiveInt = 1000
    """Outer (meta-training) steps."""
    meta_batch: PositiveInt = 25
    """Tasks per outer step."""
    log_every: PositiveInt = 100
    """Outer steps between metric records (and the per-inner-step query metrics)."""
    checkpoint_every: NonNegInt = 0
    """Outer steps between checkpoints; 0 writes only the final one."""
    out_dir: Optional[str] = None
    """Directory under which each run gets its own folder; empty takes $METADIST_OUT_DIR, else `runs` (a
    Ray job needs one of them: its working directory is Ray's temporary copy)."""
    eval_every: NonNegInt = 0
    """Outer steps between validation evaluations during training (`eval.val_episodes` fixed tasks of the
    val split, logged as `val_<metric>`); 0 evaluates only at the end, on `eval.split`."""
    warmup_steps: NonNegInt = 20
    """Leading steps left out of the steady-state throughput figure."""
    select: Literal["last", "best_val"] = "last"
    """The parameters that the final evaluation, the model file and the plots use: `last`, those at the end
    of training, or `best_val`, those of the validation (`train.eval_every`) with the best `val_<metric>`
    (the last one on a tie). The MAML paper's RL protocol evaluates the model with the best return seen
    during training; `best_val` picks it on val-split tasks, never on the test split."""


@dataclass(config=STRICT)
class EvalConfig:
    episodes: PositiveInt = 600
    """Fixed test tasks (episodes) drawn from (seed, split)."""
    steps: NonNegInt = 10
    """Test-time adaptation steps; metrics are reported after 0..steps."""
    shots: Optional[PositiveInt] = None
    """Support examples at test time (per class for fewshot); defaults to `task.shots`."""
    query: PositiveInt = 100
    """Query examples per task (sinusoid) or per class (fewshot) at test time."""
    lr: Optional[PositiveFloat] = None
    """Test-time inner learning rate; defaults to `inner.lr` (learned rates are used where trained)."""
    inner_batch: NonNegInt = 0
    """Support examples per test-time step, as `inner.batch` is in training (the Reptile code's eval batch);
    0 takes the whole support set."""
    later_lr_scale: PositiveFloat = 1.0
    """The test-time rate of the steps after the first, as a multiple of the first's (navigation and
    locomotion only).
    The MAML paper's RL evaluation takes alpha for the first step and alpha/2 after it: 0.5."""
    split: Split = "test"
    """Split the evaluation tasks are drawn from."""
    batch: PositiveInt = 100
    """Tasks adapted together during evaluation (memory bound, not a result)."""
    val_episodes: PositiveInt = 100
    """Fixed `val`-split tasks of the evaluations during training (`train.eval_every`)."""


@dataclass(config=STRICT)
class RuntimeConfig:
    executor: Literal["local", "ray", "collective"] = "local"
    """Where the inner loops run: `local` (in this process, the reference), `ray` (worker actors that
    send their meta-gradients to this driver) or `collective` (Ray Train ranks that all-reduce them)."""
    workers: PositiveInt = 1
    """Worker actors (ray) or ranks (collective) the meta-batch is split across."""
    threads: NonNegInt = 0
    """torch intra-op threads per process; 0 keeps torch's default."""
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    """Device for the inner loops: `auto` takes CUDA where available."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Arithmetic of the inner and outer forward passes: `fp32`, or `bf16` (autocast: convolutions and
    matrix products in bfloat16; the meta-parameters, the losses, BatchNorm statistics and the outer
    optimizer stay float32)."""
    address: Optional[str] = None
    """Ray cluster to join (`auto`, `host:port`, or `ray://host:port`); empty starts a local Ray in this
    process, sized for the workers."""
    cpus_per_worker: PositiveFloat = 1.0
    """CPUs reserved for each worker actor (fractions allowed, to place more workers than cores)."""
    gpus_per_worker: Annotated[float, Field(ge=0)] = 0.0
    """GPUs reserved for each worker actor: 1 gives every worker its own GPU (needs device cuda or auto)."""
    max_worker_restarts: NonNegInt = 3
    """Times a dead worker is replaced (its tasks recomputed for the same step) before the run fails."""
    object_store_mb: PositiveInt = 512
    """Object store size of a local Ray started by metadist (MB); ignored when joining a cluster."""
    placement_timeout_s: PositiveFloat = 60.0
    """Seconds to wait for the cluster to reserve all workers at once before failing with an error."""
    collective_timeout_s: PositiveInt = 60
    """Seconds a rank waits in a collective (collective executor) before the group counts as hung and
    is restarted from its last checkpoint; longer than any one step or validation takes."""


@dataclass(config=STRICT)
class TrackingConfig:
    enabled: bool = True
    """Record the run in MLflow (params, metrics, plots, checkpoints, the evaluation report)."""
    uri: Optional[str] = None
    """MLflow tracking URI; empty takes $MLFLOW_TRACKING_URI, else `sqlite:///<cwd>/mlflow.db`."""
    experiment: Optional[str] = None
    """MLflow experiment name; defaults to the run name."""
    plot_tasks: PositiveInt = 3
    """Sinusoid test tasks drawn in the fit plot (MAML paper, Figure 2)."""
    compare: list[str] = field(default_factory=list)
    """Finished run folders whose test evaluation (their `eval.json`) the adaptation-curve plot draws
    beside this run's, as the MAML paper's Figure 2 sets MAML against a pretrained network. Each must be
    scored as this run is: the same split, shots and number of tasks."""


@dataclass(config=STRICT)
class DataConfig:
    path: Optional[str] = None
    """Dataset directory or fsspec URL with shards and manifest.parquet (fewshot tasks)."""
    access: Literal["auto", "index", "stream"] = "auto"
    """How training episodes reach the images. `index`: each task's classes and images are drawn from the
    whole train split by tar offset, a pure function of (seed, step, task index), so the episodes do not
    depend on the worker count and a replaced worker recomputes the same tasks (local shards are
    memory-mapped and shared through the page cache; remote ones are held in each worker's memory).
    `stream`: each worker reads only its own shards (shard i to worker i mod W) through per-class
    buffers, so it sees about 1/W of every class and the episodes depend on W; for datasets larger than a
    node's disk or memory. `auto`: `index` for a local data.path, a decoded cache, or remote train shards
    of at most 2 GiB in all; `stream` otherwise."""
    buffer_per_class: PositiveInt = 64
    """Encoded images kept per class by each worker's streaming sampler (bounds its memory; `stream` only)."""
    cache: Literal["encoded", "decoded"] = "encoded"
    """`encoded`: images are decoded each time they are drawn. `decoded`: each train image is decoded
    once, on first use, and kept as uint8 (C·H·W bytes per image: 0.8 GB for mini-ImageNet's train
    split), for GPUs that adapt faster than a core decodes; needs data.access `index` or `auto`."""
    verify: Literal["none", "size", "hash"] = "size"
    """Check shards against the manifest at start-up: `size` (cheap), `hash` (reads everything) or `none`."""


@dataclass(config=STRICT)
class Config:
    name: str = "run"
    """Run name; defaults to the job file's stem."""
    seed: NonNegInt = 0
    """Seed for initialisation, tasks and evaluation episodes."""
    task: TaskConfig = field(default_factory=TaskConfig)
    """The task family and episode shape."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The network being meta-learned."""
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """The meta-learning algorithm and its options."""
    inner: InnerConfig = field(default_factory=InnerConfig)
    """The inner (adaptation) loop."""
    outer: OuterConfig = field(default_factory=OuterConfig)
    """The outer (meta) optimizer."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The meta-training schedule."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """The evaluation protocol."""
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    """Where and how the work runs."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data location."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow run recording."""
    rl: RLConfig = field(default_factory=RLConfig)
    """Reinforcement learning (task.family navigation or locomotion): advantages and the TRPO outer step."""

    def __post_init__(self) -> None:
        rl = self.task.rl
        checks = [
            (self.model.name == "mlp" and self.task.family != "sinusoid",
             "model.name", "mlp is for sinusoid regression; use conv4 or resnet12 for fewshot and noise, policy for "
             "navigation and locomotion"),
            (self.model.name in ("conv4", "resnet12") and (self.task.family == "sinusoid" or rl),
             "model.name", f"{self.model.name} is for fewshot classification; use mlp for sinusoid, policy "
             "for navigation and locomotion"),
            (self.model.bn_weights == "per_step" and self.model.name not in ("conv4", "resnet12"),
             "model.bn_weights", f"'per_step' is for the BatchNorm of conv4 and resnet12; allowed for "
             f"{self.model.name!r}: shared"),
            (len(self.model.widths) != 4 and self.model.name == "resnet12", "model.widths",
             f"{self.model.widths}: ResNet-12 has four blocks; allowed: four widths"),
            (self.inner.checkpoint is not False and (rl or self.algorithm.name in ("fomaml", "reptile", "pretrain")),
             "inner.checkpoint", f"bounds the memory of second-order inner loops, which "
             f"{'reinforcement learning' if rl else repr(self.algorithm.name)} does not keep; allowed: false"),
            (self.inner.checkpoint is True and self.algorithm.task_parallel == "vmap", "inner.checkpoint",
             "true recomputes inner steps with torch.utils.checkpoint, which torch.func transforms (vmap) "
             "cannot take; allowed with algorithm.task_parallel vmap: false (or set task_parallel loop or auto)"),
            (rl != (self.model.name == "policy"), "model.name",
             f"{self.model.name!r} with task.family {self.task.family!r}: navigation and locomotion take "
             "the model 'policy', and 'policy' is for them only"),
            (rl and self.algorithm.name == "reptile", "algorithm.name",
             "'reptile' is not implemented for reinforcement learning; allowed there: maml, fomaml, anil, metasgd, pretrain"),
            (rl and self.algorithm.msl, "algorithm.msl",
             "the multi-step loss is not implemented for reinforcement learning (it needs the post-update "
             "trajectories of every inner step); allowed there: false"),
            (self.outer.schedule == "linear" and self.outer.min_lr > self.outer.lr, "outer.min_lr",
             f"{self.outer.min_lr} is above outer.lr ({self.outer.lr}); a linear schedule anneals down, allowed: "
             f"0 to {self.outer.lr}"),
            (self.outer.optimizer == "trpo" and not rl, "outer.optimizer",
             "'trpo' is the reinforcement-learning outer step; allowed for "
             f"task.family {self.task.family!r}: adam, sgd"),
            (self.eval.later_lr_scale != 1.0 and not rl, "eval.later_lr_scale",
             "is for reinforcement learning only; allowed for this task family: 1.0"),
            (not self.task.rotations, "task.rotations", "needs at least one of 0, 90, 180, 270"),
            (self.task.rotations != (0,) and self.task.family != "fewshot", "task.rotations",
             f"turns fewshot images; allowed for task.family {self.task.family!r}: [0]"),
            (self.task.amplitude[0] > self.task.amplitude[1], "task.amplitude", "needs lo <= hi"),
            (self.task.x_range[0] >= self.task.x_range[1], "task.x_range", "needs lo < hi"),
            (self.task.goal_range is not None and self.task.goal_range[0] >= self.task.goal_range[1],
             "task.goal_range", "needs lo < hi"),
            (self.runtime.gpus_per_worker > 0 and self.runtime.device == "cpu", "runtime.device",
             "'cpu' with runtime.gpus_per_worker > 0 reserves GPUs the workers would not use; "
             "allowed then: 'cuda' or 'auto'"),
            (self.data.cache == "decoded" and self.data.access == "stream", "data.cache",
             "'decoded' keeps the whole train split decoded, which data.access 'stream' is there to avoid; "
             "allowed with 'stream': 'encoded' (or set data.access: index)"),
            (self.train.select == "best_val" and not self.train.eval_every, "train.select",
             "'best_val' picks among the validations, and train.eval_every is 0 (none); set train.eval_every "
             "or use train.select: last"),
            *[(n > support, key, f"{n} is more than the support set ({support} examples); allowed: 0 to {support}")
              for key, n, support in (("inner.batch", self.inner.batch, self.support_size(self.task.shots)),
                                      ("eval.inner_batch", self.eval.inner_batch,
                                       self.support_size(self.eval.shots or self.task.shots)))],
            (self.inner.batch and self.algorithm.name == "pretrain", "inner.batch",
             "pretrain has no inner loop in training; allowed with it: 0 (eval.inner_batch sets the test-time batch)"),
            *[(n and rl, key, "mini-batches of the support set are for supervised tasks; allowed for "
               "reinforcement learning: 0") for key, n in (("inner.batch", self.inner.batch),
                                                            ("eval.inner_batch", self.eval.inner_batch))],
            (self.runtime.executor == "collective" and self.runtime.workers > self.train.meta_batch,
             "runtime.workers", f"{self.runtime.workers} ranks for a meta-batch of {self.train.meta_batch} "
             f"tasks would leave ranks without a task; allowed: 1 to train.meta_batch"),
        ]
        for bad, key, why in checks:
            if bad:
                raise ConfigError(f"{key}: {why}")

    def support_size(self, shots: int) -> int:
        """Support examples of a task with `shots` per class (fewshot) or in all (sinusoid)."""
        return shots * self.task.ways if self.task.family in ("fewshot", "noise") else shots


_ADAPTER = TypeAdapter(Config)


def _fields(cls: Any) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _section_type(cls: Any, key: str) -> Any:
    """The dataclass type of field `key` of `cls`, or None if it is a leaf."""
    ftype = cls.__pydantic_fields__[key].annotation
    return ftype if dataclasses.is_dataclass(ftype) else None


def _check_keys(data: Any, cls: Any, prefix: str = "") -> None:
    """Reject unknown keys with the allowed ones listed (pydantic's message names no alternatives)."""
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "the config"
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(data).__name__} {data!r}")
    known = _fields(cls)
    for key, value in data.items():
        if key not in known:
            where = f"under '{prefix.rstrip('.')}'" if prefix else "at the top level"
            raise ConfigError(
                f"unknown key '{prefix}{key}'; allowed keys {where}: {', '.join(sorted(known))}")
        sub = _section_type(cls, key)
        if sub is not None and value is not None:
            _check_keys(value, sub, f"{prefix}{key}.")


def _format_validation(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "config"
        given = e.get("input")
        if e["type"] == "value_error":  # raised by Config.__post_init__, already phrased for users
            lines.append(str(e["ctx"]["error"]))
        elif e["type"] == "literal_error":
            lines.append(f"{key}: got {given!r}; allowed values: {e['ctx']['expected']}")
        else:
            lines.append(f"{key}: {e['msg']} (got {given!r})")
    return "invalid config: " + "; ".join(lines)


def set_path(data: dict, dotted: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict, creating the sections on the way."""
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        child = node.get(p)
        if not isinstance(child, dict):
            # Absent or null, or a leaf given a deeper key (`inner.lr.x=1`): validation then names the key.
            child = node[p] = {}
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Split `a.b=c` and parse the value as YAML (so 0.01, true, null and [1, 2] get their types)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _renamed(data: Any) -> Any:
    """`data` with the keys of earlier versions under their current names, so that run folders and
    checkpoints written before a rename still load: `outer.cosine: true|false` is `outer.schedule:
    cosine|constant`."""
    outer = data.get("outer") if isinstance(data, dict) else None
    if not isinstance(outer, dict) or "cosine" not in outer or "schedule" in outer:
        return data
    cosine = outer["cosine"]
    if not isinstance(cosine, bool):
        raise ConfigError(f"outer.cosine: got {cosine!r}; allowed: true or false (now outer.schedule)")
    outer = {k: v for k, v in outer.items() if k != "cosine"} | {"schedule": "cosine" if cosine else "constant"}
    return {**data, "outer": outer}


def from_dict(data: dict, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Validate a nested dict (plus `a.b=c` overrides) into a Config, or raise one ConfigError."""
    data = _renamed(data or {})
    _check_keys(data, Config)  # first: it also rejects a job whose top level is not a mapping
    data = copy.deepcopy(dict(data))  # the overrides below must not change the caller's dict
    for text in overrides:
        key, value = parse_override(text)
        _check_keys(_nested(key, value), Config)
        set_path(data, key, value)
    return validate(Config, data, _ADAPTER)


def validate(cls: Any, data: dict, adapter: TypeAdapter | None = None) -> Any:
    """Validate a nested dict into the dataclass tree `cls`, or raise one ConfigError naming the key."""
    _check_keys(data, cls)
    try:
        return (adapter or TypeAdapter(cls)).validate_python(data)
    except ValidationError as err:
        raise ConfigError(_format_validation(err)) from None


def _nested(dotted: str, value: Any) -> dict:
    out: dict = {}
    set_path(out, dotted, value)
    return out


def read_yaml(path: str | Path, what: str = "job file") -> Any:
    """A YAML file's content, its `name` defaulting to the file's stem; a missing file or bad YAML is
    one ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if isinstance(data, dict):
        data.setdefault("name", path.stem)
    return data


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a job YAML, apply overrides, validate. The run name defaults to the file's stem."""
    return from_dict(read_yaml(path), overrides)


def to_dict(cfg: Config) -> dict:
    """The resolved config as plain YAML-safe types: keys sorted in each section, tuples as lists."""
    return to_plain(cfg)


def dump_config(cfg: Config) -> str:
    """YAML text that `load_config` reads back to an equal Config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`; used for tracking params and sweep keys."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def field_docs(cls: Any = Config, prefix: str = "") -> dict[str, str]:
    """Every leaf key with its docstring, read from the source (attribute docstrings)."""
    out: dict[str, str] = {}
    for name, finfo in cls.__pydantic_fields__.items():
        sub = _section_type(cls, name)
        if sub is not None:
            out.update(field_docs(sub, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = (finfo.description or "").strip()
    return out


def to_plain(obj: Any) -> Any:
    """A dataclass (or dicts and lists of them) as plain YAML- and JSON-safe types: tuples become lists,
    each dict's keys are sorted (the order a YAML dump and load gives, which every job dump, logged param
    and checkpoint has had so far)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)  # a deep copy
    if isinstance(obj, dict):
        return {k: to_plain(obj[k]) for k in sorted(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj

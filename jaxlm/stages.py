"""The stage plan of a run: which stage step N is in, and the learning rate at every step.

`config.stages` is an ordered tuple of dicts, each one stage of training:

    dict(
        name="main",            # shown in the log; default 'stage<i>'
        steps=1000,             # budget in optimizer steps, or instead:
        tokens=2_000_000,       # budget in tokens (rounded up to whole steps of this stage)
        weights=dict(a=1.0),    # mixture weights by dataset (default: data.datasets.<n>.weight)
        seq_len=256,            # L (default: train.seq_len)
        batch_size=32,          # global batch in sequences (default: train.batch_size); a
                                # multiple of the micro-batch train.batch_size / train.grad_accum
        lr=dict(...),           # learning-rate segment (below); default: see `Plan.schedule`
        rope_theta=5e5,         # RoPE base from this stage on (default: the previous stage's)
        rope_scaling=("yarn", 4.0, 2048),  # RoPE scaling from this stage on (rope.parse_scaling:
                                # Llama 3's 4-tuple, ("linear", f), ("yarn", f, original, ...)),
                                # or None
    )

A learning-rate segment, in multiples of `optim.lr` (Muon's matrices follow the same shape
scaled to `optim.muon.lr`): `warmup` steps rise linearly from `start` to `peak`, then `decay`
('constant' | 'linear' | 'cosine' | 'wsd') goes from `peak` to `end` by the stage's last step
('wsd' holds `peak` and decays over the last `decay_fraction` of the stage). `start` defaults to
where the previous stage ended (the first stage: `optim.init_lr` with a warmup, else `peak`),
`peak` to `start` (1.0 for the first stage), `end` to `peak` ('constant') or to
`optim.min_lr_ratio`: so consecutive stages join without a jump unless a stage asks for one.
Without any `lr` in any stage, the run follows `optim.schedule` over all its steps, exactly as a
run without stages does.

A run without `config.stages` is a plan of one stage made of `train.*`: every run goes through
the same stream (`data/stream.py`), the same step programs (`train.Setup.jit_train_step`) and the
same schedule (`optim.segment_lr`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jaxlm import optim, rope
from jaxlm.errors import ConfigError

STAGE_KEYS = (
    "name",
    "steps",
    "tokens",
    "weights",
    "seq_len",
    "batch_size",
    "lr",
    "rope_theta",
    "rope_scaling",
)
LR_KEYS = ("warmup", "start", "peak", "decay", "end", "decay_fraction")
DECAYS = ("constant", "linear", "cosine", "wsd")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage, resolved: steps [start, end), its data and shapes."""

    index: int
    name: str
    start: int  # first step of the stage (0-based count of updates before it)
    end: int  # one past its last step
    weights: dict[str, float]  # mixture weights, normalised to sum to 1
    seq_len: int  # L
    batch_size: int  # global rows per step
    grad_accum: int  # micro-batches per step (batch_size / micro_batch)
    rope_theta: float
    rope_scaling: tuple | None
    weights_key: str  # the config key the weights come from (for messages)
    lr: dict | None  # resolved segment (start, peak, end in absolute units), or None when the
    # run follows optim.* over all its steps (no stage has an lr)

    @property
    def steps(self) -> int:
        return self.end - self.start

    @property
    def rope(self) -> tuple:
        """What the stage's model differs in from another stage's: its RoPE."""
        return (self.rope_theta, self.rope_scaling)

    @property
    def program_key(self) -> tuple:
        """What decides the stage's compiled step: batch shape, micro-batches and RoPE."""
        return (self.batch_size, self.seq_len, self.grad_accum, self.rope)

    def describe(self) -> str:
        """One log line: what changes at this stage."""
        mix = ", ".join(f"{n} {w:.0%}" for n, w in self.weights.items() if w > 0)
        return (
            f"stage {self.index} ({self.name}): steps {self.start}-{self.end} | seq_len "
            f"{self.seq_len} | batch {self.batch_size} ({self.grad_accum} micro-batch"
            f"{'es' if self.grad_accum > 1 else ''}) | "
            f"mix {mix} | rope_theta {self.rope_theta:g}"
            + (f" scaling {tuple(self.rope_scaling)}" if self.rope_scaling else "")
        )


@dataclasses.dataclass(frozen=True)
class Plan:
    """Every stage of a run, and the one answer to "what stage is step N in"."""

    stages: tuple[Stage, ...]
    micro_batch: int  # rows per micro-batch, the same in every stage (one scan step of the step)
    schedule: Any  # optax.Schedule: base learning rate at update count n (0-based)

    @property
    def total_steps(self) -> int:
        return self.stages[-1].end

    @property
    def programs(self) -> list[Stage]:
        """The first stage of each distinct step program the run executes: stages that share
        a batch shape and a RoPE share one compiled program."""
        seen, out = set(), []
        for s in self.stages:
            key = s.program_key
            if key not in seen:
                seen.add(key)
                out.append(s)
        return out

    @property
    def max_seq_len(self) -> int:
        """The longest stage length: held-out evaluation runs at it, the whole run long."""
        return max(s.seq_len for s in self.stages)

    def stage_at(self, step: int) -> Stage:
        """The stage that update number `step` (0-based) belongs to; past the end, the last."""
        for stage in self.stages:
            if step < stage.end:
                return stage
        return self.stages[-1]

    def tokens_before(self, step: int) -> int:
        """Tokens trained on in the first `step` updates."""
        return sum(
            max(0, min(step, s.end) - s.start) * s.batch_size * s.seq_len for s in self.stages
        )


def build(config: Any) -> Plan:
    """The plan of `config`, checked whole: every problem is a one-sentence ConfigError.

    Needs no data: dataset names are checked against `config.data.datasets` when the run
    prepares its own data (against the manifest later, by `check_weights`).
    """
    t, o = config.train, config.optim
    micro = t.batch_size // max(t.grad_accum, 1)
    default_weights = {n: float(d.get("weight", 1.0)) for n, d in config.data.datasets.items()}
    raw = tuple(config.get("stages") or ())
    if not raw:
        # One stage made of train.*: the same plan a one-entry config.stages would give.
        raw = (dict(name="main", steps=t.steps),)
        if not t.steps:
            # train.steps=0 evaluates the (init_from) model and stops: a plan of no updates.
            raw = ()
    elif t.steps:
        raise ConfigError(
            f"train.steps={t.steps} and config.stages both set the run length; set "
            "train.steps=0 (the stages' budgets add up to the run)."
        )
    stages, step = [], 0
    theta, scaling = config.model.rope_theta, _scaling(config.model.rope_scaling)
    for i, spec in enumerate(raw):
        key = f"stages[{i}]"
        if not isinstance(spec, dict):
            raise ConfigError(f"{key} must be a dict of stage settings, not {spec!r}.")
        unknown = sorted(set(spec) - set(STAGE_KEYS))
        if unknown:
            raise ConfigError(f"{key}.{unknown[0]} is not a stage setting; use {STAGE_KEYS}.")
        seq_len = _positive(spec.get("seq_len", t.seq_len), f"{key}.seq_len")
        if seq_len > config.model.max_seq_len:
            raise ConfigError(
                f"{key}.seq_len={seq_len} exceeds model.max_seq_len={config.model.max_seq_len}."
            )
        batch = _positive(spec.get("batch_size", t.batch_size), f"{key}.batch_size")
        if batch % micro:
            raise ConfigError(
                f"{key}.batch_size={batch} must be a multiple of the micro-batch "
                f"train.batch_size / train.grad_accum = {micro}."
            )
        if ("steps" in spec) == ("tokens" in spec):
            raise ConfigError(f"{key} needs exactly one budget: steps=<n> or tokens=<n>.")
        if "steps" in spec:
            n = _positive(spec["steps"], f"{key}.steps")
        else:
            n = math.ceil(_positive(spec["tokens"], f"{key}.tokens") / (batch * seq_len))
        weights = spec.get("weights", default_weights)
        weights_key = f"{key}.weights" if "weights" in spec else "data.datasets"
        if not isinstance(weights, dict):
            raise ConfigError(f"{key}.weights must be a dict of dataset name -> weight.")
        missing = sorted(set(weights) - set(default_weights))
        if missing and not config.data.manifest:
            raise ConfigError(
                f"{key}.weights names {missing[0]!r}, which is not in data.datasets "
                f"({sorted(default_weights)})."
            )
        if "rope_theta" in spec:
            theta = float(_positive(spec["rope_theta"], f"{key}.rope_theta", float))
        if "rope_scaling" in spec:
            scaling = _scaling(spec["rope_scaling"], f"{key}.rope_scaling")
        stages.append(
            Stage(
                index=i,
                name=str(spec.get("name", f"stage{i}")),
                start=step,
                end=step + n,
                weights=_normalised({n_: float(w) for n_, w in weights.items()}, weights_key),
                weights_key=weights_key,
                seq_len=seq_len,
                batch_size=batch,
                grad_accum=batch // micro,
                rope_theta=theta,
                rope_scaling=scaling,
                lr=_check_lr(spec.get("lr"), f"{key}.lr", n),
            )
        )
        step += n
    if not stages:  # train.steps=0: shapes of train.*, no updates
        stages = [_no_updates(config, default_weights, theta, scaling)]
    if not any(s.lr for s in stages):
        segments = [(0, step, optim.whole_run_segment(o, step))]
    else:
        stages = _resolve_lr(stages, o)
        segments = [(s.start, s.steps, s.lr) for s in stages]
    return Plan(tuple(stages), micro, optim.join_segments(segments))


def _no_updates(config: Any, weights: dict, theta: float, scaling: tuple | None) -> Stage:
    t = config.train
    return Stage(
        index=0,
        name="main",
        start=0,
        end=0,
        weights=_normalised(weights, "data.datasets"),
        weights_key="data.datasets",
        seq_len=t.seq_len,
        batch_size=t.batch_size,
        grad_accum=t.grad_accum,
        rope_theta=theta,
        rope_scaling=scaling,
        lr=None,
    )


def check_weights(plan: Plan, dataset_names: list[str], where: str) -> None:
    """Refuses stage weights that name a dataset the prepared data does not have."""
    for stage in plan.stages:
        missing = sorted(set(stage.weights) - set(dataset_names))
        if missing:
            raise ConfigError(
                f"{stage.weights_key} names {missing[0]!r}, which {where} does not have "
                f"({sorted(dataset_names)})."
            )


def _positive(value: Any, key: str, kind: type = int) -> Any:
    """`value` if it is a positive number of `kind` (int: a whole number), else a ConfigError."""
    kinds = (int,) if kind is int else (int, float)
    if not isinstance(value, kinds) or isinstance(value, bool) or value <= 0:
        whole = " whole" if kind is int else ""
        raise ConfigError(f"{key}={value!r} must be a positive{whole} number.")
    return value


def _scaling(value: Any, key: str = "model.rope_scaling") -> tuple | None:
    return rope.parse_scaling(value, key)


def _normalised(weights: dict[str, float], key: str) -> dict[str, float]:
    if any(w < 0 for w in weights.values()) or not sum(weights.values()) > 0:
        raise ConfigError(f"{key}={weights!r}: weights must be non-negative and not all 0.")
    total = sum(weights.values())
    return {n: w / total for n, w in sorted(weights.items())}


def _check_lr(lr: Any, key: str, steps: int) -> dict | None:
    if lr is None:
        return None
    if not isinstance(lr, dict):
        raise ConfigError(f"{key} must be a dict with keys from {LR_KEYS}.")
    unknown = sorted(set(lr) - set(LR_KEYS))
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]} is not a schedule setting; use {LR_KEYS}.")
    if lr.get("decay", "constant") not in DECAYS:
        raise ConfigError(f"{key}.decay={lr['decay']!r} must be one of {DECAYS}.")
    warmup = lr.get("warmup", 0)
    if not isinstance(warmup, int) or not 0 <= warmup <= steps:
        raise ConfigError(f"{key}.warmup={warmup!r} must be a whole number in [0, {steps}].")
    for name in ("start", "peak", "end"):
        if name in lr and not (isinstance(lr[name], (int, float)) and lr[name] >= 0):
            raise ConfigError(f"{key}.{name}={lr[name]!r} must be a non-negative multiple.")
    if not 0 <= lr.get("decay_fraction", 0.0) <= 1:
        raise ConfigError(f"{key}.decay_fraction={lr['decay_fraction']!r} must be in [0, 1].")
    return dict(lr)


def _resolve_lr(stages: list[Stage], o: Any) -> list[Stage]:
    """Fills each stage's segment in absolute units, continuing from the previous stage's end."""
    level = None  # where the previous stage ended
    out = []
    for s in stages:
        lr = dict(s.lr or {"decay": "constant"})
        if level is None:  # the first stage: warm up from optim.init_lr to optim.lr
            peak = lr.get("peak", 1.0)
            start = lr.get("start", o.init_lr / o.lr if o.lr and lr.get("warmup") else peak)
        else:
            start = lr.get("start", level)
            peak = lr.get("peak", start)
        decay = lr.get("decay", "constant")
        end = lr.get("end", peak if decay == "constant" else o.min_lr_ratio)
        seg = dict(
            warmup=lr.get("warmup", 0),
            start=start * o.lr,
            peak=peak * o.lr,
            end=end * o.lr,
            decay=decay,
            decay_fraction=lr.get("decay_fraction", o.decay_fraction),
        )
        out.append(dataclasses.replace(s, lr=seg))
        level = end
    return out

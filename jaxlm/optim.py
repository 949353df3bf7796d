"""Optimizer: learning-rate schedules, per-group optimizers (AdamW, Muon, Lion), clipping."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers

from jaxlm.errors import ConfigError

SCHEDULES = ("cosine", "linear", "wsd", "constant")
OPTIMIZERS = ("adamw", "muon", "lion")
GROUPS = ("matrix", "embedding", "vector")
HEAD = "head"  # the untied output head's own group, when optim.groups.head sets a scale

# Block matrices by name: (rank, how many leading axes are the input side). Muon orthogonalizes
# each as a (fan-in, fan-out) matrix; a leading `layers` axis (scanned blocks) is a batch axis,
# so every layer is orthogonalized on its own.
_MATRICES = {
    "wq": (3, 1),  # (D, H, E): D in, H*E out
    "wk": (3, 1),
    "wv": (3, 1),
    "wo": (3, 2),  # (H, E, D): H*E in, D out
    "w_gate": (2, 1),  # (D, F)
    "w_up": (2, 1),
    "w_down": (2, 1),  # (F, D)
    "w_mtp": (2, 1),  # (T, D, D): one matrix per multi-token-prediction head
}
_EMBEDDINGS = ("embed", "lm_head", "value_embeds")
MUON_VARIANTS = ("newton_schulz", "polar_express", "normuon")
# Polar Express (Amsel et al. 2025) for 5 iterations, as modded-nanogpt computed them (safety
# factor 2e-2, cushion 2): the best odd quintic for each iteration in turn, where Muon repeats
# one. Their input is X / (1.02 |X|_F); optax divides by |X|_F alone, so the first iteration's
# coefficients take the 1/1.02 (its powers 1, 3, 5) instead.
_POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
_POLAR_SAFETY = 1.02
_NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)  # Muon's one quintic (optax's default)


def ns_coeffs(variant: str, ns_steps: int, loop: bool = False) -> tuple:
    """The quintic coefficients of `variant`'s orthogonalization iterations, as optax takes
    them: a table of one row per iteration, which optax runs under `lax.scan` (`loop`, and
    always for Polar Express), or Muon's one repeated quintic as a single row, which optax
    unrolls.

    Both compute the same update. XLA:CPU ran tiny's 21 unstacked matrices 2.1x faster as the
    loop (200 vs 416 ms a step) and four scanned 128-wide layers 8% faster unrolled.
    """
    if variant == "polar_express":
        return polar_express_coeffs(ns_steps)
    return (_NEWTON_SCHULZ,) * ns_steps if loop else _NEWTON_SCHULZ


def polar_express_coeffs(ns_steps: int) -> tuple[tuple[float, float, float], ...]:
    """The first `ns_steps` (<= 5) Polar Express iterations for optax's Frobenius-normalised
    input."""
    if not 1 <= ns_steps <= len(_POLAR_EXPRESS):
        raise ConfigError(
            f"optim.muon.ns_steps={ns_steps}: polar_express has coefficients for 1 to "
            f"{len(_POLAR_EXPRESS)} iterations."
        )
    (a, b, c), *rest = _POLAR_EXPRESS[:ns_steps]
    k = 1 / _POLAR_SAFETY
    return ((a * k, b * k**3, c * k**5), *rest)


def whole_run_segment(optim_cfg: Any, total_steps: int) -> dict:
    """`optim.*` as one learning-rate segment over `total_steps` updates: linear warmup from
    `init_lr` to `lr` over `warmup_steps`, then `schedule` down to `lr * min_lr_ratio`.

    cosine: half-cosine decay; linear: straight line; constant: no decay; wsd (warmup-stable-
    decay): hold `lr`, then decay linearly over the last `decay_fraction` of the steps.
    """
    constant = optim_cfg.schedule == "constant"
    return dict(
        warmup=min(int(optim_cfg.warmup_steps), total_steps),
        start=optim_cfg.init_lr if optim_cfg.warmup_steps else optim_cfg.lr,
        peak=optim_cfg.lr,
        end=optim_cfg.lr if constant else optim_cfg.lr * optim_cfg.min_lr_ratio,
        decay=optim_cfg.schedule,
        decay_fraction=optim_cfg.decay_fraction,
    )


def segment_lr(seg: dict, steps: int, t: Any) -> Any:
    """The learning rate at local update `t` (0-based) of a segment of `steps` updates: the one
    schedule implementation (a run without stages is one segment, `whole_run_segment`).

    `warmup` updates rise linearly from `start` to `peak`, then `decay` goes from `peak` to `end`
    by the last update. Shifted by one: the first warmup update already moves (`init_lr` is
    often 0), and the last update uses exactly `end`, where a following segment starts.
    """
    t = jnp.asarray(t, jnp.float32)
    w = seg["warmup"]
    warm = seg["start"] + (seg["peak"] - seg["start"]) * jnp.minimum(t + 1, max(w, 1)) / max(w, 1)
    m = max(steps - w, 1)  # decay steps
    u = jnp.clip(t - w + 1, 0, m)  # decay steps done, 1..m
    peak, end = seg["peak"], seg["end"]
    if seg["decay"] == "constant":
        decay = jnp.full_like(t, peak)
    elif seg["decay"] == "linear":
        decay = peak + (end - peak) * u / m
    elif seg["decay"] == "cosine":
        decay = end + (peak - end) * 0.5 * (1 + jnp.cos(jnp.pi * u / m))
    else:  # wsd: hold, then a linear cool-down over the last decay_fraction of the segment
        cooldown = max(int(round(m * seg["decay_fraction"])), 1)
        decay = peak + (end - peak) * jnp.clip(u - (m - cooldown), 0, cooldown) / cooldown
    return jnp.where(t < w, warm, decay)


def join_segments(segments: list[tuple[int, int, dict]]) -> optax.Schedule:
    """One schedule over a run made of `(first update, updates, segment)` pieces in order."""
    parts = [lambda t, seg=seg, n=n: segment_lr(seg, n, t) for _, n, seg in segments]
    if len(parts) == 1:
        return parts[0]
    return optax.join_schedules(parts, [first for first, _, _ in segments[1:]])


def _leaf_name(path: tuple) -> str:
    return str(getattr(path[-1], "key", path[-1]))


def param_groups(params: Any, head: bool = False) -> Any:
    """Each parameter's group: 'matrix' (attention and MLP weights, stacked over layers or
    not), 'embedding' (token embedding, output head) or 'vector' (norm scales); with `head`,
    the untied output head `lm_head` is 'head', a group of its own.

    By name, not by rank: with scanned layers a norm scale is (layers, D), rank 2, and must
    still get no weight decay and no Muon.
    """

    def group(path, _):
        name = _leaf_name(path)
        if name in _MATRICES:
            return "matrix"
        if head and name == "lm_head":
            return HEAD
        return "embedding" if name in _EMBEDDINGS else "vector"

    return jax.tree_util.tree_map_with_path(group, params)


def _muon_dims(params: Any) -> Any:
    """Muon's view of each block matrix: fan-in axes, fan-out axes, the rest batch axes."""

    def dims(path, p):
        name = _leaf_name(path)
        if name not in _MATRICES:
            return None
        rank, fan_in = _MATRICES[name]
        first = p.ndim - rank  # 1 with a leading layers axis, else 0
        return MuonDimensionNumbers(
            reduction_axis=tuple(range(first, first + fan_in)),
            output_axis=tuple(range(first + fan_in, p.ndim)),
        )

    return jax.tree_util.tree_map_with_path(dims, params)


def group_scales(optim_cfg: Any) -> dict[str, tuple[float, float]]:
    """(lr_scale, wd_scale) of each group in use: GROUPS, and HEAD when `optim.groups.head`
    sets either scale (the one it leaves None follows the embedding group's)."""
    scales = {g: (optim_cfg.groups[g].lr_scale, optim_cfg.groups[g].wd_scale) for g in GROUPS}
    head = optim_cfg.groups.get(HEAD) or {}
    lr_scale, wd_scale = head.get("lr_scale"), head.get("wd_scale")
    if lr_scale is None and wd_scale is None:
        return scales  # the head stays in the embedding group: the program of before
    for key, value in (("lr_scale", lr_scale), ("wd_scale", wd_scale)):
        if value is not None and not value >= 0:
            raise ConfigError(f"optim.groups.head.{key}={value!r} must be non-negative.")
    embedding_lr, embedding_wd = scales["embedding"]
    scales[HEAD] = (
        embedding_lr if lr_scale is None else lr_scale,
        embedding_wd if wd_scale is None else wd_scale,
    )
    return scales


def _group_optimizer(
    optim_cfg: Any, group: str, lr_scale: float, wd_scale: float, schedule: optax.Schedule
) -> optax.GradientTransformation:
    lr = _scaled(schedule, lr_scale)
    wd = optim_cfg.weight_decay * wd_scale
    name = optim_cfg.name
    if name == "muon" and group == "matrix":
        # Muon's step size is its own (orthogonalized updates have unit spectral scale); the
        # schedule's shape is shared, so warmup and decay happen together for every group.
        muon_lr = _scaled(schedule, lr_scale * optim_cfg.muon.lr / optim_cfg.lr)
        return _muon(optim_cfg.muon, muon_lr, wd)
    if name == "lion":
        return optax.lion(lr, b1=optim_cfg.b1, b2=optim_cfg.b2, weight_decay=wd)
    return optax.adamw(lr, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps, weight_decay=wd)


def _muon(muon_cfg: Any, lr: optax.Schedule, weight_decay: float) -> optax.GradientTransformation:
    """Muon on the matrix group in `optim.muon.variant`'s form (`MUON_VARIANTS`)."""
    variant = muon_cfg.get("variant", "newton_schulz")  # configs saved before variants existed
    if variant not in MUON_VARIANTS:
        raise ConfigError(f"optim.muon.variant must be one of {MUON_VARIANTS}, not {variant!r}.")
    rms = muon_cfg.consistent_rms or None
    coeffs = ns_coeffs(variant, muon_cfg.ns_steps, muon_cfg.get("ns_loop", False))
    if variant != "normuon":
        return optax.contrib.muon(
            lr,
            ns_steps=muon_cfg.ns_steps,
            beta=muon_cfg.beta,
            weight_decay=weight_decay,
            muon_weight_dimension_numbers=_muon_dims,
            consistent_rms=rms,
            ns_coeffs=coeffs,
        )
    return optax.chain(
        optax.contrib.scale_by_muon(
            ns_coeffs=coeffs,
            ns_steps=muon_cfg.ns_steps,
            beta=muon_cfg.beta,
            weight_dimension_numbers=_muon_dims,
        ),
        scale_by_neuron_rms(muon_cfg.beta2),
        _scale_by_muon_shape(rms),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(lr),
    )


def scale_by_neuron_rms(beta2: float, eps: float = 1e-8) -> optax.GradientTransformation:
    """NorMuon's step (Li et al. 2025) after the orthogonalization: each output neuron's update
    (fan-out index; the fan-in axes reduced) is divided by the root of an EMA of its mean
    squared value, then the matrix is rescaled to its norm before, so Muon's step size holds.

    The state is one (fan-in axes kept as 1) second-moment array per matrix, fp32.
    """

    def reduced(params):
        def one(dims, p):
            return jnp.mean(jnp.zeros_like(p, jnp.float32), axis=dims.reduction_axis, keepdims=True)

        return jax.tree.map(one, _muon_dims(params), params, is_leaf=_is_dims)

    def update(updates, state, params=None):
        del params

        def one(dims, u, v):
            u32 = u.astype(jnp.float32)
            v = beta2 * v + (1 - beta2) * jnp.mean(
                u32 * u32, axis=dims.reduction_axis, keepdims=True
            )
            normed = u32 / (jnp.sqrt(v) + eps)
            norm_ratio = jnp.linalg.norm(u32) / (jnp.linalg.norm(normed) + eps)
            return (normed * norm_ratio).astype(u.dtype), v

        out = jax.tree.map(one, _muon_dims(updates), updates, state, is_leaf=_is_dims)
        return jax.tree.map(lambda _, o: o[0], state, out), jax.tree.map(
            lambda _, o: o[1], state, out
        )

    return optax.GradientTransformation(reduced, update)


def _scale_by_muon_shape(consistent_rms: float | None) -> optax.GradientTransformation:
    """optax Muon's shape factor on each orthogonalized matrix: sqrt(max(1, fan-out / fan-in)),
    or with `consistent_rms` that RMS times sqrt(max(fan-in, fan-out))."""

    def update(updates, state, params=None):
        del params

        def one(dims, u):
            fan_in = math.prod(u.shape[a] for a in dims.reduction_axis)
            fan_out = math.prod(u.shape[a] for a in dims.output_axis)
            if consistent_rms is None:
                return u * math.sqrt(max(1.0, fan_out / fan_in))
            return u * (consistent_rms * math.sqrt(max(fan_in, fan_out)))

        return jax.tree.map(one, _muon_dims(updates), updates, is_leaf=_is_dims), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def _is_dims(x: Any) -> bool:
    return isinstance(x, MuonDimensionNumbers)


def _scaled(schedule: optax.Schedule, factor: float) -> optax.Schedule:
    return schedule if factor == 1.0 else (lambda count: schedule(count) * factor)


def make_optimizer(optim_cfg: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Global-norm clipping, then one optimizer per parameter group (`param_groups`,
    `group_scales`), each with its own learning-rate scale and weight decay; `schedule` is the
    base learning rate (`optim.lr`'s curve, the stage plan's `Plan.schedule`)."""
    optim_cfg = _with_defaults(optim_cfg)
    if optim_cfg.name not in OPTIMIZERS:
        raise ValueError(f"optim.name must be one of {OPTIMIZERS}, not {optim_cfg.name!r}.")
    parts = []
    if optim_cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim_cfg.clip_norm))
    scales = group_scales(optim_cfg)
    head = HEAD in scales
    if optim_cfg.name == "adamw" and all(
        lr == 1.0 and wd in (0.0, 1.0) for lr, wd in scales.values()
    ):
        # One AdamW with a decay mask: the same updates as one AdamW per group, and the state
        # layout of checkpoints written before per-group optimizers existed, so they resume.
        decayed = {g for g, (_, wd) in scales.items() if wd == 1.0}
        adamw = optax.adamw(
            schedule,
            b1=optim_cfg.b1,
            b2=optim_cfg.b2,
            eps=optim_cfg.eps,
            weight_decay=optim_cfg.weight_decay,
            mask=lambda params: jax.tree.map(lambda g: g in decayed, param_groups(params, head)),
        )
        return optax.chain(*parts, adamw)
    per_group = {g: _group_optimizer(optim_cfg, g, *scales[g], schedule) for g in scales}
    parts.append(optax.multi_transform(per_group, lambda params: param_groups(params, head)))
    return optax.chain(*parts)


def _with_defaults(optim_cfg: Any) -> Any:
    """Configs saved before optimizer choice existed (checkpoint metadata) train with AdamW."""
    if "name" in optim_cfg:
        return optim_cfg
    optim_cfg = optim_cfg.copy_and_resolve_references()
    with optim_cfg.unlocked():
        optim_cfg.name = "adamw"
        optim_cfg.groups = {
            g: dict(lr_scale=1.0, wd_scale=0.0 if g == "vector" else 1.0) for g in GROUPS
        }
    return optim_cfg


def map_param_leaves(
    opt_state: Any, params: Any, values: Any, per_param: Callable, other: Callable
) -> Any:
    """Maps each optimizer-state leaf that mirrors a parameter (Adam moments, Muon momentum)
    to `per_param(state_leaf, value)`, with `value` the leaf of `values` (a tree shaped like
    `params`) at that parameter; every other leaf (step counters, coefficients) to
    `other(state_leaf)`.

    A state leaf mirrors the parameter whose key path ends its own key path and has its shape;
    unlike optax.tree_map_params this sees through the masked sub-states of per-group
    optimizers.
    """
    flat = jax.tree_util.tree_leaves_with_path(params)
    by_path = {
        tuple(path): (param, value)
        for (path, param), value in zip(flat, jax.tree.leaves(values), strict=True)
    }
    longest = max((len(p) for p in by_path), default=0)

    def one(path, leaf):
        for n in range(min(longest, len(path)), 0, -1):
            param, value = by_path.get(tuple(path[-n:]), (None, None))
            if param is not None and param.shape == leaf.shape:
                return per_param(leaf, value)
        return other(leaf)

    return jax.tree_util.tree_map_with_path(one, opt_state)


def global_norm(tree: Any) -> jax.Array:
    """L2 norm over every leaf of a tree, in fp32."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))

"""Optimizer: learning-rate schedules, AdamW with a decay mask, and global-norm clipping."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "linear", "wsd", "constant")


def make_schedule(optim_cfg: Any, total_steps: int) -> optax.Schedule:
    """Linear warmup from `init_lr` to `lr`, then decay to `lr * min_lr_ratio` by `total_steps`.

    cosine: half-cosine decay; linear: straight line; constant: no decay; wsd (warmup-stable-
    decay): hold `lr`, then decay linearly over the last `decay_fraction` of the steps.
    """
    peak, floor = optim_cfg.lr, optim_cfg.lr * optim_cfg.min_lr_ratio
    warmup = min(optim_cfg.warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    warm = optax.linear_schedule(optim_cfg.init_lr, peak, max(warmup, 1))
    name = optim_cfg.schedule
    if name == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=floor / peak if peak else 0.0)
    elif name == "linear":
        decay = optax.linear_schedule(peak, floor, decay_steps)
    elif name == "constant":
        decay = optax.constant_schedule(peak)
    elif name == "wsd":
        cooldown = max(int(decay_steps * optim_cfg.decay_fraction), 1)
        decay = optax.join_schedules(
            [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, cooldown)],
            [decay_steps - cooldown],
        )
    else:
        raise ValueError(f"optim.schedule must be one of {SCHEDULES}, not {name!r}.")
    if warmup == 0:
        return decay
    schedule = optax.join_schedules([warm, decay], [warmup])
    # Shift by one so the first update already uses a non-zero warmup rate (init_lr is often 0).
    return lambda count: schedule(count + 1)


def decay_mask(params: Any) -> Any:
    """True for weights that get weight decay: matrices, not norm scales or biases (ndim < 2)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(
    optim_cfg: Any, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with global-norm clipping; returns the transformation and its schedule."""
    schedule = make_schedule(optim_cfg, total_steps)
    parts = []
    if optim_cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim_cfg.clip_norm))
    parts.append(
        optax.adamw(
            schedule,
            b1=optim_cfg.b1,
            b2=optim_cfg.b2,
            eps=optim_cfg.eps,
            weight_decay=optim_cfg.weight_decay,
            mask=decay_mask,
        )
    )
    return optax.chain(*parts), schedule


def global_norm(tree: Any) -> jax.Array:
    """L2 norm over every leaf of a tree, in fp32."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))

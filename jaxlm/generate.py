"""Batched sampling with a KV cache: temperature, top-k, top-p, stop on EOS.

Prompts of different lengths are left-padded into one batch; padding slots carry segment id 0 so
no token attends to them, and positions count real tokens only, so a padded prompt produces the
same logits as the prompt alone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm import model as model_lib
from jaxlm import sharding


def sample_logits(
    logits: jax.Array, key: jax.Array, temperature: float, top_k: int, top_p: float
) -> jax.Array:
    """Draws one token per row from logits (B, V); temperature 0 means greedy."""
    if temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # (B, 1)
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if 0 < top_p < 1:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep the smallest set whose mass reaches top_p: a token stays if the mass before it < p.
        cutoff_index = jnp.sum(cum - jax.nn.softmax(sorted_logits, axis=-1) < top_p, axis=-1) - 1
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index[:, None], axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits).astype(jnp.int32)


def _generate(
    graphdef, params, tokens, prompt_mask, key, eos_id, *, max_new_tokens, temperature, top_k, top_p
):
    model = nnx.merge(graphdef, params)
    cfg = model.cfg
    B, P = tokens.shape
    segment_ids = jnp.concatenate([prompt_mask, jnp.ones((B, max_new_tokens), jnp.int32)], axis=1)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)  # (B, P)
    cache = model_lib.init_cache(cfg, segment_ids)
    logits, cache = model(tokens, positions, prompt_mask, cache=cache)
    next_pos = positions[:, -1] + 1  # (B,)

    def step(carry, key):
        logits_last, cache, pos, done = carry
        token = sample_logits(logits_last, key, temperature, top_k, top_p)
        token = jnp.where(done, eos_id, token)
        done = done | (token == eos_id)
        logits, cache = model(
            token[:, None], pos[:, None], jnp.ones((B, 1), jnp.int32), cache=cache
        )
        return (logits[:, -1], cache, pos + 1, done), token

    keys = jax.random.split(key, max_new_tokens)
    init = (logits[:, -1], cache, next_pos, jnp.zeros((B,), bool))
    _, out = jax.lax.scan(step, init, keys)
    return out.T  # (B, max_new_tokens)


@functools.lru_cache(maxsize=8)
def jitted_generate(mesh_rules: sharding.MeshRules | None) -> Callable:
    """`_generate` jitted for `mesh_rules`; the model (graphdef) and the sampling settings are
    static, so the jit's own cache keys on them and this one on the mesh and rules."""
    static = ("graphdef", "max_new_tokens", "temperature", "top_k", "top_p")
    return sharding.jit(_generate, mesh_rules, static_argnames=static)


def generate(
    graphdef: Any,
    params: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    mesh_rules: sharding.MeshRules | None = None,
) -> list[list[int]]:
    """Continues each prompt (token ids) by up to `max_new_tokens`, stopping at EOS.

    `mesh_rules` (a `Setup`'s, for params placed on its mesh) gives the model its sharding
    constraints; None runs it unconstrained (one device). Returns the new tokens of each
    prompt, without the EOS.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token.")
    width = max(len(p) for p in prompts)
    tokens = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    out = jitted_generate(mesh_rules)(
        graphdef,
        params,
        jnp.asarray(tokens),
        jnp.asarray(mask),
        jax.random.key(seed),
        eos_id,
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
    )
    results = []
    for row in np.asarray(out).tolist():
        results.append(row[: row.index(eos_id)] if eos_id in row else row)
    return results


def continue_text(trained: Any, ids: Sequence[int], max_new_tokens: int, **sampling) -> str:
    """The text a trained model (`jaxlm.evaluate.trained`: setup, params, tokenizer) writes after
    the token ids `ids`, up to EOS or `max_new_tokens`; `sampling` as for `generate`."""
    setup, tok = trained.setup, trained.tokenizer
    new = generate(
        setup.graphdef,
        trained.params,
        [ids],
        max_new_tokens=max_new_tokens,
        eos_id=tok.eos_id,
        mesh_rules=setup.mesh_rules,
        **sampling,
    )[0]
    return tok.decode(new)

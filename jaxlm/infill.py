"""Quick looks at non-causal models: fill a middle between a prefix and a suffix (a FIM-trained
model), or fill `[MASK]` pieces (a masked-LM encoder). Used by `tools/generate.py`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm import generate, objectives, sharding
from jaxlm.errors import JaxlmError


def _piece(tok: Any, piece: str, flag: str) -> int:
    i = tok.piece_to_id(piece)
    if i is None:
        raise JaxlmError(
            f"{flag} needs the piece {piece!r}, which this run's tokenizer lacks; train with "
            f"--config.objective={'fim' if flag == '--fill_middle' else 'masked'}."
        )
    return i


def middle_prompt(tok: Any, prefix: str, suffix: str) -> list[int]:
    """The ids a FIM model continues with the middle: a PSM document up to `<fim_middle>`, as
    the pipeline packs it ([BOS] first)."""
    pre, mid, suf = (_piece(tok, p, "--fill_middle") for p in objectives.FIM_PIECES)
    return [tok.bos_id, pre, *tok.encode(prefix), suf, *tok.encode(suffix), mid]


def fill_middle(trained: Any, prefix: str, suffix: str, max_tokens: int, **sampling) -> str:
    """The middle text the model writes between `prefix` and `suffix` (up to EOS or
    `max_tokens`); `sampling` takes generate.generate's temperature, top_k, top_p, seed."""
    tok, setup = trained.tokenizer, trained.setup
    ids = middle_prompt(tok, prefix, suffix)
    limit = setup.model_cfg.max_seq_len
    if len(ids) + max_tokens > limit:
        raise JaxlmError(
            f"prefix and suffix ({len(ids)} tokens with the sentinels) plus --max_tokens="
            f"{max_tokens} exceed the model's max_seq_len={limit}; shorten them."
        )
    return generate.continue_text(trained, ids, max_tokens, **sampling)


def encoder_logits(graphdef: Any, params: Any, ids: jax.Array) -> jax.Array:
    """Logits (B, L, V) of token rows `ids` (B, L) read whole, both ways, as one document each."""
    ones = jnp.ones_like(ids)  # one segment, and every token in the prefix: no causal mask
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
    return nnx.merge(graphdef, params)(ids, positions, ones, prefix=ones)


@functools.lru_cache(maxsize=8)
def jitted_encoder_logits(mesh_rules: sharding.MeshRules | None) -> Callable:
    """`encoder_logits` jitted for `mesh_rules` (graphdef static: the jit's own cache keys on
    it, this one on the mesh and rules)."""
    return sharding.jit(encoder_logits, mesh_rules, static_argnames="graphdef")


def fill_mask(trained: Any, text: str, top: int = 5) -> tuple[str, list[list[tuple[str, float]]]]:
    """`text` with each `[MASK]` replaced by the encoder's most likely piece, and for each mask
    its `top` pieces with their probabilities. The whole text is seen both ways, as in training.
    """
    tok, setup = trained.tokenizer, trained.setup
    mask_id = _piece(tok, objectives.MASK_PIECE, "--fill_mask")
    ids = np.array([[tok.bos_id, *tok.encode(text)]], np.int32)  # (1, L)
    where = np.flatnonzero(ids[0] == mask_id)
    if len(where) == 0:
        raise JaxlmError(f"--prompt has no {objectives.MASK_PIECE} to fill.")
    if ids.shape[1] > setup.model_cfg.max_seq_len:
        raise JaxlmError(
            f"--prompt is {ids.shape[1]} tokens; the model takes {setup.model_cfg.max_seq_len}."
        )
    logits = jitted_encoder_logits(setup.mesh_rules)(setup.graphdef, trained.params, ids)
    probs = np.asarray(jax.nn.softmax(logits[0, where], axis=-1))  # (M, V)
    filled = ids[0].copy()
    choices = []
    for m, p in zip(where, probs, strict=True):
        best = np.argsort(-p)[:top]
        filled[m] = best[0]
        choices.append(
            [(tok.decode([int(i)]) or tok.id_to_piece(int(i)), float(p[i])) for i in best]
        )
    return tok.decode(filled[1:]), choices

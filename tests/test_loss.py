"""The tiled cross-entropy (jaxlm.loss): the plain loss's values and gradients, without its
(B, L, V) logits. Sizes are primes so a ragged last tile and a swapped axis both show."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxlm import loss, train
from jaxlm import model as model_lib
from tests.helpers import VOCAB, packed_batch, tiny_config

B, L, D, V = 3, 37, 29, 331


def plain_loss_sums(hidden, head, targets, mask):
    """The plain path: whole logits, optax's cross-entropy (as train.loss_sums)."""
    logits = jnp.einsum("BLD,DV->BLV", hidden, head).astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(nll * mask), jnp.sum(mask)


def inputs(dtype=jnp.float32, seed=0):
    r = np.random.RandomState(seed)
    hidden = jnp.asarray(r.randn(B, L, D), dtype)
    head = jnp.asarray(0.3 * r.randn(D, V), dtype)
    targets = jnp.asarray(r.randint(0, V, (B, L)), jnp.int32)
    mask = jnp.asarray(r.rand(B, L) > 0.3, jnp.float32)
    return hidden, head, targets, mask


def mean_and_grads(loss_sums, hidden, head, targets, mask):
    """The step's objective (summed loss / count) and its gradients in hidden and head."""

    def mean(hidden, head):
        total, count = loss_sums(hidden, head, targets, mask)
        return total / count, (total, count)

    return jax.jit(jax.value_and_grad(mean, argnums=(0, 1), has_aux=True))(hidden, head)


# V = 331: 6 tiles of 56 (5 padding entries), 42 tiles of 8 (5 padding), 1 tile of 331.
@pytest.mark.parametrize("chunk", [64, 8, 1000])
def test_loss_and_gradients_equal_the_plain_computation(chunk):
    args = inputs()
    (mean, (total, count)), grads = mean_and_grads(plain_loss_sums, *args)
    tiled = lambda *a: loss.token_loss_sums(*a, chunk)  # noqa: E731
    (mean_t, (total_t, count_t)), grads_t = mean_and_grads(tiled, *args)
    assert count_t == count and abs(float(total_t - total)) <= 1e-6 * abs(float(total))
    assert abs(float(mean_t - mean)) <= 1e-6
    for g, g_t in zip(grads, grads_t, strict=True):
        assert g.dtype == g_t.dtype and np.abs(g).max() > 1e-3  # gradients that say something
        assert np.abs(np.asarray(g_t - g)).max() <= 1e-6


def test_bfloat16_gradients_keep_their_dtype_and_agree_to_bf16_rounding():
    args = inputs(jnp.bfloat16)
    (mean, _), grads = mean_and_grads(plain_loss_sums, *args)
    (mean_t, _), grads_t = mean_and_grads(lambda *a: loss.token_loss_sums(*a, 8), *args)
    assert abs(float(mean_t - mean)) <= 1e-5 * abs(float(mean))  # fp32 logits either way
    for g, g_t in zip(grads, grads_t, strict=True):
        assert g_t.dtype == jnp.bfloat16
        scale = np.abs(np.asarray(g, np.float32)).max()
        assert np.abs(np.asarray(g_t, np.float32) - np.asarray(g, np.float32)).max() <= scale / 64


def test_per_token_loss_and_argmax_hits_equal_the_plain_ones():
    hidden, head, targets, _ = inputs()
    logits = jnp.einsum("BLD,DV->BLV", hidden, head)
    nll, hits = loss.token_nll_and_hits(hidden, head, targets, 64)
    expected = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    assert np.abs(np.asarray(nll - expected)).max() <= 1e-5
    # Plant right answers so hits are not all False, and ties: a zero hidden state gives equal
    # logits everywhere, where jnp.argmax says 0 (the first index), not a later tile's entry.
    hidden = hidden.at[0, :4].set(0)
    logits = jnp.einsum("BLD,DV->BLV", hidden, head)
    targets = targets.at[:, ::3].set(jnp.argmax(logits, axis=-1)[:, ::3])
    targets = targets.at[0, :4].set(jnp.array([0, 1, 0, 6]))
    _, hits = loss.token_nll_and_hits(hidden, head, targets, 64)
    np.testing.assert_array_equal(hits, jnp.argmax(logits, axis=-1) == targets)
    assert int(hits.sum()) >= B * (L // 3) and hits[0, 0] and not hits[0, 1]


def test_train_loss_chunk_gives_the_plain_loss_gradients_and_eval_sums():
    """`train.loss_chunk` (the switch the step reads) gives the plain loss and parameter
    gradients (tied embeddings: the head is the embedding's transpose) and the same eval sums,
    argmax hits included; a whole train step moves the parameters the same way."""
    cfg = model_lib.ModelConfig.from_config(
        tiny_config(tie_embeddings=True, n_layers=1).model, VOCAB
    )
    graphdef, shapes = nnx.split(model_lib.abstract(cfg))
    r = np.random.RandomState(2)  # random norm scales too, so a missed final norm shows
    params = jax.tree.map(lambda s: jnp.asarray(0.3 * r.randn(*s.shape), s.dtype), shapes)
    batch = {k: jnp.asarray(v) for k, v in packed_batch(2, 23, seed=3).items()}

    def grads_of(chunk):
        fn = jax.value_and_grad(lambda p: train.loss_sums(graphdef, p, batch, chunk), has_aux=True)
        return jax.jit(fn)(params)

    (total, count), grads = grads_of(0)
    (total_t, count_t), grads_t = grads_of(7)  # 61 entries: 9 tiles of 7, the last padded
    assert count_t == count and abs(float(total_t - total)) <= 1e-6 * abs(float(total))
    # Relative to each gradient's size (of the summed loss: up to ~10 here).
    relative = jax.tree.map(
        lambda a, b: float(jnp.abs(a - b).max() / jnp.abs(a).max()), grads, grads_t
    )
    assert max(jax.tree.leaves(relative)) <= 1e-6
    plain, tiled = (jax.jit(train.make_eval_step(graphdef, True, c))(params, batch) for c in (0, 7))
    assert {k: int(plain[k]) for k in ("count", "correct", "spans", "exact")} == {
        k: int(tiled[k]) for k in ("count", "correct", "spans", "exact")
    }
    np.testing.assert_allclose(float(tiled["nll"]), float(plain["nll"]), rtol=1e-6)

    tx = optax.adam(1e-2)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.array(0, jnp.int32)}
    state["guard"] = {"loss_ema": jnp.array(0.0), "accepted": jnp.array(0, jnp.int32)}
    after = [
        jax.jit(train.make_train_step(graphdef, tx, lambda n: 1e-2, 1, loss_chunk=c))(state, batch)
        for c in (0, 7)
    ]
    np.testing.assert_allclose(float(after[1][1]["loss"]), float(after[0][1]["loss"]), rtol=1e-6)
    plain_params, tiled_params = (jax.tree.leaves(a[0]["params"]) for a in after)
    for a, b in zip(plain_params, tiled_params, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)


def test_compiled_temporaries_stay_below_the_logits_size():
    """Per the XLA compiler, the plain loss-and-gradient program holds the (B, L, V) fp32
    logits (and their gradient); the tiled one a (B, L, C) tile and the (B, L, D) sums."""
    rows, length, dim, vocab = 4, 256, 64, 2053
    logits_bytes = rows * length * vocab * 4
    args = [
        jax.ShapeDtypeStruct((rows, length, dim), jnp.float32),
        jax.ShapeDtypeStruct((dim, vocab), jnp.float32),
        jax.ShapeDtypeStruct((rows, length), jnp.int32),
        jax.ShapeDtypeStruct((rows, length), jnp.float32),
    ]

    def temp_bytes(loss_sums):
        mean = lambda *a: jnp.divide(*loss_sums(*a))  # noqa: E731
        compiled = jax.jit(jax.grad(mean, argnums=(0, 1))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    plain = temp_bytes(plain_loss_sums)
    tiled = temp_bytes(lambda *a: loss.token_loss_sums(*a, 128))
    assert plain > logits_bytes
    assert tiled < logits_bytes / 2

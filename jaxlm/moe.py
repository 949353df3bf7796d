"""Mixture-of-experts feed-forward block: a drop-in for the dense SwiGLU MLP.

A router (fp32, softmax or sigmoid scores) sends each token to its top-k of X SwiGLU experts;
optional shared experts see every token. Two dispatches compute the same function:

- dropless (`capacity_factor == 0`): the token-expert assignments are sorted by expert and the
  experts run as grouped matmuls (on TPU the Pallas megablox `gmm` kernel, on GPU
  `jax.lax.ragged_dot`, on CPU a loop over row tiles), so no assignment is ever dropped;
- capacity (`capacity_factor > 0`): each batch row gives every expert C slots; assignments past
  an expert's C-th (in position order) are dropped and counted. Fixed (X, B, C, D) buffers are
  what expert parallelism exchanges with an all-to-all.

`dense_reference` computes every expert on every token and weights by the router: the oracle
the tests hold both dispatches to.

Load balancing: the Switch/OLMoE auxiliary loss, the router z-loss, and the DeepSeek-V3
auxiliary-loss-free bias (a `RouterBias` variable, not a parameter: it only shifts which experts
are selected and is updated outside the gradient by `update_bias`).

Shape alphabet (the model's, plus): X experts, T tokens (B * L), A assignments (T * top_k),
C capacity slots per expert and row, F the expert MLP width.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm import sharding
from jaxlm.errors import ConfigError

ROUTERS = ("softmax", "sigmoid")
GROUPED_MATMULS = ("gmm", "ragged", "tiled")
TILE = 128  # rows per matmul of the tiled grouped matmul
# megablox gmm's (rows, contracted, output) tile; each is clipped to the problem, and the two
# feature tiles are equal because the backward pass swaps which feature width each one tiles.
GMM_TILING = (512, 512, 512)


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """The sparse feed-forward's shape, routing and balancing (built once from config.model.moe)."""

    n_experts: int  # X, routed experts
    top_k: int  # experts per token
    expert_d_ff: int  # F, hidden width of each expert (and of each shared expert)
    n_shared_experts: int = 0  # experts every token passes through, unweighted (DeepSeek)
    router: str = "softmax"  # softmax | sigmoid: how router logits become scores
    # Divide the top-k weights by their sum (Mixtral, Qwen3-MoE, DeepSeek-V3); OLMoE does not.
    normalize_top_k: bool = True
    aux_loss_coef: float = 0.01  # weight of the Switch/OLMoE load-balance loss in the train loss
    z_loss_coef: float = 0.0  # weight of the router z-loss (mean squared logsumexp of logits)
    # DeepSeek-V3 auxiliary-loss-free balancing: per step, each expert's selection bias moves by
    # this much toward balance (`update_bias`); 0 keeps no bias.
    bias_update_rate: float = 0.0
    capacity_factor: float = 0.0  # 0: dropless; else slots per expert = factor * L * k / X
    # Dropless grouped matmul: gmm (Pallas megablox kernel; off TPU in its slow interpret mode)
    # | ragged (jax.lax.ragged_dot) | tiled (a loop over row tiles) | auto: `default_for`.
    grouped_matmul: str = "auto"
    first_dense_layers: int = 0  # the first n layers keep the dense MLP
    every: int = 1  # after those, every k-th layer is sparse (1: all of them)

    def __post_init__(self):
        if self.n_experts < 1 or not 1 <= self.top_k <= self.n_experts:
            raise ConfigError(
                f"model.moe.top_k={self.top_k} must lie in 1..model.moe.n_experts={self.n_experts}."
            )
        if self.expert_d_ff < 1 or self.n_shared_experts < 0:
            raise ConfigError(
                f"model.moe.expert_d_ff={self.expert_d_ff} must be positive and "
                f"model.moe.n_shared_experts={self.n_shared_experts} not negative."
            )
        if self.grouped_matmul not in ("auto", *GROUPED_MATMULS):
            raise ConfigError(
                f"model.moe.grouped_matmul must be auto or one of {GROUPED_MATMULS}, "
                f"not {self.grouped_matmul!r}."
            )
        if self.router not in ROUTERS:
            raise ConfigError(f"model.moe.router must be one of {ROUTERS}, not {self.router!r}.")
        for key in ("aux_loss_coef", "z_loss_coef", "bias_update_rate", "capacity_factor"):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.moe.{key}={getattr(self, key)} must not be negative.")
        if self.first_dense_layers < 0 or self.every < 1:
            raise ConfigError(
                f"model.moe.first_dense_layers={self.first_dense_layers} must be >= 0 and "
                f"model.moe.every={self.every} >= 1."
            )

    @classmethod
    def from_fields(cls, fields: Any, d_ff: int) -> MoEConfig | None:
        """The config of a `config.model.moe` section (a ConfigDict, or a dict from JSON), or
        None for a dense model (`n_experts=0`). `expert_d_ff=0` means the model's `d_ff`."""
        fields = dict(fields)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ConfigError(
                f"model.moe.{unknown[0]} is not an MoE setting; known: {', '.join(sorted(known))}."
            )
        n_experts = fields.get("n_experts", 0)
        if not isinstance(n_experts, int) or n_experts < 0:
            raise ConfigError(f"model.moe.n_experts={n_experts!r} must be 0 (dense) or more.")
        if n_experts == 0:
            return None
        return cls(**dict(fields, expert_d_ff=fields.get("expert_d_ff") or d_ff))

    def check_model(self, n_layers: int, scan_layers: bool, mlp_act: str) -> None:
        """Refuses, in one sentence, a model these MoE settings cannot be part of."""
        sparse = [self.is_sparse(i) for i in range(n_layers)]
        if not any(sparse):
            raise ConfigError(
                f"model.moe.first_dense_layers={self.first_dense_layers} and model.moe.every="
                f"{self.every} leave no sparse layer among model.n_layers={n_layers}; set "
                "model.moe.n_experts=0 for a dense model."
            )
        if scan_layers and not all(sparse):
            raise ConfigError(
                "model.scan_layers stacks identical blocks but model.moe.first_dense_layers / "
                "model.moe.every mix dense and sparse layers; set model.scan_layers=False or "
                "make every layer sparse."
            )
        if mlp_act != "silu":
            raise ConfigError(
                f"model.moe experts are SwiGLU: model.mlp_act={mlp_act!r} must be silu."
            )

    def is_sparse(self, layer: int) -> bool:
        """Whether block `layer` (0-based) has an MoE feed-forward rather than the dense MLP."""
        later = layer - self.first_dense_layers
        return later >= 0 and (later + 1) % self.every == 0

    def capacity(self, seq_len: int) -> int:
        """Slots per expert and batch row in capacity mode: ceil(factor * L * k / X), >= 1."""
        return max(1, math.ceil(self.capacity_factor * seq_len * self.top_k / self.n_experts))


def default_for(platform: str) -> str:
    """What `grouped_matmul="auto"` becomes, as `attention.default_for` picks attention: the
    megablox kernel on TPU, ragged_dot on GPU, tiles on CPU (where XLA runs ragged_dot densely,
    X times the FLOPs)."""
    return {"tpu": "gmm", "cpu": "tiled"}.get(platform, "ragged")


def total_params(moe: MoEConfig, d_model: int) -> int:
    """Parameters of one MoE block: router, every routed expert and the shared experts."""
    expert = 3 * d_model * moe.expert_d_ff
    return d_model * moe.n_experts + (moe.n_experts + moe.n_shared_experts) * expert


def active_params(moe: MoEConfig, d_model: int) -> int:
    """Parameters one token's forward pass multiplies by in one MoE block: the router, its top_k
    experts and the shared experts. Training FLOPs per token are 6x this (plus attention)."""
    expert = 3 * d_model * moe.expert_d_ff
    return d_model * moe.n_experts + (moe.top_k + moe.n_shared_experts) * expert


def summarize(per_layer: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The model's router statistics from its sparse layers' `MoEBlock` aux, stacked on a
    leading layer axis: each scalar's mean over layers (`loss` is what the train loss adds),
    `load_max_over_mean` (the busiest expert's load over the mean load, 1 at perfect balance,
    averaged over layers) and the per-layer `load` (layers, X)."""
    load = per_layer["load"]  # (N, X)
    summary = {k: jnp.mean(v) for k, v in per_layer.items() if k != "load"}
    ratio = jnp.max(load, axis=-1) / jnp.mean(load, axis=-1)  # (N,)
    return dict(summary, load_max_over_mean=jnp.mean(ratio), load=load)


class RouterBias(nnx.Variable):
    """Per-expert selection bias (DeepSeek-V3): state, not a parameter; no gradient reaches it."""


def update_bias(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
    """DeepSeek-V3's bias step: raise underloaded experts' bias and lower overloaded ones' by
    `rate`. `load` (..., X) is the block's `aux["load"]` (fractions of assignments), stacked
    over layers or not, like `bias`."""
    return bias + rate * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], std: float):
    """A normally initialised fp32 parameter tagged with its logical axis names (as model.py)."""
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32), axes=axes)


def _swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """One SwiGLU MLP on (..., D) tokens, weights cast to the tokens' dtype."""
    dtype = x.dtype
    h = jax.nn.silu(x @ w_gate.astype(dtype)) * (x @ w_up.astype(dtype))
    return h @ w_down.astype(dtype)


class MoEBlock(nnx.Module):
    """Router + X routed SwiGLU experts (+ shared experts): x (B, L, D) -> (y (B, L, D), aux).

    `aux` holds the router statistics: `loss` (what the train loss adds: aux_loss_coef * balance
    + z_loss_coef * z), `balance_loss`, `z_loss`, `load` (X,) fraction of assignments per expert
    (sums to 1; counted before capacity drops) and `dropped` (fraction of assignments dropped).
    """

    def __init__(
        self, moe: MoEConfig, d_model: int, init_std: float, out_std: float, rngs: nnx.Rngs
    ):
        X, D, F = moe.n_experts, d_model, moe.expert_d_ff
        self.moe = moe
        self.w_router = _normal(rngs, (D, X), ("embed", "router"), init_std)
        self.w_gate = _normal(rngs, (X, D, F), ("expert", "embed", "mlp"), init_std)
        self.w_up = _normal(rngs, (X, D, F), ("expert", "embed", "mlp"), init_std)
        self.w_down = _normal(rngs, (X, F, D), ("expert", "mlp", "embed"), out_std)
        if moe.bias_update_rate:
            self.router_bias = RouterBias(jnp.zeros((X,), jnp.float32), axes=("router",))
        if moe.n_shared_experts:
            S = moe.n_shared_experts * F  # S shared experts = one SwiGLU S times as wide
            self.shared = SharedExperts(D, S, init_std, out_std, rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:  # (B, L, D)
        experts, weights, aux = self.route(x)
        if self.moe.capacity_factor:
            y, dropped = _capacity(x, experts, weights, self.expert_weights(), self.moe)
        else:
            matmul = self.moe.grouped_matmul
            if matmul == "auto":
                matmul = default_for(sharding.platform())
            y = _dropless(x, experts, weights, self.expert_weights(), matmul)
            dropped = jnp.float32(0)
        if self.moe.n_shared_experts:
            y = y + self.shared(x)
        return sharding.constrain(y, ("batch", "seq", "embed")), dict(aux, dropped=dropped)

    def expert_weights(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(w_gate, w_up, w_down) of the routed experts: (X, D, F), (X, D, F), (X, F, D)."""
        return self.w_gate[...], self.w_up[...], self.w_down[...]

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """The router in fp32: (experts (B, L, k) int32, weights (B, L, k) fp32, statistics)."""
        moe = self.moe
        # HIGHEST: an fp32 matmul on TPU otherwise runs in bf16 passes, and top-k is sensitive.
        logits = jnp.einsum(
            "BLD,DX->BLX",
            x.astype(jnp.float32),
            self.w_router[...],
            precision=jax.lax.Precision.HIGHEST,
        )
        if moe.router == "softmax":
            scores = jax.nn.softmax(logits, axis=-1)
            probs = scores
        else:
            scores = jax.nn.sigmoid(logits)
            probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
        select = scores
        if moe.bias_update_rate:
            select = scores + jax.lax.stop_gradient(self.router_bias[...])
        # top_k by a sort along the expert axis: XLA partitions a sort along its other axes,
        # but gathers every token onto every device for lax.top_k. Stable, so ties go to the
        # lower expert index, as with top_k.
        experts = jnp.argsort(-select, axis=-1, stable=True)[..., : moe.top_k]  # (B, L, k)
        weights = jnp.take_along_axis(scores, experts, axis=-1)  # the bias never weights
        if moe.normalize_top_k:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        # Fraction of assignments per expert: what the balance loss and the bias step act on.
        counts = jnp.sum(jax.nn.one_hot(experts, moe.n_experts, dtype=jnp.float32), axis=(0, 1, 2))
        load = counts / jnp.sum(counts)  # (X,)
        # Switch/OLMoE form: X * sum_x f_x P_x with f_x = assignments / tokens (sums to k) and
        # P_x the mean router probability; k at perfect balance.
        balance = moe.n_experts * jnp.sum(moe.top_k * load * jnp.mean(probs, axis=(0, 1)))
        z = jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))
        stats = {
            "loss": moe.aux_loss_coef * balance + moe.z_loss_coef * z,
            "balance_loss": balance,
            "z_loss": z,
            "load": load,
        }
        return experts, weights, stats


class SharedExperts(nnx.Module):
    """The shared experts as one SwiGLU MLP of width n_shared * F (the sum of n such experts)."""

    def __init__(self, d_model: int, width: int, init_std: float, out_std: float, rngs):
        self.w_gate = _normal(rngs, (d_model, width), ("embed", "mlp"), init_std)
        self.w_up = _normal(rngs, (d_model, width), ("embed", "mlp"), init_std)
        self.w_down = _normal(rngs, (width, d_model), ("mlp", "embed"), out_std)

    def __call__(self, x: jax.Array) -> jax.Array:  # (B, L, D)
        return _swiglu(x, self.w_gate[...], self.w_up[...], self.w_down[...])


def _dropless(x, experts, weights, w, matmul: str) -> jax.Array:
    """Every assignment computed, experts as grouped matmuls, each device running its own experts.

    Expert parallel (a preset maps `expert` to mesh axes): each device all-gathers the tokens
    of its expert group, runs its X / ep experts on the assignments that chose them, and a
    reduce-scatter sums the partial outputs back onto the tokens' devices. Otherwise each
    device runs every expert on its own tokens.
    """
    ep_axes = sharding.mesh_axes("expert")
    local = functools.partial(_dropless_local, ep_axes=ep_axes, matmul=matmul)
    tokens, routed = ("batch", "seq", "embed"), ("batch", "seq", None)
    whole_experts = ("expert", None, None)  # any other split of the weights is gathered first
    in_axes = (tokens, routed, routed, whole_experts, whole_experts, whole_experts)
    local = sharding.per_device(local, in_axes, tokens)
    return local(x, experts, weights, *w)


def _dropless_local(x, experts, weights, w_gate, w_up, w_down, ep_axes, matmul) -> jax.Array:
    """`_dropless` on one device: x (B, L, D), routing (B, L, k), this device's X' experts."""
    if ep_axes:
        x, experts, weights = (
            jax.lax.all_gather(v, ep_axes, axis=0, tiled=True) for v in (x, experts, weights)
        )
    B, L, D = x.shape
    k, X = experts.shape[-1], w_gate.shape[0]
    first = jax.lax.axis_index(ep_axes) * X if ep_axes else 0
    mine = experts.reshape(-1) - first  # (A,), assignment a is token a // k's (a % k)-th choice
    # Another device's assignments sort last, past the groups: the grouped matmul zeroes them.
    mine = jnp.where((mine >= 0) & (mine < X), mine, X)
    order = jnp.argsort(mine, stable=True)  # assignments grouped by expert
    group_sizes = jnp.bincount(mine, length=X + 1)[:X].astype(jnp.int32)  # (X,)
    w_gate, w_up, w_down = (v.astype(x.dtype) for v in (w_gate, w_up, w_down))
    xs = jnp.take(x.reshape(B * L, D), order // k, axis=0)  # (A, D), sorted
    h = jax.nn.silu(grouped_matmul(xs, w_gate, group_sizes, matmul))
    h = h * grouped_matmul(xs, w_up, group_sizes, matmul)  # (A, F)
    ys = grouped_matmul(h, w_down, group_sizes, matmul)  # (A, D), sorted
    y = jnp.take(ys, jnp.argsort(order), axis=0).reshape(B, L, k, D)  # back in token order
    y = jnp.einsum("BLKD,BLK->BLD", y, weights.astype(x.dtype))
    if ep_axes:
        y = jax.lax.psum_scatter(y, ep_axes, scatter_dimension=0, tiled=True)
    return y


def grouped_matmul(
    xs: jax.Array, w: jax.Array, group_sizes: jax.Array, implementation: str, tile: int = TILE
) -> jax.Array:
    """Rows (A, D) sorted by group times each group's (D, F) of w (X, D, F) -> (A, F); rows
    past sum(group_sizes) come out zero.

    gmm: the Pallas megablox kernel (`_gmm`), a Mosaic custom call on TPU. ragged:
    `jax.lax.ragged_dot`, one grouped-matmul instruction on GPU. tiled: each group's rows
    padded to whole tiles and one (tile, D) x (D, F) matmul per tile in a loop; at most
    A / tile + X tiles, so at most X * (tile - 1) rows of wasted work.
    """
    if implementation == "gmm":
        return _gmm(xs, w, group_sizes)
    if implementation == "ragged":
        return jax.lax.ragged_dot(xs, w, group_sizes)
    A, D = xs.shape
    X = w.shape[0]
    n_tiles = -(-(A + X * (tile - 1)) // tile)  # enough for any group sizes
    padded = -(-group_sizes // tile) * tile  # (X,) each group rounded up to whole tiles
    ends, padded_ends = jnp.cumsum(group_sizes), jnp.cumsum(padded)
    group = jnp.searchsorted(ends, jnp.arange(A), side="right")  # (A,); X past the groups
    shift = (padded_ends - padded) - (ends - group_sizes)  # (X,) padded start - start
    dest = jnp.where(group < X, jnp.arange(A) + shift[jnp.minimum(group, X - 1)], n_tiles * tile)
    tiles = jnp.zeros((n_tiles * tile, D), xs.dtype).at[dest].set(xs, mode="drop")
    tile_group = jnp.searchsorted(padded_ends, jnp.arange(n_tiles) * tile, side="right")
    tile_group = jnp.minimum(tile_group, X - 1)  # tiles past the groups hold zeros
    out = jax.lax.map(lambda t: t[0] @ w[t[1]], (tiles.reshape(n_tiles, tile, D), tile_group))
    return out.reshape(n_tiles * tile, -1).at[dest].get(mode="fill", fill_value=0)


def _gmm(xs: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """`grouped_matmul` by megablox `gmm` (its custom VJP: gmm for the rows' gradient, tgmm
    for the weights'). Off TPU it runs in interpret mode: slow, for tests."""
    from jax.experimental.pallas.ops.tpu.megablox import gmm

    A, D = xs.shape
    X, _, F = w.shape
    rows, features = GMM_TILING[0], min(GMM_TILING[1], D, F)
    rows = min(rows, -(-A // 128) * 128)  # a small problem: one tile of whole 128-row blocks
    m = -(-A // rows) * rows  # the kernel takes whole row tiles: pad with rows past the groups
    # The rows past the X groups form one more group that w has no expert for: the kernel
    # computes only w's groups and zeroes the rest (it is told X of X + 1 groups are here).
    sizes = jnp.append(group_sizes, m - jnp.sum(group_sizes)).astype(jnp.int32)
    out = gmm(
        jnp.pad(xs, ((0, m - A), (0, 0))),
        w,
        sizes,
        xs.dtype,  # preferred_element_type: the kernel accumulates in fp32 and casts back
        (rows, features, features),
        interpret=sharding.platform() != "tpu",  # the target's: compiling for TPU is real
    )
    return out[:A]


def _capacity(x, experts, weights, w, moe: MoEConfig) -> tuple[jax.Array, jax.Array]:
    """C slots per expert and row; an assignment past its expert's C-th in position order is
    dropped. Returns (y (B, L, D), fraction of assignments dropped)."""
    B, L, D = x.shape
    X, C = moe.n_experts, moe.capacity(L)
    position = _positions(experts, X)  # (B, L, k)
    kept = position < C
    # A dropped assignment's slot index is C, out of bounds: the scatter skips it and the
    # gather back reads zero, so the experts never see it.
    slot = jnp.where(kept, position, C)

    def scatter(x_row, experts_row, slot_row):  # (L, D), (L, k), (L, k) -> (X, C, D)
        rows = jnp.broadcast_to(x_row[:, None], (*experts_row.shape, D))
        return jnp.zeros((X, C, D), x.dtype).at[experts_row, slot_row].add(rows, mode="drop")

    buf = jax.vmap(scatter)(x, experts, slot)  # (B, X, C, D)
    buf = sharding.constrain(buf, ("batch", None, None, "embed"))  # scattered where x lives
    # Tokens leave their batch shard for their expert's shard (all-to-all under ep_* presets);
    # constraining both sides of the expert matmuls keeps their gradients on the same layout.
    buf = sharding.constrain(buf.transpose(1, 0, 2, 3), ("expert", "batch", None, "embed"))
    w_gate, w_up, w_down = (v.astype(x.dtype) for v in w)
    h = jax.nn.silu(jnp.einsum("XBCD,XDF->XBCF", buf, w_gate))
    h = h * jnp.einsum("XBCD,XDF->XBCF", buf, w_up)
    h = sharding.constrain(h, ("expert", "batch", None, "mlp"))
    out = jnp.einsum("XBCF,XFD->XBCD", h, w_down)  # (X, B, C, D)
    out = sharding.constrain(out, ("expert", "batch", None, "embed"))
    out = sharding.constrain(out.transpose(1, 0, 2, 3), ("batch", None, None, "embed"))

    def gather(out_row, experts_row, slot_row):  # (X, C, D), (L, k), (L, k) -> (L, k, D)
        return out_row.at[experts_row, slot_row].get(mode="fill", fill_value=0)

    y = jax.vmap(gather)(out, experts, slot)  # (B, L, k, D)
    y = jnp.einsum("BLKD,BLK->BLD", y, weights.astype(x.dtype))
    return y, 1.0 - jnp.mean(kept.astype(jnp.float32))


def _positions(experts: jax.Array, n_experts: int) -> jax.Array:
    """(B, L, k) each assignment's place in its expert's queue within the row: how many earlier
    tokens of the row chose the same expert (a token's k experts are distinct)."""
    hits = jnp.sum(jax.nn.one_hot(experts, n_experts, dtype=jnp.int32), axis=2)  # (B, L, X)
    earlier = jnp.cumsum(hits, axis=1) - hits
    return jnp.take_along_axis(earlier, experts, axis=-1)


def capacity_kept(experts: jax.Array, moe: MoEConfig) -> jax.Array:
    """(B, L, k) bool: which assignments capacity mode keeps (the first C of each expert)."""
    return _positions(experts, moe.n_experts) < moe.capacity(experts.shape[1])


def dense_reference(
    block: MoEBlock, x: jax.Array, keep: jax.Array | None = None
) -> tuple[jax.Array, dict[str, Any]]:
    """The oracle: every expert on every token, weighted by the router (zero if not chosen).

    `keep` (B, L, k) masks assignments out (capacity mode's drops). Costs X/k times the
    dropless FLOPs; for tests only.
    """
    experts, weights, aux = block.route(x)
    if keep is not None:
        weights = jnp.where(keep, weights, 0.0)
    y = jnp.zeros_like(x)
    for e, (gate, up, down) in enumerate(zip(*block.expert_weights(), strict=True)):
        weight = jnp.sum(jnp.where(experts == e, weights, 0.0), axis=-1)  # (B, L)
        y = y + weight[..., None].astype(x.dtype) * _swiglu(x, gate, up, down)
    if block.moe.n_shared_experts:
        y = y + block.shared(x)
    return y, aux

"""The planner's mixture-of-experts terms (`jaxlm.estimate` adds them to a sparse model's plan).

Parameters: an MoE model holds every expert but multiplies a token by only top_k of them, so the
planner reports both counts; model FLOPs per token come from the active ones
(`ModelConfig.flops_per_token`: 6 x active matmul weights + attention).

Memory, per device (`jaxlm.moe` is the code these terms describe):
- expert weights, gradients and optimizer state are split like any parameter, by the preset's
  rules (`estimate.state_bytes`): under `ep_fsdp` whole experts over the `expert` mesh axes,
  X / G per device for an expert group of G devices; `expert_param_bytes` is their share.
- dispatch buffers, the transient of one sparse layer's backward (after its recomputed
  forward): dropless, the code gathers the expert group's tokens (G x T, T this device's) and
  sorts their A = G x T x k assignments, but the TPU compiler's buffers measure as
  DROPLESS_PER_EXPERT_VALUE x T x k x X x D values, whatever G (fitted; see below); capacity
  mode, the (X, B, C, D) buffers and their (X, B, C, F) hidden states, about
  capacity_factor x T x k rows per device. Without expert parallelism each layer
  also gathers its experts' weights (`fsdp` splits them along `embed`).
"""

from __future__ import annotations

import math
from typing import Any

from jaxlm import moe as moe_lib
from jaxlm import sharding
from jaxlm.model_config import ModelConfig

Layout = Any  # estimate.Layout (mesh shape, preset, micro-batch): estimate imports this module

# Capacity mode: row-sized tensors one sparse layer's backward holds, in units of D and F per
# slot (compute dtype), counted by hand: the forward's buffers and their gradients. Unmeasured.
DISPATCH_D, DISPATCH_F = 4, 5
# Dropless: bytes per (token x top_k x expert x D) value of this device's tokens, fitted to the
# TPU compiler's four MoE recipe compiles (docs/perf.md; each within 6%). The compiler's figure
# does not grow with the expert group G, as a count of the group's G x T x k sorted rows
# would (that count, 4 D + 5 F per row, was -24% to -26% off for the smaller groups): what
# it holds scales with all X experts instead. Why was not traced to an HLO buffer yet.
DROPLESS_PER_EXPERT_VALUE = 1.75


def sparse_layers(m: ModelConfig) -> int:
    """How many of the model's blocks have the MoE feed-forward."""
    return sum(m.is_sparse(i) for i in range(m.n_layers))


def inactive_params(m: ModelConfig) -> int:
    """Parameters a token is never multiplied by: the routed experts it was not sent to."""
    if m.moe is None:
        return 0
    per_layer = moe_lib.total_params(m.moe, m.d_model) - moe_lib.active_params(m.moe, m.d_model)
    return sparse_layers(m) * per_layer


def expert_group(m: ModelConfig, layout: Layout) -> int:
    """G: the devices the preset splits the experts over (1 when it keeps them whole)."""
    if m.moe is None:
        return 1
    spec = sharding.logical_to_spec(("expert",), sharding.rules_for(layout.preset))[0]
    axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
    return math.prod(layout.mesh_shape[a] for a in axes)


def expert_param_bytes(m: ModelConfig, layout: Layout) -> float:
    """fp32 bytes of the routed experts' weights each device holds (part of `Memory.params`)."""
    if m.moe is None:
        return 0.0
    G = expert_group(m, layout)
    # Without expert parallelism the experts are split along `embed`, like the dense MLP.
    split = G if G > 1 else layout.mesh_shape["fsdp"] if layout.preset != "dp" else 1
    weights = 3 * m.moe.n_experts * m.d_model * m.moe.expert_d_ff
    return sparse_layers(m) * weights * 4 / split


def kept_expert_bytes(m: ModelConfig, layout: Layout, itemsize: int) -> float:
    """remat="none": the sparse layers' expert weights as multiplied, kept for the backward (the
    compute-dtype casts of this device's X / G experts, or of every expert gathered)."""
    if m.moe is None:
        return 0.0
    weights = 3 * m.moe.n_experts * m.d_model * m.moe.expert_d_ff
    return sparse_layers(m) * weights * itemsize / expert_group(m, layout)


def dispatch_rows(m: ModelConfig, layout: Layout) -> int:
    """Assignment rows one device's grouped matmuls (or capacity buffers) hold per layer."""
    moe, tokens = m.moe, layout.micro_batch * layout.seq_len
    if moe.capacity_factor:
        slots = moe.capacity(layout.seq_len) * moe.n_experts * layout.micro_batch
        return slots  # (X, B, C) slots; X / G experts x G times the rows after the all-to-all
    return expert_group(m, layout) * tokens * moe.top_k


def dispatch_bytes(m: ModelConfig, layout: Layout) -> float:
    """Bytes of one sparse layer's transient dispatch buffers in its backward (0: dense)."""
    if m.moe is None:
        return 0.0
    a = 2 if m.dtype == "bfloat16" else 4
    moe, tokens = m.moe, layout.micro_batch * layout.seq_len
    if moe.capacity_factor:
        rows = dispatch_rows(m, layout)
        buffers = rows * (DISPATCH_D * m.d_model + DISPATCH_F * moe.expert_d_ff) * a
    else:
        values = tokens * moe.top_k * moe.n_experts * m.d_model
        buffers = DROPLESS_PER_EXPERT_VALUE * values * a
    if expert_group(m, layout) == 1 and layout.preset != "dp" and layout.mesh_shape["fsdp"] > 1:
        buffers += 3 * moe.n_experts * m.d_model * moe.expert_d_ff * a  # gathered experts
    return float(buffers)

"""Device mesh, logical-to-mesh axis rules, and multi-host start-up.

Model code names the axes of its parameters and activations logically (`batch, seq, embed, heads,
kv_heads, head_dim, mlp, vocab, norm`, `expert` and `router` (an MoE block's experts and
its router's output), and `layers`, the stacking axis of a scanned model, which
no preset splits). This module alone decides which mesh axis each name is split over, through a
few named presets:

- `dp`: parameters replicated; the batch is split over every device.
- `fsdp`: parameters (and so gradients and optimizer state) split over `fsdp` along `embed`;
  XLA all-gathers them per layer.
- `fsdp_tp`: `fsdp` plus tensor parallelism: heads, MLP and vocab split over `tensor`.
- `ep_fsdp`: `fsdp`, but MoE expert weights split over `fsdp` along `expert` (whole experts
  per device, never gathered): dropless MoE all-gathers the tokens of each expert group and
  reduce-scatters the outputs; capacity MoE moves its fixed buffers by all-to-all.
- `cp_fsdp`, `cp_fsdp_tp`: `fsdp` / `fsdp_tp` with the sequence of every activation split over
  `context` (context parallelism; `model.context_parallel` picks how attention crosses it,
  `jaxlm/context.py`). Parameters are split along `embed` over fsdp x context: the context
  devices share one gradient sum, as fsdp's do.

The batch is always split over `data` x `fsdp`. `mesh.shape` is (data, fsdp, tensor) or
(data, fsdp, tensor, context); three entries leave `context` at 1.

No sharding context lives here. A jitted function is built with its mesh and rules
(`jit(fn, MeshRules)`), which it enters while tracing through contexts JAX and Flax own (the
abstract mesh, Flax's logical axis rules); `constrain`, `per_device` and `platform` read them
there, so a function traced by anyone, anywhere, carries its shardings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax.core import spmd as flax_spmd  # Flax's logical-axis-rules context (nnx exports it)
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor", "context")
BATCH = ("data", "fsdp")

PRESETS: dict[str, dict[str, Any]] = {
    "dp": {"batch": BATCH},
    "fsdp": {"batch": BATCH, "embed": "fsdp"},
    "fsdp_tp": {
        "batch": BATCH,
        "embed": "fsdp",
        "heads": "tensor",
        "kv_heads": "tensor",
        "mlp": "tensor",
        "vocab": "tensor",
    },
    # fsdp, with the experts of MoE blocks split over `fsdp` (expert parallelism) instead of
    # along `embed`: each device holds X / fsdp whole experts and their optimizer state.
    "ep_fsdp": {"batch": BATCH, "embed": "fsdp", "expert": "fsdp"},
}
# Context parallelism: activations' `seq` split over `context`, whose devices hold the same
# batch rows; parameters split along `embed` over fsdp x context (FSDP over every device that
# shares the gradient sum), so a long sequence's devices do not each hold the whole state.
_CP = {"embed": ("fsdp", "context"), "seq": "context"}
PRESETS["cp_fsdp"] = {**PRESETS["fsdp"], **_CP}
PRESETS["cp_fsdp_tp"] = {**PRESETS["fsdp_tp"], **_CP}


class ShardingError(ConfigError):
    """A mesh or sharding request that cannot work on these devices or shapes."""


def rules_for(preset: str) -> dict[str, Any]:
    """The logical-name -> mesh-axis mapping of a named preset."""
    if preset not in PRESETS:
        raise ShardingError(f"mesh.preset must be one of {sorted(PRESETS)}, not {preset!r}.")
    return PRESETS[preset]


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replaces a single -1 in `shape` by whatever makes the product equal `num_devices`;
    a three-entry shape (data, fsdp, tensor) gets a context axis of 1."""
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (len(MESH_AXES) - 1, len(MESH_AXES)):
        raise ShardingError(
            f"mesh.shape needs 3 entries (data, fsdp, tensor) or 4 (data, fsdp, tensor, "
            f"context), got {shape}."
        )
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ShardingError(f"mesh.shape={shape} may hold positive sizes and at most one -1.")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ShardingError(
                f"mesh.shape={shape} cannot be completed: {num_devices} devices are not a "
                f"multiple of {known}."
            )
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ShardingError(
            f"mesh.shape={shape} uses {math.prod(shape)} devices but {num_devices} are present; "
            "use -1 for the axis that takes the rest."
        )
    return shape + (1,) * (len(MESH_AXES) - len(shape))


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor, context) mesh over `devices` (default: all), with Auto axis types.

    Auto axes let XLA propagate shardings from the logical annotations (GSPMD style); the
    Explicit default of `jax.make_mesh` would demand an out_sharding on every contraction.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(shape, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
    if devices[0].platform == "tpu":  # a slice's compile-only devices: lay the mesh on the torus
        from jax.experimental import mesh_utils

        return Mesh(mesh_utils.create_device_mesh(shape, devices), MESH_AXES, axis_types=auto)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def logical_to_spec(axes: Sequence[str | None], rules: Mapping[str, Any]) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec; a mesh axis already used earlier is skipped.

    The skip is what lets one name mean different things in different tensors: `embed` is split
    over `fsdp` in a weight, but in an activation (batch, seq, embed) `fsdp` already splits the
    batch, so `embed` stays whole.
    """
    used: set[str] = set()
    spec = []
    for name in axes:
        mesh_axes = rules.get(name) if name is not None else None
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
        mesh_axes = tuple(a for a in mesh_axes if a not in used)
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return PartitionSpec(*spec)


def named_sharding(
    mesh: Mesh,
    axes: Sequence[str | None],
    rules: Mapping[str, Any],
    shape: Sequence[int] | None = None,
    name: str = "array",
) -> NamedSharding:
    """NamedSharding for logical `axes`; checks each split dimension divides its mesh axes."""
    spec = logical_to_spec(axes, rules)
    if shape is not None:
        for dim, logical, mesh_axes in zip(shape, axes, spec, strict=True):
            if mesh_axes is None:
                continue
            mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
            size = math.prod(mesh.shape[a] for a in mesh_axes)
            if dim % size:
                raise ShardingError(
                    f"{name}: dimension '{logical}' of size {dim} cannot be split over mesh axes "
                    f"{mesh_axes} of total size {size}; change the mesh shape or the model size."
                )
    return NamedSharding(mesh, spec)


def tree_shardings(mesh: Mesh, axes_tree: Any, shapes_tree: Any, rules: Mapping[str, Any]) -> Any:
    """NamedShardings for a tree of arrays given a matching tree of logical-axes tuples."""
    axes_leaves, treedef = jax.tree.flatten(axes_tree, is_leaf=lambda x: isinstance(x, tuple))
    paths_shapes = jax.tree_util.tree_flatten_with_path(shapes_tree)[0]
    out = [
        named_sharding(mesh, axes, rules, leaf.shape, jax.tree_util.keystr(path))
        for axes, (path, leaf) in zip(axes_leaves, paths_shapes, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a (B, L) batch: rows split over data x fsdp."""
    return NamedSharding(mesh, PartitionSpec(BATCH, None))


def batch_divisor(mesh: Mesh) -> int:
    """How many ways the global batch is split."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


@dataclasses.dataclass(frozen=True)
class MeshRules:
    """A mesh and the logical-name rules for it: what every jitted function is built with.

    Frozen and hashable (the rules a tuple of (logical name, mesh axes) pairs), so a cache of
    jitted functions keys on it: another mesh or another preset is another program.
    """

    mesh: Mesh
    rules: tuple[tuple[str, Any], ...]

    @classmethod
    def of(cls, mesh: Mesh, preset: str) -> MeshRules:
        """`mesh` with the rules of a named preset (`PRESETS`)."""
        return cls(mesh, tuple(rules_for(preset).items()))

    @property
    def mapping(self) -> dict[str, Any]:
        """The rules as a logical-name -> mesh-axes dict (`logical_to_spec` takes it)."""
        return dict(self.rules)

    @contextlib.contextmanager
    def tracing(self) -> Iterator[None]:
        """The contexts JAX and Flax own that `constrain`, `per_device` and `platform` read:
        this mesh as JAX's abstract mesh, these rules as Flax's logical axis rules. `jit`
        enters it inside every trace, so no caller has to."""
        with (
            jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh),
            flax_spmd.logical_axis_rules(self.rules),
        ):
            yield


def jit(fn: Callable, mesh_rules: MeshRules | None, **jit_kwargs: Any) -> Any:
    """`jax.jit(fn, **jit_kwargs)` whose trace runs under `mesh_rules.tracing()`: the model's
    sharding constraints are there whoever calls, lowers or re-traces it. With None (one
    device, no mesh) the constraints are no-ops and this is plain `jax.jit`."""
    if mesh_rules is None:
        return jax.jit(fn, **jit_kwargs)

    @functools.wraps(fn)  # the signature stays fn's: static_argnames still resolve
    def traced(*args, **kwargs):
        with mesh_rules.tracing():
            return fn(*args, **kwargs)

    return jax.jit(traced, **jit_kwargs)


def _traced() -> tuple[jax.sharding.AbstractMesh, dict[str, Any]] | None:
    """The mesh and rules of the trace in progress (`MeshRules.tracing`), or None."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = flax_spmd.get_logical_axis_rules()
    return None if mesh.empty or not rules else (mesh, dict(rules))


def platform() -> str:
    """The platform being traced for: the traced mesh's devices' (a TPU slice's when compiling
    ahead of time on a CPU), else this host's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.abstract_device is None:
        return jax.default_backend()
    return mesh.abstract_device.platform


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op when traced without a mesh (`jit`)."""
    traced = _traced()
    if traced is None:
        return x
    mesh, rules = traced
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, rules)))


def mesh_axes(name: str) -> tuple[str, ...]:
    """The mesh axes the traced rules split logical axis `name` over; () when traced without a
    mesh or when no rule splits it. Collectives inside `per_device` functions name these."""
    traced = _traced()
    if traced is None:
        return ()
    spec = logical_to_spec((name,), traced[1])[0]
    return () if spec is None else ((spec,) if isinstance(spec, str) else tuple(spec))


def logical_size(name: str) -> int:
    """How many ways the traced rules split logical axis `name` (1 when traced without a mesh)."""
    traced = _traced()
    return 1 if traced is None else math.prod(traced[0].shape[a] for a in mesh_axes(name))


def per_device(
    fn: Any, in_axes: Sequence[Sequence[str | None]], out_axes: Sequence[str | None]
) -> Any:
    """`fn` run on each device's slice of its arguments (shard_map), split by logical names.

    For kernels XLA cannot partition itself (Pallas). Traced without a mesh it is `fn` unchanged.
    """
    traced = _traced()
    if traced is None:
        return fn
    mesh, rules = traced
    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=tuple(logical_to_spec(axes, rules) for axes in in_axes),
        out_specs=logical_to_spec(out_axes, rules),
        check_vma=False,
    )


def maybe_initialize_distributed(mesh_cfg: Any) -> None:
    """Joins a multi-process JAX runtime when the config or the environment asks for it.

    `launch.detect` decides from the config and the environment (explicit flags, the JAX_*
    variables of the Kubernetes manifests, Slurm, a TPU slice's worker variables, or
    `mesh.multihost=True`), in one sentence when a launcher left something out; each process
    then prints one line saying which process it is and how it joined.
    """
    from jaxlm import launch

    cluster = launch.detect(mesh_cfg, os.environ)
    if cluster is None:
        return
    if "coordinator_address" in cluster.initialize_kwargs:
        from jaxlm import peers  # its relay makes process 0's death one sentence

        peers.initialize(**cluster.initialize_kwargs)
    else:
        jax.distributed.initialize(**cluster.initialize_kwargs)
    # The first collective also sets up the CPU (gloo) communicator, which gives up if processes
    # arrive far apart; here they have just met in initialize(), so do it now.
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("jaxlm: all processes joined")
    print(
        f"jax.distributed: process {jax.process_index()} of {jax.process_count()} "
        f"({cluster.source}), {jax.local_device_count()} of {jax.device_count()} devices here",
        flush=True,
    )


def place(host: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global array from a host array every process holds whole: each device takes its slice.

    The copy is meant, so a transfer guard (the training loop's) lets it through.
    """
    with jax.transfer_guard_host_to_device("allow"):
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def host_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's rows into global arrays split over the batch axes.

    The copy is meant, so a transfer guard (the training loop's) lets it through.
    """
    sharding = batch_sharding(mesh)
    with jax.transfer_guard_host_to_device("allow"):
        return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}

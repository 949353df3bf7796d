"""The fast local checkpoint tier, and which tier and step a restarted run resumes from.

Beside the persistent tier (orbax, `checkpoint.every`, `<workdir>/checkpoints`: every host's
shards in one shared place), each host writes its own shards of the train state every
`checkpoint.local_every` steps to a directory of its own (`checkpoint.local_dir`, by default
/dev/shm: RAM, gone with the machine): `<local_dir>/<run id>/process_<i>/<step>/` (`run_id`) holds
`shards.npz` (this host's distinct shards, keyed by their index in the global array) and
`meta.json` (the run's metadata, every host's data-iterator state, and the layout the shards
were cut by). A step directory is written under a temporary name and renamed when complete, so
a kill leaves either the whole step or none of it. The write is synchronous: it is a copy into
memory, and it bounds what a kill loses to `local_every` steps.

Why not orbax's own tiers: `orbax.checkpoint.experimental.emergency.CheckpointManager` (0.12.8)
drops the local directory when the mesh has one data-parallel replica (jaxlm's fsdp meshes),
needs a full copy of the state per replica otherwise, saves no item beside the state (the data
position: its TODO b/330585086), and an orbax CheckpointManager per process (active_processes)
in a jax.distributed runtime waits for cross-process signals that never come.

On restart every process lists its local steps whose layout matches this run's (same process
count, devices and shardings), the lists are gathered, and all resume from the newest step that
every host has locally or, if the persistent tier has a newer one (or some host has none), from
the persistent tier: a host that lost its local tier is filled from the persistent tier, never
from a peer. A run on another process count or mesh therefore always restarts from the
persistent tier.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from typing import Any

import jax
import numpy as np

from jaxlm import checkpoint as ckpt_lib

# Newest local steps kept per host. Two, not one: a host killed while writing step s still has
# the step before, which its peers (that finished s) also keep, so the hosts share one.
KEEP = 2
ID_FILE = "local_tier_id"


def run_id(workdir: str) -> str:
    """The name of a run's folder under `checkpoint.local_dir`: a random id kept in the workdir
    (`ID_FILE`), made by process 0 at the run's first start and sent to the others (a
    collective), so a new run in a reused workdir path never resumes an old run's local steps."""
    path = os.path.join(workdir, ID_FILE)
    mine = None
    if jax.process_index() == 0:
        if not os.path.exists(path):
            with open(path + ".tmp", "w") as f:
                f.write(uuid.uuid4().hex)
            os.replace(path + ".tmp", path)
        with open(path) as f:
            mine = f.read().strip()
    return ckpt_lib.gather_host_states(mine)["process_0"]


class LocalTier:
    """This host's local checkpoints of one run (`<local_dir>/<run id>/process_<i>`)."""

    def __init__(self, local_dir: str, workdir: str):
        self.directory = os.path.join(
            os.path.abspath(local_dir), run_id(workdir), f"process_{jax.process_index()}"
        )
        os.makedirs(self.directory, exist_ok=True)

    def steps(self) -> list[int]:
        """Steps complete in this host's local tier, oldest first."""
        return sorted(int(n) for n in os.listdir(self.directory) if n.isdigit())

    def save(self, step: int, state: Any, data_state: dict | None, meta: dict) -> None:
        """Writes this host's shards of `state`, `data_state` (every host's) and `meta` at
        `step`, then deletes all but the newest KEEP steps."""
        shards = {}
        for i, leaf in enumerate(jax.tree.leaves(state)):
            for shard in leaf.addressable_shards:  # a copy: the next step donates the buffers
                key = f"{i}:{_index_key(shard.index, leaf.shape)}"
                if key not in shards:
                    shards[key] = np.array(shard.data)
        record = {"meta": meta, "data": data_state, "layout": layout(state), "step": step}
        final = os.path.join(self.directory, str(step))
        partial = final + ".partial"
        shutil.rmtree(partial, ignore_errors=True)  # left by a kill mid-write
        shutil.rmtree(final, ignore_errors=True)  # a step written again after a rollback
        os.makedirs(partial)
        np.savez(os.path.join(partial, "shards.npz"), **shards)
        with open(os.path.join(partial, "meta.json"), "w") as f:
            json.dump(record, f)
        os.rename(partial, final)
        for old in self.steps()[:-KEEP]:
            shutil.rmtree(os.path.join(self.directory, str(old)), ignore_errors=True)

    def usable_steps(self, abstract_state: Any) -> list[int]:
        """Local steps cut by the layout `abstract_state` would have here, oldest first."""
        expected = layout(abstract_state)
        usable = []
        for step in self.steps():
            try:
                with open(os.path.join(self.directory, str(step), "meta.json")) as f:
                    if json.load(f)["layout"] == expected:
                        usable.append(step)
            except (OSError, ValueError, KeyError):  # unreadable: as if absent
                continue
        return usable

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict | None, dict]:
        """(state placed by `abstract_state`'s shardings, data state, metadata) at `step`."""
        where = os.path.join(self.directory, str(step))
        try:
            with open(os.path.join(where, "meta.json")) as f:
                record = json.load(f)
            with np.load(os.path.join(where, "shards.npz")) as npz:
                shards = {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as e:
            raise ckpt_lib.CheckpointError(
                f"the local checkpoint {where} is unreadable ({e}); delete it and run the same "
                "command again to resume from the persistent tier."
            ) from None
        leaves, treedef = jax.tree.flatten(abstract_state)

        def build(i: int, leaf: jax.ShapeDtypeStruct) -> jax.Array:
            def read(index):  # (a bfloat16 shard comes back from npz as raw bytes)
                return shards[f"{i}:{_index_key(index, leaf.shape)}"].view(leaf.dtype)

            with jax.transfer_guard_host_to_device("allow"):  # a meant copy
                return jax.make_array_from_callback(leaf.shape, leaf.sharding, read)

        state = jax.tree.unflatten(treedef, [build(i, x) for i, x in enumerate(leaves)])
        return state, record["data"], record["meta"]

    def clear(self) -> None:
        """Deletes this host's local steps (the run is over: the persistent tier holds it)."""
        shutil.rmtree(self.directory, ignore_errors=True)

    def delete_after(self, step: int) -> None:
        """Deletes local steps newer than `step` (a restart or a rollback returned to it)."""
        for s in self.steps():
            if s > step:
                shutil.rmtree(os.path.join(self.directory, str(s)), ignore_errors=True)


def _index_key(index: tuple, shape: tuple) -> str:
    """A shard's place in its global array, as text: 'start-stop' per dimension."""
    bounds = (sl.indices(n)[:2] for sl, n in zip(index, shape, strict=True))
    return ",".join(f"{a}-{b}" for a, b in bounds)


def layout(state: Any) -> dict[str, Any]:
    """How this host's shards of `state` (arrays or abstract arrays) are cut: what a local
    checkpoint can be restored into only if it is unchanged."""
    cuts = []
    for leaf in jax.tree.leaves(state):
        indices = leaf.sharding.addressable_devices_indices_map(leaf.shape)
        cuts.append(
            [str(leaf.dtype), list(leaf.shape)]
            + sorted({_index_key(index, leaf.shape) for index in indices.values()})
        )
    devices = sorted(d.id for d in jax.local_devices())
    return {"processes": jax.process_count(), "devices": devices, "leaves": cuts}


@dataclasses.dataclass(frozen=True)
class Choice:
    """Where a restart resumes: `tier` 'local', 'persistent' or None (nothing saved), `step`,
    and the processes that lacked the newest local step some host had (`short`)."""

    tier: str | None
    step: int
    newest_local: int | None
    short: tuple[int, ...]


def choose(local_steps: list[list[int]], persistent_steps: list[int]) -> Choice:
    """The newest step every host has locally, unless the persistent tier has a newer one.

    Args:
      local_steps: each process's usable local steps, in process order.
      persistent_steps: the persistent tier's steps.
    """
    common = set.intersection(*map(set, local_steps)) if local_steps else set()
    anywhere = set().union(*map(set, local_steps))
    newest_local = max(anywhere) if anywhere else None
    short = tuple(i for i, s in enumerate(local_steps) if newest_local not in s)
    if newest_local is None:
        short = ()
    local = max(common, default=-1)
    persistent = max(persistent_steps, default=-1)
    if local > persistent:
        return Choice("local", local, newest_local, short)
    if persistent >= 0:
        return Choice("persistent", persistent, newest_local, short)
    return Choice(None, 0, newest_local, short)


def agree(tier: LocalTier, abstract_state: Any, persistent_steps: list[int]) -> Choice:
    """`choose` over every process's usable local steps (a collective: all processes call it);
    local steps newer than the choice are deleted, since the run will write them again."""
    mine = tier.usable_steps(abstract_state)
    gathered = ckpt_lib.gather_host_states(mine)
    choice = choose([gathered[f"process_{i}"] for i in range(len(gathered))], persistent_steps)
    tier.delete_after(choice.step)
    return choice


def describe(choice: Choice) -> str:
    """The line a resumed run prints when its hosts' local tiers did not all have the newest
    step (empty when nothing was missing)."""
    if not choice.short or choice.newest_local is None:
        return ""
    hosts = ", ".join(map(str, choice.short))
    source = f"the {choice.tier} tier at step {choice.step}" if choice.tier else "step 0"
    return (
        f"process(es) {hosts} have no local checkpoint at step {choice.newest_local}; "
        f"every process resumes from {source}"
    )

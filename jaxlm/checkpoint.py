"""Checkpoints: orbax async saves of the train state, the data iterator and run metadata.

The only module that talks to orbax: `_manager` is its one `CheckpointManager` construction
site. Besides the training `Checkpointer`, it reads checkpoints for the other tools: `resolve`
(a path or step -> (checkpoints dir, step)), `all_steps`, `read_step_meta` and `restore_params`
(the parameters only).

Layout: `<workdir>/checkpoints/<step>/{state,data,meta}`. `state` is the whole train-state
pytree (params, optimizer state, step, loss guard); `data` is the grain iterator's state (JSON,
taken synchronously at save time so the async write cannot race the next batch); `meta` is the
config, tokenizer hash, mesh shape and jaxlm version. A save that fails in the background (a
full disk) is a CheckpointError at the next step, and the earlier checkpoints stay.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

import jaxlm
from jaxlm import model as model_lib
from jaxlm import sharding
from jaxlm.errors import JaxlmError


class CheckpointError(JaxlmError):
    """No usable checkpoint, or one written by an incompatible run."""


def _manager(
    directory: str, options: ocp.CheckpointManagerOptions | None = None
) -> ocp.CheckpointManager:
    """The one place jaxlm builds an orbax CheckpointManager (read-only unless `options`)."""
    if options is None:  # (save_interval_steps=0: orbax warns when it has to reset it itself)
        options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    # orbax warns about every read-only manager it opens; a reader needs none of that.
    with _quiet_absl() if options.read_only else contextlib.nullcontext():
        return ocp.CheckpointManager(directory, options=options)


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def all_steps(ckpt_dir: str) -> list[int]:
    """Steps of the complete checkpoints in `ckpt_dir`, oldest first ([] if it does not exist).

    Read without a CheckpointManager, which starts jax's backend: a restarted multi-process run
    asks this before `jax.distributed.initialize`, which must come first.
    """
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(ocp.path.step.checkpoint_steps(ckpt_dir))


def resolve(path: str, step: int | None = None) -> tuple[str, int]:
    """(checkpoints directory, step) for a workdir, its checkpoints/ folder or a step folder.

    Raises:
      CheckpointError: there is no checkpoint there, or none at `step`.
    """
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.basename(path).isdigit() and os.path.isdir(os.path.join(path, "state")):
        return os.path.dirname(path), int(os.path.basename(path)) if step is None else step
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    steps = all_steps(path)
    if not steps:
        raise CheckpointError(
            f"no jaxlm checkpoint found in {path}; pass a workdir or a step folder."
        )
    if step is not None and step not in steps:
        raise CheckpointError(f"{path} has no checkpoint at step {step} (it has {steps}).")
    return path, steps[-1] if step is None else step


def read_step_meta(ckpt_dir: str, step: int) -> dict[str, Any]:
    """The metadata saved with `step` under `ckpt_dir`, read without a Checkpointer (nor a
    CheckpointManager: like `all_steps`, this may run before `jax.distributed.initialize`)."""
    return ocp.JsonCheckpointHandler().restore(epath.Path(ckpt_dir) / str(step) / "meta")


def _restore_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def model_config_from_meta(meta: dict[str, Any], where: str) -> model_lib.ModelConfig:
    """The ModelConfig of a checkpoint written by `import_hf` or by a training run."""
    if meta.get("model_config"):
        return model_lib.ModelConfig.from_dict(meta["model_config"])
    try:
        vocab = int(meta["param_shapes"]["embed"][0])
        return model_lib.ModelConfig.from_config(meta["config"]["model"], vocab).for_platform()
    except (KeyError, TypeError):
        raise CheckpointError(
            f"{where} has no model config in its metadata (not written by jaxlm)."
        ) from None


def restore_params(
    ckpt_dir: str,
    step: int,
    abstract: dict[tuple, Any],
    shardings: dict[tuple, Any] | None = None,
    stacked_layers: int = 0,
) -> dict[tuple, Any]:
    """Reads only the parameters in `abstract` ({path: ShapeDtypeStruct}) from a checkpoint.

    They come back as host numpy arrays, or as jax arrays placed by `shardings` ({path: ...}).
    `stacked_layers` > 0 says the checkpoint is a `scan_layers` model's with that many layers:
    per-layer paths ('blocks', i, ...) are then read from its stacked arrays (each stacked
    array is read whole, once).
    """
    if stacked_layers:
        stacked = {}
        for path, leaf in abstract.items():
            if path[0] == "blocks":
                shape = (stacked_layers, *leaf.shape)
                stacked[("blocks", *path[2:])] = jax.ShapeDtypeStruct(shape, leaf.dtype)
            else:
                stacked[path] = leaf
        values = _restore_params(ckpt_dir, step, stacked, None)
        host = {
            p: values[("blocks", *p[2:])][p[1]] if p[0] == "blocks" else values[p] for p in abstract
        }
        if shardings is None:
            return host
        return {p: sharding.place(x, shardings[p]) for p, x in host.items()}
    return _restore_params(ckpt_dir, step, abstract, shardings)


def _restore_params(
    ckpt_dir: str, step: int, abstract: dict[tuple, Any], shardings: dict[tuple, Any] | None
) -> dict[tuple, Any]:
    if shardings is None:
        args = {p: ocp.RestoreArgs(restore_type=np.ndarray) for p in abstract}
    else:
        args = {p: ocp.ArrayRestoreArgs(sharding=shardings[p]) for p in abstract}
    item = {"params": traverse_util.unflatten_dict(abstract)}
    restore = ocp.args.PyTreeRestore(
        item=item, partial_restore=True, restore_args={"params": traverse_util.unflatten_dict(args)}
    )
    with contextlib.closing(_manager(ckpt_dir)) as manager, _quiet_absl():
        restored = manager.restore(step, args=ocp.args.Composite(state=restore))
    return traverse_util.flatten_dict(restored["state"]["params"])


class Checkpointer:
    """Saves and restores `(state, data iterator state, metadata)` under `directory`.

    Args:
      directory: the checkpoints directory (created).
      ckpt_cfg: a run's `config.checkpoint`; when given, its keep, keep_every and async_save
        override the keyword options.
      keep: how many recent checkpoints to keep (None: all).
      keep_every: also keep every checkpoint whose step is a multiple of this (0: none).
      async_save: write in the background while training continues.
    """

    def __init__(
        self,
        directory: str,
        ckpt_cfg: Any = None,
        *,
        keep: int | None = None,
        keep_every: int = 0,
        async_save: bool = True,
    ):
        if ckpt_cfg is not None:
            keep, keep_every = ckpt_cfg.keep, ckpt_cfg.keep_every
            async_save = ckpt_cfg.async_save
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            keep_period=keep_every or None,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,  # a save killed mid-write leaves a tmp dir: drop it
        )
        self.directory = directory
        self.manager = _manager(directory, options)
        self._unconfirmed: int | None = None  # step of a started save not yet known to be durable
        _quiet_orbax()

    def save(
        self, step: int, state: Any, data_state: dict | None, meta: dict, force: bool = False
    ) -> bool:
        """Starts an (async) save of `state` at `step`; returns whether a save was started."""
        items = {
            "state": ocp.args.StandardSave(state),
            "meta": ocp.args.JsonSave(dict(meta, jaxlm_version=jaxlm.__version__, step=step)),
        }
        if data_state is not None:
            items["data"] = ocp.args.JsonSave(data_state)
        if self._unconfirmed is not None:
            self.wait()  # orbax waits for it anyway; this names its step if it failed
        with self._failure_as_error(step):
            started = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        if started:
            self._unconfirmed = step
        return started

    def check(self) -> None:
        """Raises CheckpointError if a background save has failed; never blocks on one.

        Called every step, so a full disk stops the run at once instead of at the next save.
        """
        if self._unconfirmed is not None and not self.manager.is_saving_in_progress():
            self.wait()  # the save is over: this returns at once, raising its error if any

    @contextlib.contextmanager
    def _failure_as_error(self, step: int | None) -> Iterator[None]:
        try:
            yield
        except Exception as e:  # noqa: BLE001 - orbax raises whatever the filesystem raised
            self._unconfirmed = None
            reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise CheckpointError(
                f"saving the checkpoint at step {step} in {self.directory} failed ({reason}); "
                "the run stops here and keeps every earlier checkpoint: free space (or fix the "
                "directory) and run the same command to resume."
            ) from None

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints present, oldest first."""
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def restore(
        self, abstract_state: Any, step: int | None = None
    ) -> tuple[int, Any, dict | None, dict]:
        """Restores the newest readable checkpoint (or `step`) into `abstract_state`'s shardings.

        A checkpoint that fails to read (truncated, a file missing) is reported in one line and
        the previous one is tried. Returns (step, state, data iterator state, metadata).
        """
        candidates = [step] if step is not None else list(reversed(self.steps()))
        if not candidates:
            raise CheckpointError(f"no checkpoint found in {self.directory}.")
        failures = []
        for s in candidates:
            try:
                meta = self._meta(s)
                check_compatible(meta, abstract_state)
                target = self._with_legacy_rng(s, abstract_state)
                items = {"state": ocp.args.StandardRestore(target)}
                if self._has_item(s, "data"):
                    items["data"] = ocp.args.JsonRestore()
                restored = self.manager.restore(s, args=ocp.args.Composite(**items))
                state = {k: v for k, v in restored["state"].items() if k in abstract_state}
                return s, state, restored.get("data"), meta
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - any read failure means "try the previous one"
                reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                aside = self._move_aside(s)
                logging.warning(
                    "checkpoint at step %d is unreadable (%s); moved to %s, trying an older one",
                    s,
                    reason,
                    aside,
                )
                failures.append(s)
        raise CheckpointError(
            f"every checkpoint in {self.directory} is unreadable (steps {failures}); refusing to "
            "start from scratch over them: move the directory away or pass another --workdir."
        )

    def _with_legacy_rng(self, step: int, abstract_state: Any) -> Any:
        """`abstract_state`, plus the `rng` entry checkpoints held before it left the state.

        It was saved but never read; orbax refuses a target without it, so restore and drop it.
        """
        try:
            legacy = "rng" in self.manager.item_metadata(step)["state"]
        except Exception:  # noqa: BLE001 - no metadata: the restore itself will say what is wrong
            legacy = False
        if not legacy or "rng" in abstract_state:
            return abstract_state
        replicated = abstract_state["step"].sharding
        return dict(abstract_state, rng=jax.ShapeDtypeStruct((2,), np.uint32, sharding=replicated))

    def delete_after(self, step: int) -> None:
        """Deletes every checkpoint newer than `step` (e.g. ones written during a loss blow-up)."""
        for s in self.steps():
            if s > step:
                self.manager.delete(s)

    def read_meta(self, step: int) -> dict:
        """The metadata saved with `step` (config, tokenizer hash, shapes), or {} if unreadable."""
        try:
            return self._meta(step)
        except Exception:  # noqa: BLE001 - an unreadable checkpoint is dealt with by restore()
            return {}

    def _meta(self, step: int) -> dict:
        return _restore_meta(self.manager, step)

    def _move_aside(self, step: int) -> str:
        """Renames an unreadable step directory so it is kept for inspection but never reused."""
        src = self.manager.directory / str(step)
        dst = self.manager.directory / f"unreadable-{step}-{int(time.time())}"
        if jax.process_index() == 0:
            src.rename(dst)
        self.manager.reload()
        return str(dst)

    def _has_item(self, step: int, name: str) -> bool:
        return (self.manager.directory / str(step) / name).exists()

    def wait(self) -> None:
        """Blocks until every started save is durable on disk.

        Raises:
          CheckpointError: a save failed (e.g. the disk is full); earlier checkpoints are kept.
        """
        with self._failure_as_error(self._unconfirmed):
            self.manager.wait_until_finished()
        self._unconfirmed = None

    def close(self) -> None:
        """Waits for the last save (raising CheckpointError if it failed), then closes."""
        try:
            self.wait()
        finally:
            self.manager.close()


class _QuietOrbax(logging.Filter):
    """Keeps orbax's error lines but not their tracebacks (Checkpointer reports the failure),
    and drops its warning that an item was not restored: reading the metadata alone, or the
    state without the metadata, leaves items out on purpose (four such lines per resume)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "orbax" not in record.pathname:
            return True
        if record.levelno >= logging.ERROR:
            record.exc_info, record.exc_text = None, None
        return "was found in the checkpoint, but could not be restored" not in record.getMessage()


def _quiet_orbax() -> None:
    # orbax logs through absl's logger (a handler on the root logger once absl runs).
    for logger in (logging.getLogger("absl"), logging.getLogger()):
        if not any(isinstance(f, _QuietOrbax) for f in logger.filters):
            logger.addFilter(_QuietOrbax())


def check_compatible(meta: dict, abstract_state: Any) -> None:
    """Raises CheckpointError naming the first parameter whose shape differs from the model's."""
    saved = meta.get("param_shapes")
    if not saved:
        return
    current = param_shapes(abstract_state["params"])
    saved_scanned = not any(name.startswith("blocks/0/") for name in saved)
    if saved_scanned != (not any(name.startswith("blocks/0/") for name in current)):
        raise CheckpointError(
            f"the checkpoint was written with model.scan_layers={saved_scanned}; resume with the "
            "same setting, or start a new --workdir with --config.init_from=ckpt:<this run>."
        )
    for name, shape in current.items():
        if name not in saved:
            raise CheckpointError(
                f"checkpoint has no parameter {name}; it was written by another model."
            )
        if tuple(saved[name]) != tuple(shape):
            raise CheckpointError(
                f"checkpoint parameter {name} has shape {tuple(saved[name])} but the model expects "
                f"{tuple(shape)}; the config's model section differs from the run that wrote it."
            )


def param_shapes(params: Any) -> dict[str, list[int]]:
    """Flat {'blocks/0/attn/wq': shape} map, recorded in metadata to explain mismatches."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): list(x.shape) for path, x in flat}


def gather_host_states(local_state: Any) -> dict[str, Any]:
    """{'process_<i>': state} of every process, on every process (JSON-safe states).

    orbax writes JSON items from the primary process only, so each host's data-iterator state
    is first gathered everywhere; on restore each host picks its own entry.
    """
    if jax.process_count() == 1:
        return {"process_0": local_state}
    from jax.experimental import multihost_utils

    encoded = np.frombuffer(json.dumps(local_state).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.int32(encoded.size))
    padded = np.zeros(int(np.max(sizes)), np.uint8)
    padded[: encoded.size] = encoded
    gathered = multihost_utils.process_allgather(padded)
    return {
        f"process_{i}": json.loads(bytes(gathered[i, : int(sizes[i])]).decode())
        for i in range(jax.process_count())
    }

"""One validation pass over a run's config, before any data work starts.

`check(config, workdir)` builds every cheap object the run will build later (the model config,
the sharding rules, the schedule and optimizer, the init_from source, the tokenizer file) and
checks every path and range, so a typo fails in a second with one sentence that names the key,
not after data preparation (minutes to hours) or as a traceback. It touches no device: on a
multi-host run it runs before the processes wait for each other.

`check_devices(config)` is the rest, run once the devices are known (after
`jax.distributed.initialize`): the mesh and how the batch splits over it.

`check_manifest(manifest)` refuses prepared data the run cannot evaluate on.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import socket
from collections.abc import Sequence
from typing import Any

import jax

from jaxlm import attention, context, objectives, optim, sharding, stages, storage
from jaxlm import spec as run_spec
from jaxlm.errors import ConfigError, JaxlmError
from jaxlm.evaluate import retrieval

# key -> lowest allowed value (1: positive, 0: non-negative).
_AT_LEAST = {
    "train.steps": 0,  # 0: evaluate the (init_from) model and stop
    "train.batch_size": 1,
    "train.seq_len": 1,
    "train.grad_accum": 1,
    "train.log_every": 1,
    "train.spike_ratio": 0,
    "train.spike_warmup": 0,
    "train.max_bad_steps": 1,
    "train.max_rollbacks": 0,
    "train.loss_chunk": 0,
    "train.z_loss": 0,
    "train.mtp_weight": 0,
    "train.inject_hang_at": 0,
    "train.hang_factor": 0,
    "train.hang_min_s": 0,
    "train.hang_slow_s": 0,
    "optim.lr": 0,
    "optim.init_lr": 0,
    "optim.warmup_steps": 0,
    "optim.min_lr_ratio": 0,
    "optim.weight_decay": 0,
    "optim.clip_norm": 0,
    "optim.eps": 0,
    "optim.muon.lr": 0,
    "optim.muon.ns_steps": 1,
    "optim.muon.consistent_rms": 0,
    **{f"optim.groups.{g}.{k}": 0 for g in optim.GROUPS for k in ("lr_scale", "wd_scale")},
    "model.d_model": 1,
    "model.n_layers": 1,
    "model.n_heads": 1,
    "model.n_kv_heads": 1,
    "model.head_dim": 1,
    "model.d_ff": 1,
    "model.max_seq_len": 1,
    "model.norm_eps": 0,
    "model.init_std": 0,
    "model.value_embeds": 0,
    "model.mtp_heads": 0,
    "checkpoint.every": 1,
    # keep=0 would keep no checkpoint at all (orbax deletes each one once written), so a rerun
    # silently starts over: refused rather than reinterpreted.
    "checkpoint.keep": 1,
    "checkpoint.keep_every": 0,
    "checkpoint.local_every": 0,
    "eval.every": 0,
    "eval.max_batches": 0,
    "eval.batch_size": 0,
    "eval.next_line_examples": 0,
    "data.num_proc": 0,
    "data.docs_per_shard": 1,
    "data.streams": 0,
    "data.passkeys_per_1k": 0,
    "data.passkey_max_gap": 16,
    "eval.retrieval_examples": 1,
    "tokenizer.vocab_size": 1,
    "tokenizer.sample_bytes": 1,
    "sample.max_tokens": 0,
    "sample.temperature": 0,
    "sample.top_k": 0,
}
_BELOW_ONE = (
    "optim.b1",
    "optim.b2",
    "optim.muon.beta",
    "optim.muon.beta2",
)  # momentum decays: [0, 1)
_FRACTIONS = ("optim.decay_fraction", "optim.min_lr_ratio", "sample.top_p")  # [0, 1]


def check(config: Any, workdir: str) -> run_spec.RunSpec:
    """Checks `config` and `workdir` without touching a device or reading the corpus, and
    returns the run's spec (what the run builds from its config, built here once).

    Raises:
      ConfigError: the first problem found, in one sentence naming the key or the file.
    """
    spec = check_config(config)
    _check_data(config)
    _check_paths(config, workdir)
    return spec


def check_config(config: Any) -> run_spec.RunSpec:
    """The checks of `check` that need no files: values, and every object built from them
    (what compiling a step without data, as `jaxlm.aot` does, relies on); returns the spec."""
    _check_finite(config, "")
    for key, low in _AT_LEAST.items():
        value = _get(config, key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < low:
            bound = "positive" if low == 1 else "non-negative"
            raise ConfigError(f"{key}={value!r} must be {bound}.")
    for key in _BELOW_ONE:
        if not 0 <= _get(config, key) < 1:
            raise ConfigError(f"{key}={_get(config, key)!r} must be in [0, 1).")
    for key in _FRACTIONS:
        if not 0 <= _get(config, key) <= 1:
            raise ConfigError(f"{key}={_get(config, key)!r} must be in [0, 1].")
    _check_train(config)
    objectives.check(config)
    return _build_objects(config)


def check_devices(spec: run_spec.RunSpec) -> jax.sharding.Mesh:
    """The run's mesh, after checking that the batches split evenly over it.

    Call after `sharding.maybe_initialize_distributed`: it counts the devices of every process.
    """
    spec.model_for()  # `auto` attention resolves against the platform: the backend is up now
    mesh = sharding.make_mesh(spec.config.mesh.shape)
    check_batches(spec, mesh)
    return mesh


def check_batches(spec: run_spec.RunSpec, mesh: jax.sharding.Mesh) -> None:
    """Refuses train and eval batches that do not split evenly over `mesh`'s batch axes."""
    split, micro = sharding.batch_divisor(mesh), spec.plan.micro_batch
    if micro % split:
        t = spec.config.train
        raise ConfigError(
            f"train.batch_size={t.batch_size} must divide by the batch mesh axes ({split}) "
            f"times train.grad_accum ({t.grad_accum})."
        )
    degree = mesh.shape["context"]
    multiple = context.multiple(spec.model.context_parallel, degree)
    for stage in spec.plan.stages:
        if stage.seq_len % multiple:
            how = "2 x" if spec.model.context_parallel == "ring" else "the"
            key = f"stages[{stage.index}].seq_len" if spec.config.get("stages") else "train.seq_len"
            raise ConfigError(
                f"{key}={stage.seq_len} must be a multiple of {multiple} "
                f"({how} context mesh axis, {degree}) under "
                f"model.context_parallel={spec.model.context_parallel}."
            )
    eval_batch = spec.eval_batch_size
    if eval_batch % split:
        raise ConfigError(
            f"eval.batch_size={spec.config.eval.batch_size} must divide by the batch mesh axes "
            f"({split}); 0 uses train.batch_size."
        )


def check_manifest(
    manifest: dict, manifest_path: str, spec: run_spec.RunSpec | None = None
) -> None:
    """Refuses prepared data with a dataset that has no held-out documents (the run could not
    say how it does on that dataset: a held-out loss of `inf`), or without a validation set
    `config.data.validation` names."""
    for name, entry in sorted(manifest["datasets"].items()):
        if entry["val"]["documents"] == 0:
            raise ConfigError(
                f"dataset {name!r} in {manifest_path} has no held-out documents, so the run could "
                f"not be evaluated on it; give it more documents (for one long text file, "
                f"data.datasets.{name}.split='8000' cuts it into pieces) or a larger "
                "data.val_fraction."
            )
    if spec is not None:
        stages.check_weights(spec.plan, sorted(manifest["datasets"]), manifest_path)
    wanted = dict(spec.config.data.get("validation") or {}) if spec is not None else {}
    missing = sorted(set(wanted) - set(manifest.get("validation", {})))
    if missing:
        raise ConfigError(
            f"data.validation.{missing[0]} is not in {manifest_path}; prepare the data with it "
            "(tools/prepare_data.py with the run's config) or remove it."
        )


def _check_finite(value: Any, key: str) -> None:
    """Refuses a NaN or infinite float anywhere in the config: `optim.lr=nan` would otherwise
    train NaNs for minutes and end by blaming the data."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} must be a finite number.")
    if hasattr(value, "items"):
        for name, child in value.items():
            _check_finite(child, f"{key}.{name}" if key else str(name))
    elif isinstance(value, (list, tuple)):
        for i, child in enumerate(value):
            _check_finite(child, f"{key}[{i}]")


def _get(config: Any, key: str) -> Any:
    for name in key.split("."):
        config = config[name]
    return config


def _check_train(config: Any) -> None:
    t, m = config.train, config.model
    if t.batch_size % t.grad_accum:
        raise ConfigError(
            f"train.batch_size={t.batch_size} must be a multiple of "
            f"train.grad_accum={t.grad_accum}."
        )
    if t.seq_len > m.max_seq_len:
        raise ConfigError(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}.")
    for length in retrieval.lengths_of(config.eval.retrieval_lengths):
        if length > m.max_seq_len:
            raise ConfigError(
                f"eval.retrieval_lengths asks for {length} tokens, more than "
                f"model.max_seq_len={m.max_seq_len}."
            )
    if config.data.passkeys_per_1k and config.get("objective", "causal") != "causal":
        raise ConfigError(
            "data.passkeys_per_1k plants passkeys for next-token prediction; it needs "
            f"objective='causal', not {config.objective!r}."
        )
    for key in ("inject_nan_at", "inject_spike_at"):
        steps = t[key]
        if not isinstance(steps, Sequence) or not all(isinstance(s, int) and s > 0 for s in steps):
            raise ConfigError(f"train.{key}={steps!r} must be a tuple of positive batch numbers.")


def _build_objects(config: Any) -> run_spec.RunSpec:
    """Builds what the run builds from the config (the spec); their own errors name the key."""
    attention_choices = ("auto", *attention.IMPLEMENTATIONS)
    if config.model.attention not in attention_choices:
        raise ConfigError(
            f"model.attention must be one of {attention_choices}, not {config.model.attention!r}."
        )
    _check_mesh_shape(config.mesh.shape)
    if config.optim.schedule not in optim.SCHEDULES:
        raise ConfigError(
            f"optim.schedule must be one of {optim.SCHEDULES}, not {config.optim.schedule!r}."
        )
    spec = run_spec.build(config)  # the model config, the stage plan, the optimizer: once
    _check_context(config)
    if config.get("branch") and not config.init_from.startswith("ckpt:"):
        raise ConfigError(
            "config.branch=True continues another run's checkpoint: set "
            "config.init_from='ckpt:<workdir or step dir>'."
        )
    if config.init_from:
        from jaxlm.convert import init_from

        try:
            src = init_from.model_config(config.init_from)  # parses, reads config/metadata
        except ConfigError:
            raise
        except (JaxlmError, OSError, ValueError, KeyError) as e:
            reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise ConfigError(
                f"config.init_from={config.init_from!r} cannot be read ({reason})."
            ) from None
        # The run takes its source's vocabulary (loop.run); every other shape must match now,
        # not after data preparation and the model build.
        init_from.check_shapes(
            config.init_from, src, dataclasses.replace(spec.model, vocab_size=src.vocab_size)
        )
    return spec


def _check_context(config: Any) -> None:
    """Refuses a sequence split without an attention that crosses it, and the reverse."""
    strategy, preset = config.model.context_parallel, config.mesh.preset
    splits = "seq" in sharding.rules_for(preset)
    if splits and strategy == "none":
        raise ConfigError(
            f"mesh.preset={preset} splits the sequence over the context axis: set "
            "model.context_parallel to all_gather or ring."
        )
    if not splits and strategy != "none":
        raise ConfigError(
            f"model.context_parallel={strategy} needs a mesh.preset that splits the sequence "
            f"(cp_fsdp or cp_fsdp_tp), not {preset}."
        )
    shape = tuple(config.mesh.shape)
    if not splits and len(shape) == len(sharding.MESH_AXES) and shape[-1] != 1:
        raise ConfigError(
            f"mesh.shape={shape} gives the context axis devices but mesh.preset={preset} "
            "does not split the sequence over it; use cp_fsdp or cp_fsdp_tp."
        )


def _check_mesh_shape(shape: Any) -> None:
    """The device-independent half of `sharding.resolve_mesh_shape` (the count comes later)."""
    try:
        sizes = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ConfigError(f"mesh.shape={shape!r} must be a tuple of integers.") from None
    # A device count the shape fits exactly, so only its structure can fail here.
    sharding.resolve_mesh_shape(sizes, math.prod(s for s in sizes if s > 0))


def _check_data(config: Any) -> None:
    from jaxlm.data import prepare, sources
    from jaxlm.data import tokenizer as tokenizer_lib

    d, tok = config.data, config.tokenizer
    if d.manifest:
        manifest = d.manifest
        if storage.is_remote(manifest) and not manifest.endswith("/manifest.json"):
            manifest = storage.join(manifest, "manifest.json")
        try:
            found = storage.isfile(manifest)
        except JaxlmError as e:
            raise ConfigError(f"data.manifest: {e}") from None
        if not found:
            raise ConfigError(f"data.manifest={d.manifest!r} does not exist.")
    else:
        if not 0 < d.val_fraction < 1:
            raise ConfigError(
                f"data.val_fraction={d.val_fraction!r} must be in (0, 1): the run evaluates on "
                "the held-out documents."
            )
        datasets = dict(d.datasets.items()) if d.get("datasets") else {}
        if not datasets:
            raise ConfigError("data.datasets is empty; name at least one dataset to train on.")
        for name, ds in datasets.items():
            if ds.get("weight", 1.0) < 0:
                raise ConfigError(f"data.datasets.{name}.weight={ds.weight} must not be negative.")
            try:
                sources.resolve_files(ds.paths)
            except JaxlmError as e:
                raise ConfigError(f"data.datasets.{name}.paths={ds.paths!r}: {e}") from None
            try:
                sources.check_split(ds.get("split", "file"))
            except sources.SourceError as e:
                raise ConfigError(f"config.data.datasets.{name}.{e}") from None
        _check_validation_sets(d, datasets)
        if not sum(ds.get("weight", 1.0) for ds in datasets.values()) > 0:
            raise ConfigError("data.datasets weights sum to 0; give at least one a weight > 0.")
        try:
            tokenizer_lib.trainer_options(tok)
            prepare.max_document_bytes(d)
        except ValueError as e:  # (DataError is one)
            raise ConfigError(str(e)) from None
    if tok.path:
        path = os.path.expanduser(tok.path)
        if not os.path.isfile(path):
            raise ConfigError(f"tokenizer.path={tok.path!r} does not exist.")
        try:
            loaded = tokenizer_lib.load(path)
        except Exception:  # noqa: BLE001 - sentencepiece raises bare RuntimeErrors
            raise ConfigError(
                f"tokenizer.path={tok.path!r} is not a readable tokenizer: neither a sentencepiece "
                ".model nor a Hugging Face tokenizer.json loads from it."
            ) from None
        objectives.check_tokenizer(config, loaded)  # [MASK] or FIM sentinels, if needed


def _check_validation_sets(d: Any, datasets: dict[str, Any]) -> None:
    """data.validation.<name>: a usable metric name, not a dataset's, with files that exist."""
    from jaxlm.data import sources

    for name, vs in (d.get("validation") or {}).items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in ("all", "loss"):
            raise ConfigError(
                f"data.validation.{name}: a validation set's name must be letters, digits, '_', "
                "'.' or '-' (it names metrics such as eval/<name>/loss)."
            )
        if name in datasets:
            raise ConfigError(
                f"data.validation.{name} has the name of a training dataset; name it otherwise "
                "(their metrics would collide)."
            )
        if not hasattr(vs, "get") or not isinstance(vs.get("paths"), str):
            raise ConfigError(
                f"data.validation.{name} must be a ConfigDict with paths='<globs>' (and "
                "optionally text_field)."
            )
        if not isinstance(vs.get("text_field", "text"), str):
            raise ConfigError(f"data.validation.{name}.text_field must be a string.")
        try:
            sources.resolve_files(vs.paths)
        except JaxlmError as e:
            raise ConfigError(f"data.validation.{name}.paths={vs.paths!r}: {e}") from None


def _check_paths(config: Any, workdir: str) -> None:
    from jaxlm.data import sources
    from jaxlm.evaluate import tasks

    for path in filter(None, (p.strip() for p in config.eval.task_files.split(","))):
        try:
            tasks.load_task(path)
        except JaxlmError as e:
            raise ConfigError(f"eval.task_files: {e}") from None
    _check_local_dir(config.checkpoint)
    # Buckets are probed with a small write: credentials, bucket and permission problems are
    # one sentence here, before any data work.
    cache = sources.cache_root(config.data.cache_dir)
    try:
        if storage.is_remote(cache) and not config.data.manifest:
            storage.check_writable(cache, "the prepared-data cache (data.cache_dir or JAXLM_CACHE)")
        if storage.is_remote(workdir):
            storage.check_writable(workdir, "--workdir")
            return
    except JaxlmError as e:
        raise ConfigError(str(e)) from None
    try:
        os.makedirs(workdir, exist_ok=True)
        # Host and pid in the name: many processes may share the workdir.
        probe = os.path.join(workdir, f".write_test.{socket.gethostname()}.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(
            f"--workdir {workdir!r} cannot be written ({e.strerror}); choose another."
        ) from None


def _check_local_dir(ckpt: Any) -> None:
    """The local checkpoint tier's directory, when the tier is on: a writable host-local path."""
    if not ckpt.local_every:
        return
    if not ckpt.local_dir or "://" in ckpt.local_dir:
        raise ConfigError(
            f"checkpoint.local_dir={ckpt.local_dir!r} must be a directory on this host (e.g. "
            "/dev/shm/jaxlm or a local SSD) when checkpoint.local_every is set."
        )
    try:
        os.makedirs(ckpt.local_dir, exist_ok=True)
        probe = os.path.join(ckpt.local_dir, f".write_test.{socket.gethostname()}.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(
            f"checkpoint.local_dir={ckpt.local_dir!r} cannot be written ({e.strerror}); choose "
            "another host-local directory or set checkpoint.local_every=0."
        ) from None

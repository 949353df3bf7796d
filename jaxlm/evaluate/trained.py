"""Models to evaluate: a run's checkpoint, an imported checkpoint, or a Hugging Face directory.

`load_trained(workdir)` restores the parameters of a run's (or a `tools/convert_hf.py import`
workdir's) newest or given checkpoint; `load_hf(hf_dir)` reads a Hugging Face directory of any
family jaxlm imports (docs/families.md) directly. Both return a `Trained` whose `setup` has what
evaluation and sampling need (graphdef, mesh_rules, model_cfg, param_shardings), so every tool
scores a model the same way whichever way it arrived.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any

import jax
from flax import nnx

from jaxlm import model as model_lib
from jaxlm import sharding
from jaxlm import spec as run_spec
from jaxlm.errors import JaxlmError


@dataclasses.dataclass
class Trained:
    """A model ready to evaluate or sample from."""

    config: Any  # the run's ConfigDict; None for imported and Hugging Face models
    setup: Any  # train.Setup or Placement: graphdef, model_cfg, mesh_rules, param_shardings
    params: Any  # parameter pure dict, in setup.param_shardings
    tokenizer: Any  # jaxlm.data.tokenizer.Tokenizer or HFTokenizer
    step: int  # the checkpoint's step (0 for a Hugging Face directory)


class Placement:
    """What evaluation and sampling need of a run's `train.Setup`, without its optimizer: a
    Hugging Face model or an imported checkpoint has no run config to build one from."""

    def __init__(self, model_cfg: model_lib.ModelConfig, mesh: jax.sharding.Mesh, preset: str):
        self.model_cfg = model_cfg
        self.mesh_rules = sharding.MeshRules.of(mesh, preset)
        self.graphdef, abstract = nnx.split(model_lib.abstract(model_cfg))
        self.abstract_params = nnx.to_pure_dict(abstract)
        axes = model_lib.logical_axes(abstract)
        self.param_shardings = sharding.tree_shardings(
            mesh, axes, self.abstract_params, self.mesh_rules.mapping
        )

    @property
    def mesh(self) -> jax.sharding.Mesh:
        """The device mesh the parameters are placed on."""
        return self.mesh_rules.mesh


def load_trained(
    workdir: str, step: int | None = None, mesh: jax.sharding.Mesh | None = None
) -> Trained:
    """Restores the parameters (not the optimizer state) of a run's newest or given checkpoint.

    The config comes from the checkpoint's metadata (falling back to `<workdir>/config.json`), the
    tokenizer from `<workdir>/tokenizer.model` (falling back to the config's `tokenizer.path`),
    checked against the hash recorded in the checkpoint.

    Args:
      workdir: the run directory given to `jaxlm.main --workdir`.
      step: checkpoint step to load; None = the newest.
      mesh: where to place the params; default all devices, (1, -1, 1) with the run's preset.
    """
    import ml_collections
    from flax import traverse_util

    from jaxlm import checkpoint as ckpt_lib
    from jaxlm import train

    if not os.path.isdir(workdir):
        raise JaxlmError(
            f"workdir {workdir!r} does not exist; pass the --workdir of a training run."
        )
    ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
    steps = ckpt_lib.all_steps(ckpt_dir)
    if not steps:
        raise JaxlmError(
            f"no checkpoint in {ckpt_dir}; train first (python -m jaxlm.main --workdir={workdir})."
        )
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise JaxlmError(f"no checkpoint at step {step} in {ckpt_dir}; available steps: {steps}.")

    meta = ckpt_lib.read_step_meta(ckpt_dir, step)
    if mesh is None:
        mesh = sharding.make_mesh((1, -1, 1))
    config_dict = meta.get("config")
    if config_dict is None and meta.get("params_only"):  # tools/convert_hf.py import
        return _load_import(workdir, ckpt_dir, step, meta, mesh)
    if config_dict is None:
        config_path = os.path.join(workdir, "config.json")
        if not os.path.isfile(config_path):
            raise JaxlmError(f"checkpoint {step} records no config and {config_path} is missing.")
        with open(config_path) as f:
            config_dict = json.load(f)
    config = ml_collections.ConfigDict(config_dict)

    tokenizer = _tokenizer_of(workdir, config, meta, step)
    # The checkpoint's embedding fixes the vocab (it may be padded beyond the tokenizer's).
    vocab_size = (meta.get("param_shapes") or {}).get("embed", [tokenizer.vocab_size])[0]
    setup = train.Setup(run_spec.build(config), vocab_size, mesh)
    use_model_of_step(setup, step)
    ckpt_lib.check_compatible(meta, setup.abstract_state)
    abstract = traverse_util.flatten_dict(setup.abstract_state["params"])
    shardings = {path: leaf.sharding for path, leaf in abstract.items()}
    params = traverse_util.unflatten_dict(
        ckpt_lib.restore_params(ckpt_dir, step, abstract, shardings)
    )
    return Trained(config=config, setup=setup, params=params, tokenizer=tokenizer, step=step)


def use_model_of_step(setup: Any, step: int) -> None:
    """Points `setup`'s graphdef and model config at the model as trained up to `step`: a stage
    may have changed RoPE (a YaRN context extension), and the run's first RoPE would score that
    checkpoint silently wrong."""
    stage = setup.spec.plan.stage_at(max(step - 1, 0))
    setup.graphdef = setup.graphdef_for(stage)
    setup.model_cfg = dataclasses.replace(
        setup.model_cfg, rope_theta=stage.rope_theta, rope_scaling=stage.rope_scaling
    )


def _load_import(
    workdir: str, ckpt_dir: str, step: int, meta: dict, mesh: jax.sharding.Mesh
) -> Trained:
    """The params-only checkpoint `tools/convert_hf.py import` writes, with its tokenizer."""
    from flax import traverse_util

    from jaxlm import checkpoint as ckpt_lib

    placement = Placement(ckpt_lib.model_config_from_meta(meta, f"{ckpt_dir}/{step}"), mesh, "fsdp")
    tokenizer = _tokenizer_of(workdir, None, meta, step)
    abstract = traverse_util.flatten_dict(placement.abstract_params)
    abstract = {p: jax.ShapeDtypeStruct(a.shape, a.dtype) for p, a in abstract.items()}
    shardings = traverse_util.flatten_dict(placement.param_shardings)
    params = traverse_util.unflatten_dict(
        ckpt_lib.restore_params(ckpt_dir, step, abstract, shardings)
    )
    return Trained(config=None, setup=placement, params=params, tokenizer=tokenizer, step=step)


def load_hf(hf_dir: str, mesh: jax.sharding.Mesh | None = None, progress: bool = False) -> Trained:
    """A Hugging Face directory of any family jaxlm imports (config.json, *.safetensors,
    tokenizer files), read tensor by tensor onto the devices.

    Raises:
      JaxlmError: not a directory, another architecture, missing or malformed weights, or no
        tokenizer.json / tokenizer.model beside them (one sentence each).
    """
    from flax import traverse_util

    from jaxlm.convert import hf
    from jaxlm.data import tokenizer as tokenizer_lib
    from jaxlm.data.hf_tokenizer import find_tokenizer

    cfg = model_lib.ModelConfig.from_hf(hf.read_hf_config(hf_dir), f"{hf_dir}/config.json")
    tokenizer_file = find_tokenizer(hf_dir)
    if not tokenizer_file:
        raise JaxlmError(
            f"{hf_dir} has no tokenizer.json or tokenizer.model; copy the model's tokenizer "
            "files into it."
        )
    tokenizer = tokenizer_lib.load(tokenizer_file)
    placement = Placement(cfg, mesh or sharding.make_mesh((1, -1, 1)), "fsdp")
    shardings = traverse_util.flatten_dict(placement.param_shardings)
    flat = {}
    for t, w in hf.iter_hf_params(hf_dir, cfg, progress=progress):
        flat[t.path] = sharding.place(w, shardings[t.path])
        del w
    params = traverse_util.unflatten_dict(flat)
    return Trained(config=None, setup=placement, params=params, tokenizer=tokenizer, step=0)


def _tokenizer_of(workdir: str, config: Any, meta: dict, step: int) -> Any:
    """The run's tokenizer, checked against the hash its checkpoint recorded."""
    from jaxlm.data import tokenizer as tokenizer_lib

    tokenizer = tokenizer_lib.load(_find_tokenizer(workdir, config))
    tokenizer_lib.check_same(
        tokenizer.sha256,
        meta.get("tokenizer_sha256"),
        tokenizer.path,
        f"checkpoint {step} was trained with",
        f"copy the run's tokenizer.model into {workdir}",
    )
    return tokenizer


def _find_tokenizer(workdir: str, config: Any) -> str:
    # The workdir's copy first (an import keeps the model's files in tokenizer/); then where
    # the run's config says the tokenizer came from.
    from jaxlm.data.hf_tokenizer import find_tokenizer

    candidates = [os.path.join(workdir, name) for name in ("tokenizer.model", "tokenizer.json")]
    candidates.append(find_tokenizer(os.path.join(workdir, "tokenizer")))  # '' if none
    config = config or {}
    if config.get("tokenizer") and config["tokenizer"].get("path"):
        candidates.append(config["tokenizer"]["path"])
    if config.get("data") and config["data"].get("manifest"):
        from jaxlm.data import manifest as manifest_lib

        with contextlib.suppress(JaxlmError):  # a moved or stale manifest offers no candidate
            candidates.append(
                manifest_lib.tokenizer_path(manifest_lib.load(config["data"]["manifest"]))
            )
    candidates = [c for c in candidates if c]
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise JaxlmError(
        f"no tokenizer for the model in {workdir}: looked for {', '.join(candidates)}; copy the "
        "run's tokenizer.model (from its prepared-data folder) into the workdir."
    )

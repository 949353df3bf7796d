"""`config.init_from`: start a new run from Hugging Face weights or another run's checkpoint.

`hf:<model dir>` streams the safetensors tensor by tensor onto the devices; `ckpt:<workdir,
checkpoints dir or step dir>` reads only the params of that run. Either way the optimizer,
step and data position start fresh, the model's shapes must match the source's (one sentence
names the field that differs) and so must the tokenizer.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from jaxlm import checkpoint as ckpt_lib
from jaxlm import model as model_lib
from jaxlm import sharding
from jaxlm.convert import hf
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.data.files import file_sha256
from jaxlm.data.hf_tokenizer import find_tokenizer
from jaxlm.errors import ConfigError

SHAPE_FIELDS = (
    "vocab_size",
    "d_model",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "d_ff",
    "tie_embeddings",
    # the architecture switches: the same weights mean another function under each
    "qkv_bias",
    "qk_norm",
    "norm_placement",
    "norm_plus_one",
    "embed_scale",
    "mlp_act",
)
# model.moe settings that shape the weights or change what the same weights compute
MOE_SHAPE_FIELDS = (
    "n_experts",
    "expert_d_ff",
    "n_shared_experts",
    "first_dense_layers",
    "every",
    "router",
    "top_k",
    "normalize_top_k",
)
NUMERIC_FIELDS = (
    "rope_theta",
    "rope_scaling",
    "norm_eps",
    "sliding_window",
    "global_every",
    "rope_local_theta",
    "attn_softcap",
    "final_softcap",
    "query_scale_dim",
)


def parse(init_from: str) -> tuple[str, str]:
    """('hf' | 'ckpt', path) of a `config.init_from` value."""
    kind, sep, path = init_from.partition(":")
    if not sep or kind not in ("hf", "ckpt") or not path:
        raise ConfigError(
            f"config.init_from={init_from!r} must be 'hf:<model dir>' or "
            "'ckpt:<workdir or step dir>'."
        )
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise ConfigError(f"config.init_from={init_from!r}: {path} does not exist.")
    return kind, path


def model_config(init_from: str) -> model_lib.ModelConfig:
    """The ModelConfig of the weights `init_from` names (reads config/metadata, not weights)."""
    kind, path = parse(init_from)
    if kind == "hf":
        config_json = os.path.join(path, "config.json")
        return model_lib.ModelConfig.from_hf(hf.read_hf_config(path), config_json)
    ckpt_dir, step = ckpt_lib.resolve(path)
    return ckpt_lib.model_config_from_meta(
        ckpt_lib.read_step_meta(ckpt_dir, step), f"{ckpt_dir}/{step}"
    )


def check_shapes(init_from: str, src: model_lib.ModelConfig, mine: model_lib.ModelConfig) -> None:
    """Refuses a run whose model shapes differ from its source's (one sentence, the field).

    Raises:
      ConfigError: the first of `SHAPE_FIELDS`, then of `MOE_SHAPE_FIELDS`, that differs.
    """
    for field in SHAPE_FIELDS:
        theirs, ours = getattr(src, field), getattr(mine, field)
        if theirs != ours:
            name = "tokenizer's vocab_size" if field == "vocab_size" else f"model.{field}"
            raise ConfigError(
                f"config.init_from={init_from!r} has {field}={theirs} but the run's "
                f"{name} is {ours}; make the run's model match its source."
            )
    for field in MOE_SHAPE_FIELDS:
        theirs, ours = (getattr(c.moe, field) if c.moe else 0 for c in (src, mine))
        if theirs != ours:
            raise ConfigError(
                f"config.init_from={init_from!r} has moe.{field}={theirs} but the run's "
                f"model.moe.{field} is {ours}; make the run's model match its source."
            )


def tokenizer_file(init_from: str) -> str:
    """The tokenizer file that came with `init_from`'s weights ('' if none)."""
    kind, path = parse(init_from)
    if kind == "ckpt":
        path = os.path.join(os.path.dirname(ckpt_lib.resolve(path)[0]), "tokenizer")
    return find_tokenizer(path)


def model_fields(init_from: str) -> dict[str, Any]:
    """The `config.model` fields of a source model, for a recipe to copy (plus vocab_size)."""
    fields = dataclasses.asdict(model_config(init_from))
    for run_choice in ("dtype", "remat", "attention", "scan_layers"):  # how it runs, not what
        fields.pop(run_choice)
    return fields


def load_params(
    init_from: str,
    setup: Any,
    tokenizer_sha256: str | None = None,
    log: Callable[[str], None] = print,
) -> Any:
    """The parameters `init_from` names, placed in `setup.param_shardings` (a pure dict).

    Args:
      init_from: 'hf:<HF model dir>' (streamed tensor by tensor onto the devices) or
        'ckpt:<workdir, checkpoints dir or step dir>' (only the params are read: the
        optimizer state, step and data position of that run are ignored).
      setup: the new run's `train.Setup`.
      tokenizer_sha256: the run's tokenizer hash; refused if the source came with another.
      log: where a RoPE/norm setting that differs from the source's is reported.

    Raises:
      ConfigError: a shape-defining model field differs from the source's (named), or the
        data was tokenized with another tokenizer than the source model's.
    """
    kind, path = parse(init_from)
    src, mine = model_config(init_from), setup.model_cfg
    check_shapes(init_from, src, mine)
    for field in NUMERIC_FIELDS:
        if getattr(src, field) != getattr(mine, field):
            log(
                f"init_from: model.{field}={getattr(mine, field)} differs from the source's "
                f"{getattr(src, field)}; training will adapt the weights to it."
            )
    _check_tokenizer(init_from, tokenizer_sha256)
    # Sources are read one tensor per layer; a scanned run stacks them on the host first.
    shardings = None if mine.scan_layers else traverse_util.flatten_dict(setup.param_shardings)
    if kind == "hf":
        flat = {}
        for t, w in hf.iter_hf_params(path, src, progress=True):
            flat[t.path] = w if shardings is None else sharding.place(w, shardings[t.path])
            del w
    else:
        ckpt_dir, step = ckpt_lib.resolve(path)
        abstract = {t.path: jax.ShapeDtypeStruct(t.shape, np.float32) for t in hf.layout(src)}
        stacked_layers = src.n_layers if src.scan_layers else 0
        flat = ckpt_lib.restore_params(ckpt_dir, step, abstract, shardings, stacked_layers)
    params = traverse_util.unflatten_dict(flat)
    if not mine.scan_layers:
        return params
    stacked = traverse_util.flatten_dict(model_lib.stack_layers(params))
    shardings = traverse_util.flatten_dict(setup.param_shardings)
    return traverse_util.unflatten_dict(
        {p: sharding.place(w, shardings[p]) for p, w in stacked.items()}
    )


def _check_tokenizer(init_from: str, sha: str | None) -> None:
    kind, path = parse(init_from)
    if not sha:
        return
    if kind == "hf":
        known = {
            file_sha256(os.path.join(path, n))
            for n in ("tokenizer.json", "tokenizer.model")
            if os.path.isfile(os.path.join(path, n))
        }
    else:
        ckpt_dir, step = ckpt_lib.resolve(path)
        known = {ckpt_lib.read_step_meta(ckpt_dir, step).get("tokenizer_sha256")} - {"", None}
    tokenizer_lib.check_same(
        sha,
        known,
        "the run's data",
        f"config.init_from={init_from!r} came with",
        "set config.tokenizer.path to it",
    )

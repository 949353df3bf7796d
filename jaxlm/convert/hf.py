"""Hugging Face Llama-family safetensors <-> jaxlm checkpoints.

- `import_hf(hf_dir, workdir)`: `config.json` + `*.safetensors` (one file, or shards with
  `model.safetensors.index.json`) -> `workdir/checkpoints/0/` (a params-only state),
  `workdir/model_config.json`, and the tokenizer files copied to `workdir/tokenizer/`.
- `export_hf(ckpt, out_dir)`: a jaxlm checkpoint -> `config.json`, `model.safetensors` (or
  shards of at most `max_shard_bytes` + index), `generation_config.json` and tokenizer files,
  loadable with `transformers.AutoModelForCausalLM.from_pretrained(out_dir)`.
`jaxlm/convert/init_from.py` starts a new run from either kind of weights.

Conversion streams: each tensor is read on its own (`safetensors.safe_open`, reopened per
tensor so no file stays memory-mapped); export reads the checkpoint in pieces of
RESTORE_BYTES and appends each tensor to its shard file as it is converted. The host holds
about one copy of the model on import and a few hundred MB on export. jaxlm keeps fp32
parameters, so an fp32 export round-trips bit for bit.

Layouts (HF Linear weights are (out, in)):
  q_proj (H*E, D) <-> wq (D, H, E);  k_proj, v_proj (K*E, D) <-> wk, wv (D, K, E)
  o_proj (D, H*E) <-> wo (H, E, D);  gate/up_proj (F, D) <-> w_gate/w_up (D, F)
  down_proj (D, F) <-> w_down (F, D); embed_tokens (V, D) = embed; lm_head (V, D) <-> (D, V)
RoPE needs no permutation: jaxlm uses transformers' "rotate half" layout.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import types
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx, traverse_util

from jaxlm import checkpoint as ckpt_lib
from jaxlm import model as model_lib
from jaxlm.data import hf_tokenizer
from jaxlm.data.hf_tokenizer import file_sha256, find_tokenizer
from jaxlm.errors import ConfigError, JaxlmError

ARCHITECTURES = ("LlamaForCausalLM",)
DTYPES = ("float32", "bfloat16", "float16")
SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # a buffer old checkpoints saved; recomputed here
RESTORE_BYTES = 256 * 2**20  # export reads the checkpoint in pieces of about this size


class ConvertError(JaxlmError):
    """A model directory or checkpoint that cannot be converted; the message names the cause."""


# --------------------------------------------------------------------------- configs


def read_hf_config(hf_dir: str) -> dict[str, Any]:
    """The parsed `config.json` of a Hugging Face model directory."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isdir(hf_dir):
        raise ConvertError(f"{hf_dir} is not a directory; pass a Hugging Face model directory.")
    if not os.path.isfile(path):
        raise ConvertError(
            f"{hf_dir} has no config.json; point at a Hugging Face model directory "
            "(config.json + *.safetensors)."
        )
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}).") from None


def _rope(hf: dict[str, Any], where: str) -> tuple[float, tuple | None]:
    """(rope_theta, Llama-3 rope_scaling or None) from either transformers config format."""
    # transformers < 5 writes rope_theta + rope_scaling; 5 writes rope_parameters.
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    params = hf.get(key) or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise ConvertError(f"{where}: a per-layer {key} is not supported (one RoPE for all).")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ConvertError(f"{where}: partial_rotary_factor={partial} is not supported (only 1).")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ConvertError(
            f"{where}: {key}.rope_type={rope_type!r} is not supported; only "
            "Llama-3 ('llama3') RoPE scaling or none."
        )
    try:
        original = params.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
        return theta, (
            float(params["factor"]),
            float(params["low_freq_factor"]),
            float(params["high_freq_factor"]),
            int(original),
        )
    except (KeyError, TypeError) as e:
        raise ConvertError(f"{where}: {key} of type llama3 lacks the field {e}.") from None


def model_config_from_hf(hf: dict[str, Any], where: str = "config.json") -> model_lib.ModelConfig:
    """The jaxlm ModelConfig of a Hugging Face Llama config; unsupported options are errors."""
    arch, model_type = hf.get("architectures") or [], hf.get("model_type")
    if model_type != "llama" or any(a not in ARCHITECTURES for a in arch):
        raise ConvertError(
            f"{where} has architectures={arch} (model_type {model_type!r}); only "
            f"Llama-architecture causal LMs ({', '.join(ARCHITECTURES)}) import."
        )
    if hf.get("quantization_config"):
        raise ConvertError(f"{where}: quantization_config is set; import an unquantized model.")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConvertError(f"{where}: hidden_act={hf['hidden_act']!r} is unsupported (only silu).")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ConvertError(f"{where}: {flag}=true is not supported (jaxlm has no biases).")
    theta, scaling = _rope(hf, where)
    try:
        d_model, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        return model_lib.ModelConfig(
            vocab_size=int(hf["vocab_size"]),
            d_model=d_model,
            n_layers=int(hf["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            head_dim=int(hf.get("head_dim") or d_model // n_heads),
            d_ff=int(hf["intermediate_size"]),
            max_seq_len=int(hf.get("max_position_embeddings", 2048)),
            rope_theta=theta,
            rope_scaling=scaling,
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            init_std=float(hf.get("initializer_range", 0.02)),
        )
    except KeyError as e:
        raise ConvertError(f"{where} lacks the field {e.args[0]!r} a Llama config needs.") from None
    except ConfigError as e:
        raise ConvertError(f"{where} describes a model jaxlm cannot build: {e}") from None


def hf_config_from_model(
    cfg: model_lib.ModelConfig,
    dtype: str = "float32",
    special_ids: dict[str, int | None] | None = None,
) -> dict[str, Any]:
    """A `config.json` for transformers' LlamaForCausalLM (read by transformers 4.43+ and 5)."""
    scaling = None
    if cfg.rope_scaling is not None:
        factor, low, high, original = cfg.rope_scaling
        scaling = {
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": low,
            "high_freq_factor": high,
            "original_max_position_embeddings": original,
        }
    ids = special_ids or {}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": scaling,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "pretraining_tp": 1,
        "use_cache": True,
        **{k: ids.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
        "torch_dtype": dtype,
        "dtype": dtype,  # transformers 4 reads torch_dtype, 5 dtype
    }


def model_config_from_dict(fields: dict[str, Any]) -> model_lib.ModelConfig:
    """A ModelConfig from its JSON form (`model_config.json`, checkpoint metadata)."""
    known = {f.name for f in dataclasses.fields(model_lib.ModelConfig)}
    kwargs = {k: v for k, v in fields.items() if k in known}
    if kwargs.get("rope_scaling") is not None:
        kwargs["rope_scaling"] = tuple(kwargs["rope_scaling"])
    return model_lib.ModelConfig(**kwargs)


# --------------------------------------------------------------------------- parameter layout

# (path in a block, name after 'model.layers.<i>.', how the array is laid out in HF)
_BLOCK = (
    (("attn_norm", "scale"), "input_layernorm.weight", "same"),
    (("attn", "wq"), "self_attn.q_proj.weight", "in_heads"),
    (("attn", "wk"), "self_attn.k_proj.weight", "in_heads"),
    (("attn", "wv"), "self_attn.v_proj.weight", "in_heads"),
    (("attn", "wo"), "self_attn.o_proj.weight", "out_heads"),
    (("mlp_norm", "scale"), "post_attention_layernorm.weight", "same"),
    (("mlp", "w_gate"), "mlp.gate_proj.weight", "linear"),
    (("mlp", "w_up"), "mlp.up_proj.weight", "linear"),
    (("mlp", "w_down"), "mlp.down_proj.weight", "linear"),
)


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One parameter: its jaxlm key path and shape, its HF name, and how it is reshaped."""

    path: tuple  # key path in the jaxlm pure dict, e.g. ('blocks', 0, 'attn', 'wq')
    hf_name: str
    kind: str  # same | linear (transposed) | in_heads | out_heads
    shape: tuple[int, ...]  # jaxlm shape

    @property
    def hf_shape(self) -> tuple[int, ...]:
        s = self.shape
        if self.kind == "in_heads":
            return (s[1] * s[2], s[0])  # (D, N, E) -> (N*E, D)
        if self.kind == "out_heads":
            return (s[2], s[0] * s[1])  # (H, E, D) -> (D, H*E)
        return s[::-1] if self.kind == "linear" else s

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def layout(cfg: model_lib.ModelConfig) -> list[Tensor]:
    """Every parameter of `cfg`'s model, in Hugging Face's order, one tensor per layer (paths
    ('blocks', i, ...)) also for a `scan_layers` model, whose checkpoints stack them."""
    per_layer = dataclasses.replace(cfg, scan_layers=False)
    pure = nnx.to_pure_dict(nnx.state(model_lib.abstract(per_layer)))
    shape = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(pure).items()}
    out = [Tensor(("embed",), "model.embed_tokens.weight", "same", shape[("embed",)])]
    for i in range(cfg.n_layers):
        for tail, name, kind in _BLOCK:
            path = ("blocks", i, *tail)
            out.append(Tensor(path, f"model.layers.{i}.{name}", kind, shape[path]))
    path = ("final_norm", "scale")
    out.append(Tensor(path, "model.norm.weight", "same", shape[path]))
    if not cfg.tie_embeddings:
        out.append(Tensor(("lm_head",), "lm_head.weight", "linear", shape[("lm_head",)]))
    if len(out) != len(shape):  # the model grew a parameter this table does not know
        raise ConvertError(f"the converter does not know all jaxlm parameters {sorted(shape)}.")
    return out


def to_jaxlm(t: Tensor, w: np.ndarray) -> np.ndarray:
    """A Hugging Face tensor in jaxlm's layout, fp32 and C-contiguous."""
    w = np.asarray(w, np.float32)
    if t.kind != "same":
        w = w.T.reshape(t.shape)  # (out, in) -> (in, out), then split the head axis
    return np.ascontiguousarray(w)


def to_hf(t: Tensor, x: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
    """A jaxlm parameter in Hugging Face's layout and `dtype`, C-contiguous."""
    x = np.asarray(x)
    if t.kind == "in_heads":
        x = x.reshape(t.shape[0], -1).T  # (D, N, E) -> (N*E, D)
    elif t.kind == "out_heads":
        x = x.reshape(-1, t.shape[-1]).T  # (H, E, D) -> (D, H*E)
    elif t.kind == "linear":
        x = x.T
    return np.ascontiguousarray(x.astype(dtype))


# --------------------------------------------------------------------------- reading safetensors


class SafetensorsReader:
    """The tensors of a model directory by name; each read opens, copies and closes its file."""

    def __init__(self, hf_dir: str):
        try:
            from safetensors import safe_open
        except ImportError:
            raise ConvertError("reading safetensors needs pip install 'jaxlm[hf]'.") from None
        self._open = lambda file: safe_open(os.path.join(hf_dir, file), framework="numpy")
        self.dir, index = hf_dir, os.path.join(hf_dir, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set((json.load(f).get("weight_map") or {}).values()))
            for name in files:
                if not os.path.isfile(os.path.join(hf_dir, name)):
                    raise ConvertError(
                        f"{hf_dir}: shard {name} listed in model.safetensors."
                        "index.json is missing; download it again."
                    )
        elif os.path.isfile(os.path.join(hf_dir, "model.safetensors")):
            files = ["model.safetensors"]
        else:
            files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
        if not files:
            bins = any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(hf_dir))
            hint = " (only PyTorch weights: re-save with safe_serialization=True)" if bins else ""
            raise ConvertError(f"{hf_dir} has no *.safetensors weights{hint}.")
        self.file, self.shape = {}, {}  # by tensor name; reading headers maps no tensor data
        for file in files:
            with self._open(file) as f:
                for name in f.keys():
                    self.file[name], self.shape[name] = file, tuple(f.get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        path = os.path.join(self.dir, self.file[name])
        try:
            with self._open(self.file[name]) as f:
                return f.get_tensor(name)
        except TypeError:  # safetensors < 0.6 cannot give numpy bfloat16 arrays
            return read_raw(path, name)
        except Exception as e:  # noqa: BLE001 - truncated or corrupt file
            raise ConvertError(
                f"{self.dir}: tensor {name} in {self.file[name]} cannot be read "
                f"({str(e)[:120]}); the file may be truncated."
            ) from None


def read_raw(path: str, name: str) -> np.ndarray:
    """One tensor of a safetensors file, read from its header's byte offsets."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        entry = json.loads(f.read(n))[name]
        begin, end = entry["data_offsets"]
        f.seek(8 + n + begin)
        dtype = {v: k for k, v in SAFETENSORS_DTYPES.items()}[entry["dtype"]]
        data = np.frombuffer(f.read(end - begin), np.dtype(getattr(jax.numpy, dtype)))
    return data.reshape(entry["shape"])


def iter_hf_params(
    hf_dir: str, cfg: model_lib.ModelConfig, progress: bool = False
) -> Iterator[tuple[Tensor, np.ndarray]]:
    """Yields (tensor, fp32 array in jaxlm layout), one parameter at a time.

    Every expected tensor is checked for presence and shape before the first is read, so a
    wrong or incomplete checkpoint fails at once, in one sentence.
    """
    reader = SafetensorsReader(hf_dir)
    # A checkpoint of the bare LlamaModel has no 'model.' prefix (and no lm_head).
    bare = "model.embed_tokens.weight" not in reader.file and "embed_tokens.weight" in reader.file
    tensors, names = layout(cfg), {}
    for t in tensors:
        name = t.hf_name.removeprefix("model.") if bare else t.hf_name
        if name not in reader.file:
            raise ConvertError(f"{hf_dir}: tensor {name} is missing from the safetensors files.")
        if reader.shape[name] != t.hf_shape:
            raise ConvertError(
                f"{hf_dir}: tensor {name} has shape {reader.shape[name]} but "
                f"config.json implies {t.hf_shape}."
            )
        names[t] = name
    extra = sorted(
        n
        for n in set(reader.file) - set(names.values())
        if not n.endswith(IGNORED_SUFFIXES) and n != "lm_head.weight"
    )
    if extra:  # (a tied model may still carry a copy of lm_head.weight: ignored)
        raise ConvertError(
            f"{hf_dir}: tensor {extra[0]} (and {len(extra) - 1} more) has no place "
            "in a Llama model; the checkpoint is of another architecture."
        )
    bar = Progress("import", sum(t.size for t in tensors) * 4, enabled=progress)
    for t in tensors:
        w = to_jaxlm(t, reader.get(names[t]))
        bar.update(w.nbytes)
        yield t, w
    bar.done()


# --------------------------------------------------------------------------- import


def import_hf(hf_dir: str, workdir: str, progress: bool = True) -> model_lib.ModelConfig:
    """Converts a Hugging Face Llama directory into a jaxlm checkpoint in `workdir`.

    Writes `workdir/checkpoints/0/` (state = {'params'} only; `init_from.load_params` reads it),
    `workdir/model_config.json` and `workdir/tokenizer/` (the model's tokenizer files).
    Returns the model's ModelConfig.
    """
    hf = read_hf_config(hf_dir)
    cfg = model_config_from_hf(hf, os.path.join(hf_dir, "config.json"))
    ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        raise ConvertError(f"{ckpt_dir} already holds checkpoints; import into an empty --workdir.")
    try:  # host-side jax arrays: orbax saves those with less extra memory than numpy ones
        cpu = jax.devices("cpu")[0]
    except RuntimeError:
        cpu = None
    flat = {}
    for t, w in iter_hf_params(hf_dir, cfg, progress):
        flat[t.path] = jax.device_put(w, cpu) if cpu is not None else w
        del w
    params = traverse_util.unflatten_dict(flat)
    del flat
    meta = {
        "source": "hf:" + os.path.abspath(hf_dir),
        "params_only": True,
        "model_config": dataclasses.asdict(cfg),
        "hf_config": hf,
        "tokenizer_sha256": hf_tokenizer.copy_files(hf_dir, os.path.join(workdir, "tokenizer")),
        "param_shapes": ckpt_lib.param_shapes(params),
    }
    opts = types.SimpleNamespace(keep=None, keep_every=0, async_save=False)
    checkpointer = ckpt_lib.Checkpointer(ckpt_dir, opts)
    checkpointer.save(0, {"params": params}, None, meta, force=True)
    checkpointer.close()
    _write_json(os.path.join(workdir, "model_config.json"), dataclasses.asdict(cfg))
    return cfg


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


# --------------------------------------------------------------------------- jaxlm checkpoints


def resolve_checkpoint(path: str, step: int | None = None) -> tuple[str, int]:
    """(checkpoints directory, step) for a workdir, its checkpoints/ folder or a step folder."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.path.expanduser(path))
    if os.path.basename(path).isdigit() and os.path.isdir(os.path.join(path, "state")):
        return os.path.dirname(path), int(os.path.basename(path)) if step is None else step
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    steps = sorted(ocp.CheckpointManager(path).all_steps()) if os.path.isdir(path) else []
    if not steps:
        raise ConvertError(f"no jaxlm checkpoint found in {path}; pass a workdir or a step folder.")
    if step is not None and step not in steps:
        raise ConvertError(f"{path} has no checkpoint at step {step} (it has {steps}).")
    return path, steps[-1] if step is None else step


def model_config_from_meta(meta: dict[str, Any], where: str) -> model_lib.ModelConfig:
    """The ModelConfig of a checkpoint written by `import_hf` or by a training run."""
    if meta.get("model_config"):
        return model_config_from_dict(meta["model_config"])
    try:
        vocab = int(meta["param_shapes"]["embed"][0])
        return model_lib.ModelConfig.from_config(meta["config"]["model"], vocab)
    except (KeyError, TypeError):
        raise ConvertError(
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
        values = _restore(ckpt_dir, step, stacked, None)
        host = {
            p: values[("blocks", *p[2:])][p[1]] if p[0] == "blocks" else values[p] for p in abstract
        }
        if shardings is None:
            return host
        return {
            p: jax.make_array_from_callback(x.shape, shardings[p], lambda i, x=x: x[i])
            for p, x in host.items()
        }
    return _restore(ckpt_dir, step, abstract, shardings)


def _restore(ckpt_dir, step, abstract, shardings):
    import orbax.checkpoint as ocp

    if shardings is None:
        args = {p: ocp.RestoreArgs(restore_type=np.ndarray) for p in abstract}
    else:
        args = {p: ocp.ArrayRestoreArgs(sharding=shardings[p]) for p in abstract}
    item = {"params": traverse_util.unflatten_dict(abstract)}
    restore = ocp.args.PyTreeRestore(
        item=item, partial_restore=True, restore_args={"params": traverse_util.unflatten_dict(args)}
    )
    restored = ocp.CheckpointManager(ckpt_dir).restore(step, args=ocp.args.Composite(state=restore))
    return traverse_util.flatten_dict(restored["state"]["params"])


# --------------------------------------------------------------------------- export


def export_hf(
    ckpt: str,
    out_dir: str,
    *,
    step: int | None = None,
    dtype: str = "float32",
    tokenizer: str = "",
    max_shard_bytes: int = 2 * 10**9,
    progress: bool = True,
) -> str:
    """Writes a jaxlm checkpoint as a Hugging Face Llama model directory; returns `out_dir`.

    Args:
      ckpt: a workdir, its `checkpoints/` folder, or one step folder.
      out_dir: the directory to write (created; old weight files in it are removed).
      step: which checkpoint (default: the newest, or the step folder given).
      dtype: float32 (exact) | bfloat16 | float16 for the safetensors weights.
      tokenizer: a tokenizer.json, sentencepiece .model or directory of tokenizer files; by
        default `<workdir>/tokenizer/`, `<workdir>/tokenizer.{json,model}`, then the
        checkpoint config's tokenizer.path. It must match the checkpoint's tokenizer hash.
      max_shard_bytes: the largest safetensors file; bigger models get shards and an index.
    """
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype={dtype!r} is not one of {', '.join(DTYPES)}.")
    ckpt_dir, step = resolve_checkpoint(ckpt, step)
    meta = ckpt_lib.read_step_meta(ckpt_dir, step)
    cfg = model_config_from_meta(meta, f"{ckpt_dir}/{step}")
    if cfg.d_model % cfg.n_heads:
        raise ConvertError(
            f"transformers requires hidden_size divisible by num_attention_heads, "
            f"and this model has d_model={cfg.d_model}, n_heads={cfg.n_heads}."
        )
    np_dtype = np.dtype(jax.numpy.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    special = _export_tokenizer(ckpt_dir, meta, tokenizer, out_dir, cfg)
    tensors = layout(cfg)
    shards = _group(tensors, np_dtype.itemsize, max_shard_bytes)
    for old in os.listdir(out_dir):  # stale shards of an earlier export would confuse loaders
        if old.endswith(".safetensors") or old == "model.safetensors.index.json":
            os.remove(os.path.join(out_dir, old))

    bar = Progress("export", sum(t.size for t in tensors) * np_dtype.itemsize, enabled=progress)
    weight_map, total = {}, 0
    stacked = {}  # a scanned model's checkpoint: its stacked arrays, read once, sliced per layer
    if cfg.scan_layers:
        abstract = {t.path: jax.ShapeDtypeStruct(t.shape, np.float32) for t in tensors}
        stacked = restore_params(ckpt_dir, step, abstract, stacked_layers=cfg.n_layers)
    for i, shard in enumerate(shards):
        file = (
            "model.safetensors"
            if len(shards) == 1
            else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        )
        with open(os.path.join(out_dir, file), "wb") as f:
            _write_header(f, shard, np_dtype)
            for piece in _group(shard, 4, RESTORE_BYTES):  # fp32 reads of bounded size
                abstract = {t.path: jax.ShapeDtypeStruct(t.shape, np.float32) for t in piece}
                values = (
                    {t.path: stacked.pop(t.path) for t in piece}
                    if stacked
                    else restore_params(ckpt_dir, step, abstract)
                )
                for t in piece:
                    data = to_hf(t, values.pop(t.path), np_dtype)
                    f.write(data.reshape(-1).view(np.uint8))  # no copy, any dtype
                    weight_map[t.hf_name], total = file, total + data.nbytes
                    bar.update(data.nbytes)
    bar.done()
    if len(shards) > 1:
        _write_json(
            os.path.join(out_dir, "model.safetensors.index.json"),
            {"metadata": {"total_size": total}, "weight_map": weight_map},
        )
    _write_json(os.path.join(out_dir, "config.json"), hf_config_from_model(cfg, dtype, special))
    generation = {k: v for k, v in special.items() if v is not None}
    _write_json(
        os.path.join(out_dir, "generation_config.json"), {"_from_model_config": True, **generation}
    )
    return out_dir


def _write_header(f: Any, tensors: list[Tensor], dtype: np.dtype) -> None:
    """The safetensors header: u64 length, then JSON naming each tensor's dtype, shape, bytes.

    Written by hand so the data can follow tensor by tensor: a whole shard is never in memory.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        end = offset + t.size * dtype.itemsize
        header[t.hf_name] = {
            "dtype": SAFETENSORS_DTYPES[dtype.name],
            "shape": list(t.hf_shape),
            "data_offsets": [offset, end],
        }
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    f.write(len(raw).to_bytes(8, "little") + raw)


def _group(tensors: list[Tensor], itemsize: int, max_bytes: int) -> list[list[Tensor]]:
    """Consecutive groups of at most `max_bytes` (a bigger tensor gets a group of its own)."""
    groups, size = [[]], 0
    for t in tensors:
        if groups[-1] and size + t.size * itemsize > max_bytes:
            groups, size = [*groups, []], 0
        groups[-1].append(t)
        size += t.size * itemsize
    return groups


def _export_tokenizer(
    ckpt_dir: str, meta: dict, tokenizer: str, out_dir: str, cfg: model_lib.ModelConfig
) -> dict[str, int | None]:
    """Finds the checkpoint's tokenizer and writes it to `out_dir`; returns config.json's ids."""
    os.makedirs(out_dir, exist_ok=True)
    workdir = os.path.dirname(ckpt_dir)
    config_path = ((meta.get("config") or {}).get("tokenizer") or {}).get("path") or ""
    candidates = (
        [tokenizer]
        if tokenizer
        else [
            os.path.join(workdir, "tokenizer"),
            os.path.join(workdir, "tokenizer.json"),
            os.path.join(workdir, "tokenizer.model"),
            os.path.expanduser(config_path),
        ]
    )
    source = next((c for c in candidates if c and os.path.exists(c)), "")
    if not source:
        if tokenizer:
            raise ConvertError(f"--tokenizer={tokenizer} does not exist.")
        print(
            "export: no tokenizer found (pass --tokenizer); writing the weights only.",
            file=sys.stderr,
        )
        hf_meta = meta.get("hf_config") or {}
        return {k: hf_meta.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    file = find_tokenizer(source) if os.path.isdir(source) else source
    if not file:
        raise ConvertError(f"{source} holds neither tokenizer.json nor tokenizer.model.")
    want, have = meta.get("tokenizer_sha256"), file_sha256(file)
    if want and have != want:
        raise ConvertError(
            f"tokenizer {file} (sha256 {have[:12]}) is not the one this checkpoint "
            f"was trained with ({want[:12]}); pass that one with --tokenizer."
        )
    if hf_tokenizer.load_any(file).vocab_size > cfg.vocab_size:
        raise ConvertError(
            f"tokenizer {file} has more ids than the model's {cfg.vocab_size} "
            "embeddings; pass the tokenizer it was trained with."
        )
    return hf_tokenizer.write_for_transformers(source, out_dir, cfg.max_seq_len)


# --------------------------------------------------------------------------- progress


class Progress:
    """A progress bar on stderr: redrawn in place on a terminal, one line at the end otherwise."""

    def __init__(self, label: str, total_bytes: int, enabled: bool = True):
        self.label, self.total, self.enabled = label, max(total_bytes, 1), enabled
        self.bytes, self.start, self.last = 0, time.perf_counter(), 0.0
        self.tty = sys.stderr.isatty()

    def line(self) -> str:
        frac = self.bytes / self.total
        return (
            f"  {self.label} [{'#' * int(30 * frac):<30}] {frac:4.0%} {self.bytes / 1e9:.2f}/"
            f"{self.total / 1e9:.2f} GB {time.perf_counter() - self.start:.1f} s"
        )

    def update(self, nbytes: int) -> None:
        self.bytes += nbytes
        if self.enabled and self.tty and time.perf_counter() - self.last > 0.1:
            self.last = time.perf_counter()
            print("\r" + self.line(), end="", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.enabled:
            print(("\r" if self.tty else "") + self.line(), file=sys.stderr, flush=True)
            self.enabled = False

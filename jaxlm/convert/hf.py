"""Hugging Face safetensors <-> jaxlm checkpoints, for the families of `jaxlm/families.py`
(Llama, Qwen2/2.5, Qwen3, Mistral, OLMo-2, Gemma-3 text; Qwen3-MoE, OLMoE, Mixtral).

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
  q/k/v_proj.bias (N*E,) <-> bq, bk, bv (N, E);  OLMo-2's q_norm/k_norm (N*E,) <-> (N, E)
  MoE (`families_moe.sparse_mlp_tensors`): gate (X, D) <-> w_router (D, X); one tensor per
  expert, experts.<e>.gate/up_proj (F, D), down_proj (D, F) <-> slice e of w_gate/w_up (X, D, F),
  w_down (X, F, D)
Block norms are named by place (`block_tensors`). RoPE needs no permutation: jaxlm uses
transformers' "rotate half" layout.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx, traverse_util

from jaxlm import checkpoint as ckpt_lib
from jaxlm import families, families_moe, storage
from jaxlm import model as model_lib
from jaxlm.data import hf_tokenizer
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.data.files import file_sha256
from jaxlm.data.hf_tokenizer import find_tokenizer
from jaxlm.errors import ConvertError
from jaxlm.progress import Progress

DTYPES = ("float32", "bfloat16", "float16")
SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # a buffer old checkpoints saved; recomputed here
RESTORE_BYTES = 256 * 2**20  # export reads the checkpoint in pieces of about this size


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


# --------------------------------------------------------------------------- parameter layout


def block_tensors(
    cfg: model_lib.ModelConfig, sparse: bool = False
) -> list[tuple[tuple[str, ...], str, str]]:
    """(path in a block, name after 'model.layers.<i>.', how HF lays it out) for `cfg`'s block
    (a `sparse` one has the MoE block's tensors in place of the MLP's).

    transformers names a block's norms by their place: a pre-norm model's second norm is
    `post_attention_layernorm` (before the MLP); OLMo-2 and Gemma use that name for the norm
    on the attention's output.
    """
    attn = [
        (("attn", "wq"), "self_attn.q_proj.weight", "in_heads"),
        (("attn", "wk"), "self_attn.k_proj.weight", "in_heads"),
        (("attn", "wv"), "self_attn.v_proj.weight", "in_heads"),
    ]
    if cfg.qkv_bias:
        attn += [((("attn", f"b{x}")), f"self_attn.{x}_proj.bias", "flat") for x in "qkv"]
    if cfg.qk_norm != "none":  # a per-head norm is (E,) in both; a full-width one (N*E,) in HF
        kind = "same" if cfg.qk_norm == "head" else "flat"
        attn += [(("attn", f"{x}_norm", "scale"), f"self_attn.{x}_norm.weight", kind) for x in "qk"]
    attn.append((("attn", "wo"), "self_attn.o_proj.weight", "out_heads"))
    mlp = [
        (("mlp", "w_gate"), "mlp.gate_proj.weight", "linear"),
        (("mlp", "w_up"), "mlp.up_proj.weight", "linear"),
        (("mlp", "w_down"), "mlp.down_proj.weight", "linear"),
    ]
    if sparse:
        mlp = families_moe.sparse_mlp_tensors(cfg)
    norm = lambda path, name: ((path, "scale"), f"{name}.weight", "same")  # noqa: E731
    if cfg.norm_placement == "pre":
        return [
            norm("attn_norm", "input_layernorm"),
            *attn,
            norm("mlp_norm", "post_attention_layernorm"),
            *mlp,
        ]
    if cfg.norm_placement == "post":
        return [
            *attn,
            norm("attn_post_norm", "post_attention_layernorm"),
            *mlp,
            norm("mlp_post_norm", "post_feedforward_layernorm"),
        ]
    return [
        norm("attn_norm", "input_layernorm"),
        *attn,
        norm("attn_post_norm", "post_attention_layernorm"),
        norm("mlp_norm", "pre_feedforward_layernorm"),
        *mlp,
        norm("mlp_post_norm", "post_feedforward_layernorm"),
    ]


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One parameter: its jaxlm key path and shape, its HF name, and how it is reshaped.

    An MoE expert stack (`experts` = X > 0) is X HF tensors, `hf_name` with '{e}' formatted to
    0 .. X-1, each the layout `kind` of one slice along jaxlm's leading expert axis.
    """

    path: tuple  # key path in the jaxlm pure dict, e.g. ('blocks', 0, 'attn', 'wq')
    hf_name: str
    kind: str  # same | linear (transposed) | in_heads | out_heads | flat (N*E) <-> (N, E)
    shape: tuple[int, ...]  # jaxlm shape
    experts: int = 0  # X: one HF tensor per expert; 0: one HF tensor

    @property
    def hf_names(self) -> list[str]:
        """The HF tensors this parameter is: one, or one per expert in expert order."""
        if not self.experts:
            return [self.hf_name]
        return [self.hf_name.format(e=e) for e in range(self.experts)]

    @property
    def part_shape(self) -> tuple[int, ...]:
        """The jaxlm shape of what one HF tensor holds (an expert's slice, or the whole)."""
        return self.shape[1:] if self.experts else self.shape

    @property
    def hf_shape(self) -> tuple[int, ...]:
        """The shape of each of `hf_names`."""
        s = self.part_shape
        if self.kind == "in_heads":
            return (s[1] * s[2], s[0])  # (D, N, E) -> (N*E, D)
        if self.kind == "out_heads":
            return (s[2], s[0] * s[1])  # (H, E, D) -> (D, H*E)
        if self.kind == "flat":
            return (math.prod(s),)  # (N, E) -> (N*E,)
        return s[::-1] if self.kind == "linear" else s

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def layout(cfg: model_lib.ModelConfig) -> list[Tensor]:
    """Every parameter of `cfg`'s model, in Hugging Face's order, one tensor per layer (paths
    ('blocks', i, ...)) also for a `scan_layers` model, whose checkpoints stack them."""
    per_layer = dataclasses.replace(cfg, scan_layers=False, mtp_heads=0)  # export drops them
    pure = nnx.to_pure_dict(nnx.state(model_lib.abstract(per_layer)))
    shape = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(pure).items()}
    out = [Tensor(("embed",), "model.embed_tokens.weight", "same", shape[("embed",)])]
    for i in range(cfg.n_layers):
        for tail, name, kind in block_tensors(cfg, cfg.is_sparse(i)):
            path = ("blocks", i, *tail)
            experts = shape[path][0] if "{e}" in name else 0
            out.append(Tensor(path, f"model.layers.{i}.{name}", kind, shape[path], experts))
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
    if t.kind == "flat":
        w = w.reshape(t.part_shape)
    elif t.kind != "same":
        w = w.T.reshape(t.part_shape)  # (out, in) -> (in, out), then split the head axis
    return np.ascontiguousarray(w)


def to_hf(t: Tensor, x: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
    """A jaxlm parameter (or one expert's slice of it) in Hugging Face's layout and `dtype`,
    C-contiguous."""
    x = np.asarray(x)
    if t.kind == "in_heads":
        x = x.reshape(t.shape[0], -1).T  # (D, N, E) -> (N*E, D)
    elif t.kind == "out_heads":
        x = x.reshape(-1, t.shape[-1]).T  # (H, E, D) -> (D, H*E)
    elif t.kind == "linear":
        x = x.T
    elif t.kind == "flat":
        x = x.reshape(-1)
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
        names[t] = [n.removeprefix("model.") if bare else n for n in t.hf_names]
        for name in names[t]:
            if name not in reader.file:
                raise ConvertError(
                    f"{hf_dir}: tensor {name} is missing from the safetensors files."
                )
            if reader.shape[name] != t.hf_shape:
                raise ConvertError(
                    f"{hf_dir}: tensor {name} has shape {reader.shape[name]} but "
                    f"config.json implies {t.hf_shape}."
                )
    extra = sorted(
        n
        for n in set(reader.file) - {n for parts in names.values() for n in parts}
        if not n.endswith(IGNORED_SUFFIXES) and n != "lm_head.weight"
    )
    if extra:  # (a tied model may still carry a copy of lm_head.weight: ignored)
        raise ConvertError(
            f"{hf_dir}: tensor {extra[0]} (and {len(extra) - 1} more) has no place "
            "in this model; the checkpoint is of another architecture."
        )
    nbytes = sum(t.size for t in tensors) * 4
    bar = Progress("import", nbytes, "GB", scale=1e9, enabled=progress)
    for t in tensors:
        parts = [to_jaxlm(t, reader.get(name)) for name in names[t]]
        w = np.stack(parts) if t.experts else parts[0]  # experts stacked on jaxlm's first axis
        del parts  # not alive across the yield: one copy of the tensor, not two
        bar.update(w.nbytes)
        yield t, w
    bar.finish()


# --------------------------------------------------------------------------- import


def import_hf(hf_dir: str, workdir: str, progress: bool = True) -> model_lib.ModelConfig:
    """Converts a Hugging Face model directory into a jaxlm checkpoint in `workdir`.

    Writes `workdir/checkpoints/0/` (state = {'params'} only; `init_from.load_params` reads it),
    `workdir/model_config.json` and `workdir/tokenizer/` (the model's tokenizer files).
    Returns the model's ModelConfig. Either may be a bucket (jaxlm.storage): a bucket model is
    downloaded first, a bucket workdir is written through its local copy, then pushed.
    """
    if storage.is_remote(hf_dir) or storage.is_remote(workdir):
        if storage.is_remote(hf_dir):
            local = storage.local_copy_dir("hf", hf_dir)
            storage.fetch_dir(hf_dir, local, marker="")
            hf_dir = local
        mirror = storage.WorkdirMirror(workdir)
        mirror.pull()
        cfg = import_hf(hf_dir, mirror.local, progress)
        mirror.push()
        return cfg
    hf = read_hf_config(hf_dir)
    cfg = model_lib.ModelConfig.from_hf(hf, os.path.join(hf_dir, "config.json"))
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
    checkpointer = ckpt_lib.Checkpointer(ckpt_dir, keep=None, keep_every=0, async_save=False)
    checkpointer.save(0, {"params": params}, None, meta, force=True)
    checkpointer.close()
    _write_json(os.path.join(workdir, "model_config.json"), dataclasses.asdict(cfg))
    return cfg


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


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
    """Writes a jaxlm checkpoint as a Hugging Face model directory of its family
    (`families.family_for`); returns `out_dir`.

    Args:
      ckpt: a workdir, its `checkpoints/` folder, or one step folder.
      out_dir: the directory to write (created; old weight files in it are removed).
      step: which checkpoint (default: the newest, or the step folder given).
      dtype: float32 (exact) | bfloat16 | float16 for the safetensors weights.
      tokenizer: a tokenizer.json, sentencepiece .model or directory of tokenizer files; by
        default `<workdir>/tokenizer/`, `<workdir>/tokenizer.{json,model}`, then the
        checkpoint config's tokenizer.path. It must match the checkpoint's tokenizer hash.
      max_shard_bytes: the largest safetensors file; bigger models get shards and an index.

    A bucket workdir is read through its local copy; a bucket `out_dir` is written locally,
    then published with its marker object last (jaxlm.storage).
    """
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype={dtype!r} is not one of {', '.join(DTYPES)}.")
    if storage.is_remote(ckpt) or storage.is_remote(out_dir):
        mirror = storage.WorkdirMirror(ckpt, "reads")
        mirror.pull()
        remote_out = storage.is_remote(out_dir)
        local_out = storage.local_copy_dir("exports", out_dir) if remote_out else out_dir
        options = dict(dtype=dtype, tokenizer=tokenizer, max_shard_bytes=max_shard_bytes)
        export_hf(mirror.local, local_out, step=step, progress=progress, **options)
        if remote_out:
            storage.publish_dir(local_out, out_dir)
        return out_dir
    ckpt_dir, step = ckpt_lib.resolve(ckpt, step)
    meta = ckpt_lib.read_step_meta(ckpt_dir, step)
    cfg = ckpt_lib.model_config_from_meta(meta, f"{ckpt_dir}/{step}")
    if cfg.d_model % cfg.n_heads:
        raise ConvertError(
            f"transformers requires hidden_size divisible by num_attention_heads, "
            f"and this model has d_model={cfg.d_model}, n_heads={cfg.n_heads}."
        )
    cfg.to_hf(dtype)  # a model no Hugging Face family expresses is refused before any work
    if cfg.moe is not None:  # the family names the expert tensors (Mixtral's differ)
        cfg = dataclasses.replace(cfg, family=families.family_for(cfg))
    np_dtype = np.dtype(jax.numpy.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    generation_path = os.path.join(out_dir, "generation_config.json")
    if os.path.isfile(generation_path):  # an earlier export's: the tokenizer files may bring one
        os.remove(generation_path)
    special = _export_tokenizer(ckpt_dir, meta, tokenizer, out_dir, cfg)
    tensors = layout(cfg)
    shards = _group(tensors, np_dtype.itemsize, max_shard_bytes)
    for old in os.listdir(out_dir):  # stale shards of an earlier export would confuse loaders
        if old.endswith(".safetensors") or old == "model.safetensors.index.json":
            os.remove(os.path.join(out_dir, old))

    nbytes = sum(t.size for t in tensors) * np_dtype.itemsize
    bar = Progress("export", nbytes, "GB", scale=1e9, enabled=progress)
    weight_map, total = {}, 0
    stacked = {}  # a scanned model's checkpoint: its stacked arrays, read once, sliced per layer
    if cfg.scan_layers:
        abstract = {t.path: jax.ShapeDtypeStruct(t.shape, np.float32) for t in tensors}
        stacked = ckpt_lib.restore_params(ckpt_dir, step, abstract, stacked_layers=cfg.n_layers)
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
                    else ckpt_lib.restore_params(ckpt_dir, step, abstract)
                )
                for t in piece:
                    value = values.pop(t.path)
                    for e, name in enumerate(t.hf_names):
                        data = to_hf(t, value[e] if t.experts else value, np_dtype)
                        f.write(data.reshape(-1).view(np.uint8))  # no copy, any dtype
                        weight_map[name], total = file, total + data.nbytes
                        bar.update(data.nbytes)
    bar.finish()
    if len(shards) > 1:
        _write_json(
            os.path.join(out_dir, "model.safetensors.index.json"),
            {"metadata": {"total_size": total}, "weight_map": weight_map},
        )
    _write_json(os.path.join(out_dir, "config.json"), cfg.to_hf(dtype, special))
    if not os.path.isfile(generation_path):  # the source model's own is kept as it was
        generation = {k: v for k, v in special.items() if v is not None}
        _write_json(generation_path, {"_from_model_config": True, **generation})
    return out_dir


def _write_header(f: Any, tensors: list[Tensor], dtype: np.dtype) -> None:
    """The safetensors header: u64 length, then JSON naming each tensor's dtype, shape, bytes.

    Written by hand so the data can follow tensor by tensor: a whole shard is never in memory.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        for name in t.hf_names:
            end = offset + math.prod(t.hf_shape) * dtype.itemsize
            header[name] = {
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
    tokenizer_lib.check_same(
        file_sha256(file),
        meta.get("tokenizer_sha256"),
        file,
        "this checkpoint was trained with",
        "pass that one with --tokenizer",
    )
    if tokenizer_lib.load(file).vocab_size > cfg.vocab_size:
        raise ConvertError(
            f"tokenizer {file} has more ids than the model's {cfg.vocab_size} "
            "embeddings; pass the tokenizer it was trained with."
        )
    return hf_tokenizer.write_for_transformers(source, out_dir, cfg.max_seq_len)

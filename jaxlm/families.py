"""The Hugging Face model families jaxlm imports and exports, as `ModelConfig` switches.

Each family is one transformers architecture whose math is jaxlm's block with some switches set
(`FIXED`) and, for a few, some left to the checkpoint (sliding windows, soft-caps, ...).
`fields_from_hf` reads a `config.json` into ModelConfig fields; `hf_config` writes one back.
Anything a family's config can say that jaxlm does not implement is refused in one sentence
that names the field. The mixture-of-experts families' `model.moe` part is `families_moe.py`'s.
"""

from __future__ import annotations

from typing import Any

from jaxlm import families_moe
from jaxlm import rope as rope_lib
from jaxlm.errors import ConvertError

# family -> (transformers class, config.json model_type)
FAMILIES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "olmo2": ("Olmo2ForCausalLM", "olmo2"),
    "gemma2": ("Gemma2ForCausalLM", "gemma2"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
}
FAMILIES |= families_moe.FAMILIES  # mixtures of experts: Qwen3-MoE, OLMoE, Mixtral
NAMES = "Llama, Qwen2/2.5, Qwen3, Mistral, OLMo-2, Gemma-2, Gemma-3 (text), " + families_moe.NAMES
GEMMAS = ("gemma2", "gemma3")

# The switches each architecture hard-wires; every other switch is off, except those in FREE.
_LLAMA = {
    "qkv_bias": False,
    "qk_norm": "none",
    "norm_placement": "pre",
    "norm_plus_one": False,
    "embed_scale": False,
    "mlp_act": "silu",
}
FIXED = {
    "llama": _LLAMA,
    "qwen2": dict(_LLAMA, qkv_bias=True),
    "qwen3": dict(_LLAMA, qk_norm="head"),
    "mistral": _LLAMA,
    "olmo2": dict(_LLAMA, qk_norm="full", norm_placement="post"),
    "gemma2": {
        "qkv_bias": False,
        "qk_norm": "none",
        "norm_placement": "both",
        "norm_plus_one": True,
        "embed_scale": True,
        "mlp_act": "gelu_tanh",
    },
}
FIXED["gemma3"] = dict(FIXED["gemma2"], qk_norm="head")
FIXED |= {"qwen3_moe": FIXED["qwen3"], "olmoe": dict(_LLAMA, qk_norm="full"), "mixtral": _LLAMA}
# Switches a family's config.json sets per checkpoint (all others must be off to export).
# transformers' Gemma-3 reads attn_logit_softcapping but never applies it (QK-norm replaced it).
_WINDOWS = ("sliding_window", "global_every")
_GEMMA = (*_WINDOWS, "final_softcap", "query_scale_dim")
FREE = {
    "llama": (),
    "qwen2": _WINDOWS,
    "qwen3": _WINDOWS,
    "mistral": ("sliding_window",),  # on every layer
    "olmo2": (),
    "gemma2": (*_GEMMA, "attn_softcap"),
    "gemma3": (*_GEMMA, "rope_local_theta"),
    "qwen3_moe": ("sliding_window",),  # on every layer
    "olmoe": (),
    "mixtral": ("sliding_window",),
}
OFF = {"sliding_window": 0, "attn_softcap": 0.0, "final_softcap": 0.0, "query_scale_dim": 0}
OFF |= {"rope_local_theta": 0.0, "global_every": 0}
OFF |= {"value_embeds": 0}  # (mtp_heads: exported without them, they only train the trunk)
TIED_BY_DEFAULT = GEMMAS  # transformers' default tie_word_embeddings when config.json omits it


def family_of(hf: dict[str, Any], where: str) -> str:
    """The family of a `config.json`, or a one-sentence refusal naming its architecture."""
    arch, model_type = hf.get("architectures") or [], hf.get("model_type")
    for family, (cls, mtype) in FAMILIES.items():
        if model_type == mtype and all(a == cls for a in arch):
            return family
    raise ConvertError(
        f"{where} has architectures={arch} (model_type {model_type!r}); only {NAMES} causal "
        f"LMs ({', '.join(cls for cls, _ in FAMILIES.values())}) import."
    )


def fields_from_hf(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """ModelConfig fields (all but vocab-independent run choices) of a transformers config.

    Raises:
      ConvertError: another architecture, or an option jaxlm does not implement (named).
    """
    family = family_of(hf, where)
    if hf.get("quantization_config"):
        raise ConvertError(f"{where}: quantization_config is set; import an unquantized model.")
    act_key = "hidden_activation" if family in GEMMAS else "hidden_act"
    act = hf.get(act_key) or ("gelu_pytorch_tanh" if family in GEMMAS else "silu")
    wanted = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}[FIXED[family]["mlp_act"]]
    if act != wanted:
        raise ConvertError(f"{where}: {act_key}={act!r} is unsupported (only {wanted}).")
    if family != "qwen2" and hf.get("attention_bias"):  # the others' flag also biases o_proj
        raise ConvertError(
            f"{where}: attention_bias=true is not supported for {family} (jaxlm has biases "
            "on q, k and v only, as Qwen2 does)."
        )
    if hf.get("mlp_bias"):
        raise ConvertError(f"{where}: mlp_bias=true is not supported (jaxlm's MLP has no biases).")
    if hf.get("use_bidirectional_attention"):
        raise ConvertError(f"{where}: use_bidirectional_attention=true is not supported.")
    try:
        d_model, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        n_layers = int(hf["num_hidden_layers"])
        fields = dict(
            FIXED[family],
            family="" if family == "llama" else family,  # "": no switch set, which is Llama
            vocab_size=int(hf["vocab_size"]),
            d_model=d_model,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            head_dim=int(hf.get("head_dim") or d_model // n_heads),
            d_ff=int(hf["intermediate_size"]),
            max_seq_len=int(hf.get("max_position_embeddings", 2048)),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", family in TIED_BY_DEFAULT)),
            init_std=float(hf.get("initializer_range", 0.02)),
        )
    except KeyError as e:
        raise ConvertError(
            f"{where} lacks the field {e.args[0]!r} a {family} config needs."
        ) from None
    fields.update(_rope_fields(hf, family, where))
    if family in families_moe.FAMILIES:
        fields.update(families_moe.fields_from_hf(hf, family, n_layers, where))
    else:
        fields.update(_window_fields(hf, family, n_layers, where))
    if family in GEMMAS:
        fields["query_scale_dim"] = int(hf.get("query_pre_attn_scalar", 256))
        fields["final_softcap"] = float(hf.get("final_logit_softcapping") or 0.0)
    if family == "gemma2":
        fields["attn_softcap"] = float(hf.get("attn_logit_softcapping") or 0.0)
    return fields


def _rope_fields(hf: dict[str, Any], family: str, where: str) -> dict[str, Any]:
    """rope_theta, rope_scaling and (Gemma-3) rope_local_theta, from either config format."""
    params = hf.get("rope_parameters") or {}
    if family == "gemma3":
        # transformers 5: rope_parameters per layer type; 4: rope_theta, rope_local_base_freq.
        per_type = params if "full_attention" in params else {}
        local = per_type.get("sliding_attention") or {}
        if local.get("rope_type", "default") != "default":
            raise ConvertError(
                f"{where}: rope_parameters.sliding_attention.rope_type="
                f"{local['rope_type']!r} is not supported (only default)."
            )
        full = dict(per_type.get("full_attention") or {})
        full.setdefault("rope_theta", hf.get("rope_theta", 1_000_000.0))
        theta, scaling = hf_rope({"rope_parameters": full, **_scaling_only(hf)}, where)
        local_theta = local.get("rope_theta", hf.get("rope_local_base_freq", 10_000.0))
        return {"rope_theta": theta, "rope_scaling": scaling, "rope_local_theta": local_theta}
    theta, scaling = hf_rope(hf, where)
    return {"rope_theta": theta, "rope_scaling": scaling}


def _scaling_only(hf: dict[str, Any]) -> dict[str, Any]:
    return {"rope_scaling": hf["rope_scaling"]} if hf.get("rope_scaling") else {}


def hf_rope(hf: dict[str, Any], where: str) -> tuple[float, tuple | None]:
    """(rope_theta, rope_scaling or None: Llama 3, linear or YaRN, `rope.scaling_from_hf`) from
    either transformers config format."""
    # transformers < 5 writes rope_theta + rope_scaling; 5 writes rope_parameters.
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    params = hf.get(key) or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise ConvertError(f"{where}: a per-layer {key} is not supported (one RoPE for all).")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ConvertError(f"{where}: partial_rotary_factor={partial} is not supported (only 1).")
    return theta, rope_lib.scaling_from_hf(
        params, hf.get("max_position_embeddings"), where + ": " + key
    )


def _window_fields(hf: dict[str, Any], family: str, n_layers: int, where: str) -> dict[str, int]:
    """sliding_window and global_every from the config's per-layer attention types."""
    window = int(hf.get("sliding_window") or 0)
    if family == "mistral":  # every layer, when set
        return {"sliding_window": window, "global_every": 0}
    # Qwen configs carry a sliding_window that is used only with use_sliding_window=true.
    qwen_off = family in ("qwen2", "qwen3") and not hf.get("use_sliding_window")
    if family in ("llama", "olmo2") or not window or qwen_off:
        return {"sliding_window": 0, "global_every": 0}
    types = hf.get("layer_types")
    if types is None and family in GEMMAS:
        every = int(hf.get("sliding_window_pattern", 6 if family == "gemma3" else 2))
        types = ["full" if (i + 1) % every == 0 else "sliding" for i in range(n_layers)]
    elif types is None:  # Qwen: sliding from layer max_window_layers on
        first = int(hf.get("max_window_layers", n_layers))
        types = ["sliding" if i >= first else "full" for i in range(n_layers)]
    local = [t.startswith("sliding") for t in types]
    if len(local) != n_layers:
        raise ConvertError(f"{where}: layer_types has {len(local)} entries for {n_layers} layers.")
    if not any(local):
        return {"sliding_window": 0, "global_every": 0}
    if all(local):
        return {"sliding_window": window, "global_every": 0}
    every = local.index(False) + 1
    if local != [(i + 1) % every != 0 for i in range(n_layers)]:
        raise ConvertError(
            f"{where}: layer_types={types} is not a pattern jaxlm has (every Nth layer global, "
            "the others sliding)."
        )
    return {"sliding_window": window, "global_every": every}


def family_for(cfg: Any) -> str:
    """The family a model exports as: its own, or the first whose switches it has."""
    if cfg.family:
        return cfg.family
    for family in FAMILIES:  # an MoE model only as an MoE family, a dense one only as dense
        same_kind = (family in families_moe.FAMILIES) == (cfg.moe is not None)
        if same_kind and not _unexpressed(cfg, family):
            return family
    fixed = sorted(k for k, v in _switches(cfg).items() if v != _LLAMA.get(k, OFF.get(k)))
    raise ConvertError(
        f"no Hugging Face family has this model's switches ({', '.join(fixed) or 'model.moe'}); "
        f"set model.family to one of {', '.join(FAMILIES)} to see which differs."
    )


def _switches(cfg: Any) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in (*_LLAMA, *OFF)}


def _unexpressed(cfg: Any, family: str) -> list[str]:
    """The switches of `cfg` that `family`'s transformers architecture cannot express."""
    bad = [k for k, v in FIXED[family].items() if getattr(cfg, k) != v]
    bad += [k for k, v in OFF.items() if k not in FREE[family] and getattr(cfg, k) != v]
    if cfg.moe is not None and family in families_moe.FAMILIES:
        bad += families_moe.unexpressed(cfg, family)
    return bad


def hf_config(cfg: Any, dtype: str, special_ids: dict[str, int | None] | None) -> dict[str, Any]:
    """A `config.json` for `cfg`'s family (read by transformers 4.43+ and 5).

    Raises:
      ConvertError: a switch the family's architecture does not have (named).
    """
    family = family_for(cfg)
    sparse = family in families_moe.FAMILIES
    if (cfg.moe is not None) != sparse:
        wanted = ", ".join(families_moe.FAMILIES) if cfg.moe else "a dense family"
        raise ConvertError(
            f"model.moe.n_experts={cfg.moe.n_experts if cfg.moe else 0} cannot be exported as "
            f"{FAMILIES[family][0]}, which is {'an MoE' if sparse else 'a dense'} model; set "
            f"model.family to {wanted}."
        )
    bad = _unexpressed(cfg, family)
    if bad:
        value = cfg.moe if bad[0].startswith("moe.") else cfg
        raise ConvertError(
            f"model.{bad[0]}={getattr(value, bad[0].removeprefix('moe.'))!r} cannot be exported "
            f"as {FAMILIES[family][0]}, which does not have that switch."
        )
    scaling = rope_lib.scaling_to_hf(cfg.rope_scaling)
    ids = special_ids or {}
    out = {
        "architectures": [FAMILIES[family][0]],
        "model_type": FAMILIES[family][1],
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
        "attention_dropout": 0.0,
        "use_cache": True,
        **{k: ids.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
        "torch_dtype": dtype,
        "dtype": dtype,  # transformers 4 reads torch_dtype, 5 dtype
    }
    local = cfg.layer_windows()
    types = ["sliding_attention" if w else "full_attention" for w in local]
    if family == "llama":
        out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif family in ("qwen2", "qwen3"):
        out.update(
            use_sliding_window=bool(cfg.sliding_window),
            sliding_window=cfg.sliding_window or None,
            max_window_layers=cfg.n_layers,
            layer_types=types,
        )
        if family == "qwen3":
            out["attention_bias"] = False
    elif family == "mistral":
        out["sliding_window"] = cfg.sliding_window or None
    elif sparse:
        out.update(families_moe.hf_fields(cfg, family))
    elif family == "olmo2":
        out["attention_bias"] = False
    else:  # gemma2, gemma3
        del out["hidden_act"]
        out.update(
            hidden_activation="gelu_pytorch_tanh",
            attention_bias=False,
            query_pre_attn_scalar=cfg.query_scale_dim or cfg.head_dim,
            # transformers builds a Gemma's windowed mask even when no layer uses it
            sliding_window=cfg.sliding_window or cfg.max_seq_len,
            layer_types=types,
            attn_logit_softcapping=cfg.attn_softcap or None,
            final_logit_softcapping=cfg.final_softcap or None,
        )
        if family == "gemma3":
            out["rope_local_base_freq"] = cfg.rope_local_theta or cfg.rope_theta
            out["use_bidirectional_attention"] = False
    return out

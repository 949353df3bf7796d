"""The mixture-of-experts Hugging Face families: Qwen3-MoE, OLMoE and Mixtral.

Each is a dense family's block (`families.FIXED`) whose feed-forward is `moe.MoEBlock` in the
sparse layers. What all three route the same way jaxlm does: router logits in fp32, softmax
over the experts, the top k of those probabilities, optionally divided by their sum
(`norm_topk_prob`; Mixtral always), no shared experts, no selection bias. `fields_from_hf` reads
the MoE part of a `config.json` into `model.moe` (and the window those families set), and
`hf_fields` writes it back; `unexpressed` lists the `model.moe` settings a family cannot say.

- Qwen3-MoE: Qwen3's attention (per-head QK-norm); layer i is sparse unless it is in
  `mlp_only_layers` or (i + 1) is not a multiple of `decoder_sparse_step`; the dense layers'
  MLP is `intermediate_size` wide, each expert `moe_intermediate_size`; `use_sliding_window`
  windows every layer.
- OLMoE: Llama's block with OLMo-2's full-width QK-norm (q_norm over hidden_size, so the
  heads must tile it); every layer sparse, experts `intermediate_size` wide; `clip_qkv` refused.
- Mixtral: Llama's block; every layer sparse, experts `intermediate_size` wide, top-k always
  renormalised; `sliding_window` on every layer; `router_jitter_noise` refused.

transformers' load-balance loss takes the token fractions and mean probabilities over all
layers at once; jaxlm averages the per-layer Switch loss. `router_aux_loss_coef` is imported as
`model.moe.aux_loss_coef` all the same: the two agree at balance and weight the same thing.
"""

from __future__ import annotations

from typing import Any

from jaxlm.errors import ConvertError

# family -> (transformers class, config.json model_type)
FAMILIES = {
    "qwen3_moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
    "olmoe": ("OlmoeForCausalLM", "olmoe"),
    "mixtral": ("MixtralForCausalLM", "mixtral"),
}
NAMES = "Qwen3-MoE, OLMoE and Mixtral"
# The config.json key holding the number of routed experts (transformers maps the other name
# to it; older configs may use either).
_N_EXPERTS_KEYS = ("num_experts", "num_local_experts")


def fields_from_hf(hf: dict[str, Any], family: str, n_layers: int, where: str) -> dict[str, Any]:
    """The `model.moe` section and window fields of an MoE family's `config.json`.

    Raises:
      ConvertError: a routing or layer option jaxlm does not implement (the field named).
    """
    n_experts = next((int(hf[k]) for k in _N_EXPERTS_KEYS if hf.get(k) is not None), None)
    if n_experts is None:
        raise ConvertError(f"{where} lacks the field 'num_experts' a {family} config needs.")
    if n_experts < 1:
        raise ConvertError(
            f"{where}: num_experts={n_experts} leaves no sparse layer; import it as the dense "
            "family it is."
        )
    try:
        top_k = int(hf["num_experts_per_tok"])
    except KeyError:
        raise ConvertError(
            f"{where} lacks the field 'num_experts_per_tok' a {family} config needs."
        ) from None
    if family == "olmoe" and hf.get("clip_qkv") is not None:
        raise ConvertError(f"{where}: clip_qkv={hf['clip_qkv']} is not supported (no clipping).")
    if family == "mixtral" and float(hf.get("router_jitter_noise") or 0.0):
        raise ConvertError(
            f"{where}: router_jitter_noise={hf['router_jitter_noise']} is not supported "
            "(jaxlm's router has no jitter)."
        )
    if family == "olmoe" and _head_width(hf) != int(hf["hidden_size"]):
        raise ConvertError(
            f"{where}: num_attention_heads times head_dim ({_head_width(hf)}) is not "
            f"hidden_size={hf['hidden_size']}, the width of OLMoE's q_norm."
        )
    expert_key = "moe_intermediate_size" if family == "qwen3_moe" else "intermediate_size"
    first_dense, every = _sparse_pattern(hf, family, n_layers, where)
    moe = {
        "n_experts": n_experts,
        "top_k": top_k,
        "expert_d_ff": int(hf.get(expert_key) or hf["intermediate_size"]),
        "router": "softmax",
        "normalize_top_k": family == "mixtral" or bool(hf.get("norm_topk_prob", False)),
        "aux_loss_coef": float(hf.get("router_aux_loss_coef", 0.0)),
        "first_dense_layers": first_dense,
        "every": every,
    }
    window = int(hf.get("sliding_window") or 0)
    if family == "olmoe" or (family == "qwen3_moe" and not hf.get("use_sliding_window")):
        window = 0
    return {"moe": moe, "sliding_window": window, "global_every": 0}


def _head_width(hf: dict[str, Any]) -> int:
    """The width of a config's queries: heads x head_dim (default hidden_size // heads)."""
    heads = int(hf["num_attention_heads"])
    return heads * int(hf.get("head_dim") or int(hf["hidden_size"]) // heads)


def _sparse_pattern(hf: dict[str, Any], family: str, n_layers: int, where: str) -> tuple[int, int]:
    """(first_dense_layers, every) giving Qwen3-MoE's sparse layers (all, for the others)."""
    if family != "qwen3_moe":
        return 0, 1
    step = int(hf.get("decoder_sparse_step") or 1)
    dense = set(hf.get("mlp_only_layers") or ())
    sparse = [i not in dense and (i + 1) % step == 0 for i in range(n_layers)]
    if not any(sparse):
        raise ConvertError(
            f"{where}: decoder_sparse_step={step} and mlp_only_layers={sorted(dense)} leave no "
            "sparse layer; import it as the dense Qwen3 it is."
        )
    # jaxlm's first sparse layer is first + every - 1: the smallest `every` that gives the pattern
    for every in range(1, sparse.index(True) + 2):
        first = sparse.index(True) - every + 1
        if sparse == [i >= first and (i - first + 1) % every == 0 for i in range(n_layers)]:
            return first, every
    raise ConvertError(
        f"{where}: decoder_sparse_step={step} with mlp_only_layers={sorted(dense)} is not "
        "a pattern jaxlm has (the first n layers dense, then every k-th layer sparse)."
    )


def unexpressed(cfg: Any, family: str) -> list[str]:
    """The settings of `cfg` (keys like 'moe.router', or a ModelConfig field) that `family`'s
    transformers class cannot express; `cfg.moe` is set."""
    moe, bad = cfg.moe, []
    if moe.router != "softmax":
        bad.append("moe.router")
    if moe.n_shared_experts:
        bad.append("moe.n_shared_experts")
    if moe.bias_update_rate:
        bad.append("moe.bias_update_rate")
    if family != "qwen3_moe":  # every layer sparse
        bad += [
            f"moe.{k}"
            for k, off in (("first_dense_layers", 0), ("every", 1))
            if getattr(moe, k) != off
        ]
    if family == "mixtral" and not moe.normalize_top_k:
        bad.append("moe.normalize_top_k")
    if family == "olmoe" and cfg.n_heads * cfg.head_dim != cfg.d_model:
        bad.append("head_dim")  # OLMoE's q_norm is hidden_size wide
    return bad


def hf_fields(cfg: Any, family: str) -> dict[str, Any]:
    """The `config.json` fields of an MoE family beyond the dense ones `families.hf_config`
    writes (experts, routing, sparse layers, window)."""
    moe = cfg.moe
    out: dict[str, Any] = {
        "num_experts_per_tok": moe.top_k,
        "router_aux_loss_coef": moe.aux_loss_coef,
        "output_router_logits": False,
    }
    if family == "mixtral":
        return dict(
            out,
            num_local_experts=moe.n_experts,
            intermediate_size=moe.expert_d_ff,
            router_jitter_noise=0.0,
            sliding_window=cfg.sliding_window or None,
        )
    out.update(num_experts=moe.n_experts, norm_topk_prob=moe.normalize_top_k)
    if family == "olmoe":
        return dict(out, intermediate_size=moe.expert_d_ff, clip_qkv=None, attention_bias=False)
    # Qwen3-MoE: a step of `every` when the dense prefix is whole steps, the rest listed.
    step = moe.every if moe.first_dense_layers % moe.every == 0 else 1
    dense = [i for i in range(cfg.n_layers) if not cfg.is_sparse(i) and (i + 1) % step == 0]
    return dict(
        out,
        moe_intermediate_size=moe.expert_d_ff,
        decoder_sparse_step=step,
        mlp_only_layers=dense,
        use_sliding_window=bool(cfg.sliding_window),
        sliding_window=cfg.sliding_window or None,
        attention_bias=False,
    )


def sparse_mlp_tensors(cfg: Any) -> list[tuple[tuple[str, ...], str, str]]:
    """(path in a sparse block, HF name after 'model.layers.<i>.', layout) of the MoE block's
    parameters; '{e}' in a name stands for the expert index (HF has one tensor per expert,
    jaxlm one (X, ...) array). Shared experts and the selection bias, which no family here
    has, get their DeepSeek names so that every jaxlm parameter has a place."""
    mixtral = cfg.family == "mixtral"
    prefix = "block_sparse_moe" if mixtral else "mlp"
    gate, up, down = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    out = [
        (("mlp", "w_router"), f"{prefix}.gate.weight", "linear"),
        (("mlp", "w_gate"), f"{prefix}.experts.{{e}}.{gate}.weight", "linear"),
        (("mlp", "w_up"), f"{prefix}.experts.{{e}}.{up}.weight", "linear"),
        (("mlp", "w_down"), f"{prefix}.experts.{{e}}.{down}.weight", "linear"),
    ]
    if cfg.moe.bias_update_rate:
        out.append((("mlp", "router_bias"), f"{prefix}.gate.e_score_correction_bias", "same"))
    if cfg.moe.n_shared_experts:
        out += [
            (("mlp", "shared", f"w_{w}"), f"{prefix}.shared_experts.{w}_proj.weight", "linear")
            for w in ("gate", "up", "down")
        ]
    return out

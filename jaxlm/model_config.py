"""The model's configuration: every shape, numeric choice and architecture switch of
`model.Transformer`, built once from `config.model` (or a Hugging Face `config.json`) and checked
in its constructor, so a bad value is one sentence before anything is traced.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from jaxlm import attention, context, families, layers
from jaxlm import moe as moe_lib
from jaxlm import rope as rope_lib
from jaxlm.errors import ConfigError, ConvertError

REMATS = ("dots", "full", "none")  # the keys of model.REMAT_POLICIES
QK_NORMS = ("none", "head", "full")
NORM_PLACEMENTS = ("pre", "post", "both")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that defines the network's shapes and numerics (built once from config.model)."""

    vocab_size: int
    d_model: int  # D
    n_layers: int
    n_heads: int  # H
    n_kv_heads: int  # K; must divide H (grouped-query attention)
    head_dim: int  # E
    d_ff: int  # F, MLP hidden size
    max_seq_len: int = 2048  # longest position the model is meant for (RoPE scaling, checks)
    rope_theta: float = 10000.0
    # RoPE scaling (Llama 3, linear, YaRN) in rope.parse_scaling's canonical tuple, or None.
    rope_scaling: tuple | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    dtype: str = "float32"  # compute dtype: float32 | bfloat16; params stay float32
    remat: str = "none"  # none | full | dots (save matmul outputs, recompute the rest)
    attention: str = "xla"  # xla | cudnn | splash (see jaxlm/attention.py)
    context_parallel: str = "none"  # none | all_gather | ring (see jaxlm/context.py)
    # Blocks stacked on a leading `layers` axis and run by one scan: compile time and program
    # size stay flat in depth. Parameters then have a (n_layers, ...) shape; see stack_layers.
    scan_layers: bool = False
    init_std: float = 0.02
    # Architecture switches (all off: the Llama block). See docs/families.md.
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2)
    qk_norm: str = "none"  # none | head (RMSNorm per head over E: Qwen3, Gemma-3) | full (OLMo-2)
    norm_placement: str = "pre"  # pre (Llama) | post (sublayer outputs: OLMo-2) | both (Gemma)
    norm_plus_one: bool = False  # RMSNorm scales by (1 + w), w initialised to 0 (Gemma)
    embed_scale: bool = False  # embeddings multiplied by sqrt(d_model) (Gemma)
    mlp_act: str = "silu"  # silu (SwiGLU) | gelu_tanh (GeGLU, Gemma) | relu2 (ReLU², no gate)
    sliding_window: int = 0  # W > 0: a query sees itself and the W - 1 tokens before it
    global_every: int = 0  # with a window, layers N-1, 2N-1, ... attend globally; 0: none do
    rope_local_theta: float = 0.0  # RoPE base of the windowed layers (Gemma-3); 0: rope_theta
    attn_softcap: float = 0.0  # attention logits -> c * tanh(logits / c); 0: off
    final_softcap: float = 0.0  # output logits -> c * tanh(logits / c); 0: off
    query_scale_dim: int = 0  # attention logits scaled by this**-0.5 (Gemma-3); 0: head_dim
    zero_init_out: bool = False  # attention's wo and the MLP's w_down start at zero
    value_embeds: int = 0  # n value-embedding tables (jaxlm/speedrun.py); 0: off
    mtp_heads: int = 0  # multi-token-prediction heads (jaxlm/speedrun.py); 0: off
    family: str = ""  # Hugging Face family to export as; "": the first whose switches these are
    # Mixture of experts in place of the MLP of the sparse layers (jaxlm/moe.py); None: dense.
    # A `config.model.moe` section (dict) is built into its MoEConfig here (n_experts=0: None).
    moe: moe_lib.MoEConfig | None = None

    def __post_init__(self):
        object.__setattr__(self, "rope_scaling", rope_lib.parse_scaling(self.rope_scaling))
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_heads={self.n_heads} must be a multiple of "
                f"model.n_kv_heads={self.n_kv_heads}."
            )
        if self.head_dim % 2:
            raise ConfigError(f"model.head_dim={self.head_dim} must be even for RoPE.")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"model.dtype must be float32 or bfloat16, not {self.dtype!r}.")
        if self.remat not in REMATS:
            raise ConfigError(f"model.remat must be one of {list(REMATS)}, not {self.remat!r}.")
        if self.attention not in ("auto", *attention.IMPLEMENTATIONS):
            raise ConfigError(
                f"model.attention must be auto or one of {attention.IMPLEMENTATIONS}, "
                f"not {self.attention!r}."
            )
        choices = {
            "qk_norm": QK_NORMS,
            "norm_placement": NORM_PLACEMENTS,
            "mlp_act": tuple(layers.ACTIVATIONS),
            "family": ("", *families.FAMILIES),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(
                    f"model.{key} must be one of {allowed}, not {getattr(self, key)!r}."
                )
        for key in (
            "sliding_window",
            "global_every",
            "query_scale_dim",
            "value_embeds",
            "mtp_heads",
        ):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be 0 (off) or more.")
        if self.value_embeds and (self.scan_layers or self.value_embeds > self.n_layers):
            raise ConfigError(
                f"model.value_embeds={self.value_embeds} needs unscanned layers "
                f"(model.scan_layers=False) and at most model.n_layers={self.n_layers} tables."
            )
        if self.global_every and not self.sliding_window:
            raise ConfigError("model.global_every needs model.sliding_window > 0.")
        if self.attention == "cudnn" and self.attn_softcap:
            raise ConfigError(
                "model.attn_softcap cannot run on cuDNN attention (jax's cuDNN call has no "
                "soft-cap); use model.attention=xla."
            )
        context.check(self.context_parallel, self.attention)
        if self.moe is not None and not isinstance(self.moe, moe_lib.MoEConfig):
            object.__setattr__(self, "moe", moe_lib.MoEConfig.from_fields(self.moe, self.d_ff))
        if self.moe is not None:
            self.moe.check_model(self.n_layers, self.scan_layers, self.mlp_act)

    @classmethod
    def from_config(cls, model_cfg: Any, vocab_size: int) -> ModelConfig:
        """Builds the frozen config from the `config.model` ConfigDict and the tokenizer's vocab
        (`jaxlm.spec.build` is the one caller for a run). `attention="auto"` stays until the
        platform is known: `for_platform` resolves it."""
        return cls.from_dict(dict(model_cfg.items(), vocab_size=vocab_size))

    def for_platform(self, platform: str | None = None) -> ModelConfig:
        """This config with `attention="auto"` resolved for `platform` (tpu | gpu | cpu;
        default: this host's backend), which is the target's when compiling for hardware this
        host does not have."""
        if self.attention != "auto":
            return self
        resolved = attention.default_for(
            platform or jax.default_backend(), self.dtype, self.head_dim
        )
        if resolved == "cudnn" and self.attn_softcap:
            resolved = "xla"  # jax's cuDNN attention has no soft-cap
        if self.context_parallel == "ring" or (
            self.context_parallel != "none" and resolved == "splash"
        ):
            resolved = "xla"  # what runs a split sequence (jaxlm/context.py)
        return dataclasses.replace(self, attention=resolved)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> ModelConfig:
        """Builds the config from its JSON form (`model_config.json`, checkpoint metadata);
        keys that are not fields (a run config's other settings) are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in fields.items() if k in known})

    @classmethod
    def from_hf(cls, hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
        """Builds the config of a Hugging Face `config.json` of one of `families.FAMILIES`
        (`where` names it in errors).

        Raises:
          ConvertError: another architecture, or an option jaxlm does not implement.
        """
        fields = families.fields_from_hf(hf, where)
        try:
            return cls(**fields)
        except ConfigError as e:
            raise ConvertError(f"{where} describes a model jaxlm cannot build: {e}") from None

    def to_hf(
        self, dtype: str = "float32", special_ids: dict[str, int | None] | None = None
    ) -> dict[str, Any]:
        """A `config.json` for transformers' class of this model's family (`families.py`)."""
        return families.hf_config(self, dtype, special_ids)

    def layer_windows(self) -> tuple[int, ...]:
        """Each layer's sliding window (0: attends to the whole sequence)."""
        every = self.global_every
        return tuple(
            0 if every and (i + 1) % every == 0 else self.sliding_window
            for i in range(self.n_layers)
        )

    def is_sparse(self, layer: int) -> bool:
        """Whether block `layer` has the MoE feed-forward (`model.moe`) instead of the MLP."""
        return self.moe is not None and self.moe.is_sparse(layer)

    def window_sizes(self) -> tuple[int, ...]:
        """The distinct windows of the layers, sorted (0: global)."""
        return tuple(sorted(set(self.layer_windows())))

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N for the matmuls plus causal attention.

        N counts every non-embedding parameter (the norm scales too, a rounding error) and the
        output projection (V x D), but not the embedding lookup; in an MoE layer only the
        parameters a token is multiplied by (`moe.active_params`). Attention scores and values
        cost 2 matmuls of L x L x (H E) per layer forward; causal masking halves the useful
        work, and training is 3x forward: 6 L H E per token per layer, the way MaxText counts it.
        """
        D, H, K, E, F = self.d_model, self.n_heads, self.n_kv_heads, self.head_dim, self.d_ff
        mlp_matrices = 2 if self.mlp_act in layers.UNGATED else 3
        per_layer = D * H * E + 2 * D * K * E + H * E * D
        per_layer += D * (4 if self.norm_placement == "both" else 2)  # block norms
        per_layer += (H + 2 * K) * E if self.qkv_bias else 0
        per_layer += {"none": 0, "head": 2 * E, "full": (H + K) * E}[self.qk_norm]
        feed_forward = sum(
            moe_lib.active_params(self.moe, D) if self.is_sparse(i) else mlp_matrices * D * F
            for i in range(self.n_layers)
        )
        matmul_params = self.n_layers * per_layer + feed_forward + D + self.vocab_size * D
        matmul_params += self.mtp_heads * (D * D + D + self.vocab_size * D)  # training only
        return 6 * matmul_params + self.attention_flops_per_token(seq_len)

    def attention_flops_per_token(self, seq_len: int) -> int:
        """The attention scores' and values' part of `flops_per_token`: 6 L H E per layer.

        A query sees L / 2 keys on average under a causal mask; in a layer with a sliding
        window W it sees at most W, so such a layer counts 6 min(L, 2 W) H E.
        """
        keys = [min(seq_len, 2 * w) if w else seq_len for w in self.layer_windows()]
        return 6 * self.n_heads * self.head_dim * sum(keys)

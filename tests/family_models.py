"""Tiny random transformers models of the Hugging Face families beyond Llama (Qwen2, Qwen3,
Mistral, OLMo-2, Gemma-2, Gemma-3 text), shared by tests/test_families*.py.

Odd sizes everywhere (hidden 96, 6 heads, 2 kv heads, vocab 333, 3 layers, window 7 shorter
than the tests' rows) so a swapped axis or an off-by-one window cannot pass by accident.
"""

VOCAB, WINDOW = 333, 7
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=96,
    intermediate_size=124,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
LOCAL_LOCAL_GLOBAL = ["sliding_attention", "sliding_attention", "full_attention"]
# family -> (transformers config class, its overrides, ModelConfig switches the import must set)
FAMILIES = {
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True), dict(qkv_bias=True)),
    "qwen3": (
        "Qwen3Config",
        dict(
            head_dim=24,  # not hidden / heads
            use_sliding_window=True,
            sliding_window=WINDOW,
            layer_types=LOCAL_LOCAL_GLOBAL,
        ),
        dict(qk_norm="head", head_dim=24, sliding_window=WINDOW, global_every=3),
    ),
    "mistral": ("MistralConfig", dict(sliding_window=WINDOW), dict(sliding_window=WINDOW)),
    "olmo2": ("Olmo2Config", {}, dict(qk_norm="full", norm_placement="post")),
    "gemma3": (
        "Gemma3TextConfig",
        dict(
            head_dim=24,
            query_pre_attn_scalar=20,
            sliding_window=WINDOW,
            layer_types=LOCAL_LOCAL_GLOBAL,
            final_logit_softcapping=5.0,
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
        ),
        dict(
            norm_placement="both",
            norm_plus_one=True,
            embed_scale=True,
            mlp_act="gelu_tanh",
            qk_norm="head",
            global_every=3,
            final_softcap=5.0,
            query_scale_dim=20,
            rope_local_theta=10_000.0,
        ),
    ),
    # Gemma-2 is Gemma-3 without QK-norm but with attention-logit soft-capping, which
    # transformers' Gemma-3 does not apply: it is here for that switch.
    "gemma2": (
        "Gemma2Config",
        dict(
            head_dim=24,
            query_pre_attn_scalar=20,
            sliding_window=WINDOW,
            attn_logit_softcapping=3.0,
            final_logit_softcapping=5.0,
        ),
        dict(
            norm_placement="both",
            norm_plus_one=True,
            embed_scale=True,
            mlp_act="gelu_tanh",
            global_every=2,
            attn_softcap=3.0,
            final_softcap=5.0,
            query_scale_dim=20,
        ),
    ),
}


def make_family_model(family: str, path, **overrides):
    """A tiny random transformers model of `family` (fp32, eager attention) saved to `path`,
    its norms and biases randomised so none can be skipped; returns the torch model."""
    import torch
    import transformers

    config_class, family_overrides, _ = FAMILIES[family]
    config = getattr(transformers, config_class)(**{**COMMON, **family_overrides, **overrides})
    config._attn_implementation = "eager"  # the reference: every family's plain softmax path
    torch.manual_seed(len(family))
    auto = transformers.AutoModelForCausalLM
    torch_model = auto.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # norms (1 or 0 at init) and biases (0) random, so none can be skipped
        for name, p in torch_model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                centre = 1.0 if "norm" in name and "gemma" not in family else 0.0  # Gemma: 1 + w
                p.copy_(centre + 0.3 * torch.randn_like(p))
    torch_model.save_pretrained(str(path))
    return torch_model

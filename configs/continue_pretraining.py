"""Continued pretraining of a TinySolar-248m-4k-class Llama model on a domain corpus.

    # 1. Download a Llama-architecture base model with safetensors weights (any size works):
    huggingface-cli download upstage/TinySolar-248m-4k --local-dir ~/models/tinysolar
    # 2. Train on your corpus (txt/jsonl/parquet files, globs or dirs, comma-separated):
    python -m jaxlm.main --config=configs/continue_pretraining.py:~/models/tinysolar \\
        --config.data.datasets.domain.paths='~/corpus/*.jsonl' --workdir=runs/tinysolar-domain
    # 3. Export the result for transformers:
    python tools/convert_hf.py export --workdir=runs/tinysolar-domain --out_dir=~/models/out

The text after ':' is the base model's directory. From it the recipe takes the model section
(its config.json: sizes, heads, RoPE theta/scaling, norm eps, tied embeddings, vocab), sets
`init_from = 'hf:<dir>'` (weights loaded, optimizer fresh) and tokenizes the corpus with the
model's own tokenizer (tokenizer.json, else a sentencepiece tokenizer.model), so records are
what the base model expects. A workdir made by `tools/convert_hf.py import` works too
(`ckpt:` source). Without the argument the model fields are TinySolar-248m-4k's (12 layers,
d 1024, 32 heads of 32, 8 kv heads, F 4096, vocab 32000, 4096 positions) and the paths are
placeholders, so this file parses anywhere.

Schedule: a short linear warmup from a low 5e-6 to a peak of 5e-5 (about 10x below the base
run's peak, so the model keeps what it knows), then cosine decay to zero. Loss, gradient norm,
update/param norms and the learning rate are logged every `train.log_every` steps (stdout,
metrics.jsonl, TensorBoard); held-out domain loss every `eval.every` steps.

Hardware: one 80 GB GPU (bf16 compute, fp32 params; ~4 GB for weights + Adam state at 248M).
Time and loss are not measured yet for this recipe; the end-to-end path is covered by
tests/test_convert_hf.py::test_continued_pretraining_end_to_end on a tiny model.
"""

import ml_collections

from configs import base

# TinySolar-248m-4k's architecture: used when no model directory is given.
TINYSOLAR = dict(
    d_model=1024,
    n_layers=12,
    n_heads=32,
    n_kv_heads=8,
    head_dim=32,
    d_ff=4096,
    max_seq_len=4096,
    rope_theta=10000.0,
    rope_scaling=None,
    norm_eps=1e-6,
    tie_embeddings=False,
    init_std=0.02,
    vocab_size=32000,
)


def get_config(source: str = "") -> ml_collections.ConfigDict:
    """`source`: the base model's HF directory (or 'hf:<dir>' / 'ckpt:<jaxlm workdir>')."""
    c = base.get_config()
    c.name = "continue_pretraining"
    fields, tokenizer_path, init_from = dict(TINYSOLAR), "", ""
    if source:
        from jaxlm.convert import init_from as warm_start

        init_from = source if source.partition(":")[0] in ("hf", "ckpt") else f"hf:{source}"
        fields = warm_start.model_fields(init_from)
        tokenizer_path = warm_start.tokenizer_file(init_from)
    c.init_from = init_from  # 'hf:<dir>' | 'ckpt:<workdir or step dir>' | '' = random init

    vocab_size = fields.pop("vocab_size")
    for key, value in fields.items():  # the base model's shapes and numerics, nothing else
        c.model[key] = value
    c.model.dtype = "bfloat16"  # compute dtype; params and Adam state stay fp32
    c.model.remat = "none"  # 248M at 2048 tokens fits without recomputation

    c.tokenizer.path = tokenizer_path  # the base model's own tokenizer; never train a new one
    c.tokenizer.vocab_size = vocab_size  # informational: the model's embedding rows

    c.data.datasets = ml_collections.ConfigDict()
    c.data.datasets.domain = ml_collections.ConfigDict()
    c.data.datasets.domain.paths = "~/corpus/domain/*.jsonl"  # placeholder: your domain corpus
    c.data.datasets.domain.text_field = "text"  # JSONL key / Parquet column with the text
    c.data.datasets.domain.weight = 1.0  # mixture weight (add general text against forgetting)
    c.data.val_fraction = 0.01  # held-out domain documents (by content hash)

    c.optim.init_lr = 5e-6  # warmup starts low: large early updates would erase the base model
    c.optim.lr = 5e-5  # peak learning rate
    c.optim.warmup_steps = 100  # short linear warmup
    c.optim.schedule = "cosine"  # then decay ...
    c.optim.min_lr_ratio = 0.0  # ... to zero
    c.optim.weight_decay = 0.1  # decoupled weight decay on matrices
    c.optim.clip_norm = 1.0  # global gradient-norm clip

    c.train.steps = 2000  # optimizer steps (~131M tokens at 32 x 2048)
    c.train.batch_size = 32  # sequences per step
    c.train.seq_len = 2048  # tokens per sequence (the base model allows up to max_seq_len)
    c.train.log_every = 10  # loss, grad norm, lr every 10 steps
    c.eval.every = 200  # held-out domain loss every 200 steps
    c.eval.max_batches = 50  # cap on eval batches
    c.checkpoint.every = 500  # steps between checkpoints
    c.sample.prompt = "The"  # continued at the end of training
    return c

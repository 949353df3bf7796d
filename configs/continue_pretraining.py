"""Continued pretraining of a local Hugging Face model on a domain corpus: Llama, Qwen2/2.5,
Qwen3, Mistral, OLMo-2, Gemma-2 or Gemma-3 (text), see docs/families.md.

    # 1. Download a base model of one of those families with safetensors weights (any size):
    huggingface-cli download upstage/TinySolar-248m-4k --local-dir ~/models/tinysolar
    huggingface-cli download HuggingFaceTB/SmolLM-135M --local-dir ~/models/smollm
    # 2. Train on your corpus (txt/jsonl/parquet files, globs or dirs, comma-separated); a
    #    single long .txt (a book, a dump) is cut into documents of ~8,000 characters:
    python -m jaxlm.main --config=configs/continue_pretraining.py:~/models/tinysolar \\
        --config.data.datasets.domain.paths='~/corpus/*.txt' --workdir=runs/tinysolar-domain
    python -m jaxlm.main --config=configs/continue_pretraining.py:~/models/smollm \\
        --config.data.datasets.domain.paths=~/corpus/book.txt --workdir=runs/smollm-book
    #    (--config.train.steps=0 only evaluates the base model on the held-out text)
    # 3. Sample, and export the result for transformers:
    python tools/generate.py --workdir=runs/smollm-book --prompt='Chapter 1'
    python tools/convert_hf.py export --workdir=runs/smollm-book --out_dir=~/models/smollm-book

The text after ':' is the base model's directory (or 'hf:<dir>' / 'ckpt:<jaxlm workdir>', e.g.
one made by `tools/convert_hf.py import`). From it the recipe takes the model section (its
config.json: sizes, heads, RoPE theta/scaling, norm eps, tied embeddings, vocab, and the
family's switches: biases, QK-norm, norm placement, sliding windows, soft-caps), sets
`init_from` (weights loaded, optimizer fresh) and tokenizes the corpus with the model's own
tokenizer (tokenizer.json, else a sentencepiece tokenizer.model), so records are what the base
model expects. The tokenizer's sibling files (tokenizer_config.json with the chat template and
BOS rule, special_tokens_map.json, generation_config.json) are kept in `<workdir>/tokenizer/`
and exported unchanged. Without the argument the model fields are TinySolar-248m-4k's (12
layers, d 1024, 32 heads of 32, 8 kv heads, F 4096, vocab 32000, 4096 positions) and the paths
are placeholders, so this file parses anywhere.

What it prints: the held-out domain loss before training (step 0) and every `eval.every` steps,
and at the end `held-out loss before -> after` for every held-out set. Schedule: a short linear
warmup from a low 5e-6 to a peak of 5e-5 (about 10x below the base run's peak, so the model
keeps what it knows), then cosine decay to zero. Periodic evaluations are capped (16 batches,
a 50-example next-line task) so they cost under 10% of the run (docs/perf.md).

Hardware: one 80 GB GPU (bf16 compute, fp32 params; ~4 GB for weights + Adam state at 248M);
SmolLM-135M also trains on a CPU at batch 2 x 512 (docs/perf.md). The end-to-end path is
covered by tests/test_continue_pretraining.py on a tiny Llama and by tests/test_families_e2e.py
on a tiny model of every other family (3 steps, then the export loaded by transformers).
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
    # One scanned block: compile time and the compiler's memory stay flat in depth (a 30-layer
    # model unrolled took ~4 GB above steady training RSS to compile; docs/perf.md).
    c.model.scan_layers = True

    c.tokenizer.path = tokenizer_path  # the base model's own tokenizer; never train a new one
    c.tokenizer.vocab_size = vocab_size  # informational: the model's embedding rows

    c.data.datasets = ml_collections.ConfigDict()
    c.data.datasets.domain = ml_collections.ConfigDict()
    c.data.datasets.domain.paths = "~/corpus/domain/*.txt"  # placeholder: your domain corpus
    c.data.datasets.domain.text_field = "text"  # JSONL key / Parquet column with the text
    # Text files -> documents: pieces of at most 8,000 characters cut at paragraph ends, so one
    # book gets a held-out split and shuffles; 'file' | 'paragraphs' | a number.
    c.data.datasets.domain.split = "8000"
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
    c.eval.every = 200  # held-out domain loss every 200 steps (and before the first step)
    c.eval.max_batches = 16  # cap on periodic eval batches: ~1/40 of 200 steps' compute
    c.eval.next_line_examples = 50  # a small next-line task: its scoring dominated eval time
    c.checkpoint.every = 500  # steps between checkpoints
    # Written before the next step: an async save's host copy and writer buffers coexisting
    # with the next step's buffers were the run's RSS peak (docs/perf.md); a few seconds per
    # save at this model size.
    c.checkpoint.async_save = False
    c.sample.prompt = "The"  # continued at the end of training
    return c

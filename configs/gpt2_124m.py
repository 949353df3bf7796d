"""GPT-2 small (124M) shapes as a Llama, trained on 10B tokens at GPT-2's 0.5M-token batch.

    python tools/estimate.py --config=configs/gpt2_124m.py --hardware=h100 --chips=8 --mfu=0.45
    python -m jaxlm.main --config=configs/gpt2_124m.py \\
        --config.data.datasets.stdlib.paths='~/corpus/*.jsonl' \\
        --config.tokenizer.path=~/tokenizers/gpt2/tokenizer.json
    python benchmarks/bench.py --config=configs/gpt2_124m.py   # measure tokens/s on the chip itself

Model: GPT-2 small's widths (d 768, 12 layers, 12 heads of 64, vocabulary 50,257, tied
embeddings, 1024 positions) in jaxlm's Llama block: RMSNorm, RoPE instead of learned position
embeddings, and a SwiGLU MLP of width 2048, whose three 768 x 2048 matrices hold as many
parameters as GPT-2's two 768 x 3072 ones. 123,551,232 parameters: GPT-2's 124M less its
0.8M learned position embeddings, still 124M rounded (tests/test_recipes.py checks it).
Hardware: 8 x H100 80GB, one host; parameters and Adam state split over the 8 (fsdp).
Batch: 512 sequences x 1,024 tokens = 524,288 tokens per step, as two micro-batches of 32
sequences per chip (grad_accum 2). Tokens: 19,073 steps = 10.0B tokens (~81 per parameter,
4x Chinchilla's 20, the budget GPT-2 small reproductions commonly use).
Expected (planner estimates from tools/estimate.py, not measured runs; no GPU was used):
7.98e8 model FLOPs per token; at 45% MFU ~4.46M tokens/s, 117 ms per step and ~37 minutes
(~5 chip-hours); ~32 GiB per chip, 40% of HBM (64 GiB with grad_accum 1, so that fits too).
One H100 takes ~5.0 hours at the same MFU: add --config.train.grad_accum=16 (micro-batch 32,
~34 GiB).
On TPU (tools/compile.py, on a CPU): v5e-8 needs --config.train.grad_accum=8 (micro-batch 8),
then 10.1 GiB per chip by the TPU compiler (the planner says 8.48); that compile took 981 s wall
on a 2-core CPU (measured at 756db8c), 365 s of it the main compile.
Data and tokenizer: this recipe expects a real corpus (set data.datasets.*.paths; the default
stdlib corpus is ~31 MB of Python, far too little for 10B tokens) and an existing 50,257-piece
tokenizer in tokenizer.path (GPT-2's own tokenizer.json, or a sentencepiece .model). Left empty,
data preparation trains a 50,257-piece sentencepiece model on the corpus, which a small corpus
such as stdlib cannot support.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.name = "gpt2_124m"

    c.model.d_model = 768  # D, GPT-2 small's width
    c.model.n_layers = 12  # GPT-2 small's depth
    c.model.n_heads = 12  # H
    c.model.n_kv_heads = 12  # K = H: full multi-head attention, as in GPT-2
    c.model.head_dim = 64  # E; H x E = D
    c.model.d_ff = 2048  # F: 3 x 768 x 2048 SwiGLU = 2 x 768 x 3072 GELU MLP in parameters
    c.model.max_seq_len = 1024  # GPT-2's context
    c.model.tie_embeddings = True  # GPT-2 shares the input embedding with the output head
    c.model.dtype = "bfloat16"  # compute dtype; parameters and Adam state stay fp32
    c.model.remat = "none"  # 32 x 1,024 tokens per chip fit without recomputation
    c.model.scan_layers = True  # one scanned block: compile time does not grow with depth

    # GPT-2's vocabulary. Sets the embedding rows only when data prep trains the tokenizer;
    # with tokenizer.path set, the tokenizer file's own size decides.
    c.tokenizer.vocab_size = 50257

    c.optim.lr = 6e-4  # GPT-3 paper's peak for its 125M model at a 0.5M-token batch
    c.optim.warmup_steps = 700  # ~0.37B tokens of linear warmup
    c.optim.schedule = "cosine"  # decay to min_lr_ratio x lr (6e-5) by the last step

    c.train.steps = 19_073  # x 524,288 tokens = 10.0B tokens
    c.train.batch_size = 512  # global sequences per step: 0.5M tokens, GPT-2's batch
    c.train.seq_len = 1024  # L
    c.train.grad_accum = 2  # micro-batches of 32 sequences per chip on 8 chips
    c.train.log_every = 10  # steps between metric lines

    c.eval.every = 500  # steps between held-out evaluations
    c.eval.max_batches = 50  # cap on eval batches (a real corpus' val split is large)
    c.checkpoint.every = 1000  # steps between checkpoints
    c.checkpoint.keep_every = 5000  # keep a few milestones for later comparison
    c.sample.prompt = "The"  # prose prompt: this recipe is for a general-text corpus

    c.mesh.preset = "fsdp"  # split parameters, gradients and Adam state over the chips
    c.mesh.shape = (1, -1, 1)  # every chip on the fsdp axis
    return c

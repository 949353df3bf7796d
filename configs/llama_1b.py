"""Llama-3.2-1B shapes (1.24B parameters), pretrained for a Chinchilla budget on one GPU.

    python tools/estimate.py --config=configs/llama_1b.py --hardware=h100 --chips=1 --mfu=0.45
    python -m jaxlm.main --config=configs/llama_1b.py \\
        --config.data.datasets.stdlib.paths='~/corpus/*.parquet' \\
        --config.tokenizer.path=~/models/llama-3.2-1b/tokenizer.json
    python benchmarks/bench.py --config=configs/llama_1b.py   # measure tokens/s on the chip itself
    python tools/compile.py --config=configs/llama_1b.py --target=v5p-8   # TPU compile, on a CPU

Model: Llama 3.2 1B's architecture: vocabulary 128,256, d 2048, 16 layers, 32 query heads and
8 key/value heads of 64, SwiGLU 8192, tied embeddings, RoPE theta 500,000 with Llama 3.2's
scaling (32, 1, 4, 8192). 1,235,814,400 parameters, exactly Meta's published count
(tests/test_recipes.py checks it); 263M of them are the tied embedding.
Hardware: one H100 80GB. Each step is 64 micro-batches of 4 x 2,048 tokens with no
rematerialisation: the planner puts that at 52.6 GiB (66% of HBM), most of it the fp32 logits
of the 128K vocabulary and the per-layer activations. Micro-batch 8 (grad_accum 32) would need
79.9 GiB: too big for an H100, fine for an H200 (57% of 141 GiB; add
--config.train.grad_accum=32 there). The planner prefers this to remat="full" (micro-batch 16,
64.7 GiB), which re-runs every block's forward pass for no gain in tokens per step.
Batch: 256 sequences x 2,048 tokens = 524,288 tokens per step. Tokens: 47,000 steps = 24.6B
tokens, ~20 per parameter (Chinchilla compute-optimal).
Expected (planner estimates from tools/estimate.py, not measured runs; no GPU was used):
7.82e9 model FLOPs per token; at 45% MFU ~56.9K tokens/s, 9.2 s per step and ~5.0 days
(~120 H100-hours). On 8 x H100 with --config.train.grad_accum=8 (still micro-batch 4 per
chip): ~15 hours at 32.5 GiB per chip.
On TPU (compiled on a CPU by tools/compile.py; docs/perf.md): v5p-8 (4 chips, fsdp, splash
attention, 64 micro-batches of 1 sequence per chip) takes 15.9 GiB per chip by the TPU compiler's
own buffer assignment (the planner says 14.9); on a 2-core CPU tools/compile.py took 737 s wall
(measured at 756db8c), 245 s of it the main compile and the rest the two costing compiles.
Data and tokenizer: a web-scale corpus (the default stdlib corpus is a smoke test), tokenized
with a 128,256-piece tokenizer: Llama 3's tokenizer.json in tokenizer.path, or one trained by
data preparation from a corpus large enough for that vocabulary.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.name = "llama_1b"

    c.model.d_model = 2048  # D
    c.model.n_layers = 16
    c.model.n_heads = 32  # H
    c.model.n_kv_heads = 8  # K: grouped-query attention, 4 query heads per kv head
    c.model.head_dim = 64  # E
    c.model.d_ff = 8192  # F, SwiGLU hidden width
    c.model.max_seq_len = 8192  # positions the RoPE scaling below is set up for
    c.model.rope_theta = 500000.0  # Llama 3's RoPE base
    # Llama 3.2's RoPE scaling: (factor, low_freq_factor, high_freq_factor, original length).
    c.model.rope_scaling = (32.0, 1.0, 4.0, 8192)
    c.model.tie_embeddings = True  # Llama 3.2 1B shares the embedding with the output head
    c.model.dtype = "bfloat16"  # compute dtype; parameters and Adam state stay fp32
    c.model.remat = "none"  # micro-batch 4 fits without recomputation (planner: 52.6 GiB)
    c.model.scan_layers = True  # one scanned block: compile time does not grow with depth

    c.tokenizer.vocab_size = 128256  # Llama 3's vocabulary (used when data prep trains one)

    c.optim.lr = 4e-4  # a common peak for ~1B Llamas at a 0.5M-token batch
    c.optim.warmup_steps = 2000  # ~1B tokens of linear warmup
    c.optim.schedule = "cosine"  # decay to min_lr_ratio x lr (4e-5) by the last step

    c.train.steps = 47_000  # x 524,288 tokens = 24.6B tokens, ~20 per parameter
    c.train.batch_size = 256  # global sequences per step
    c.train.seq_len = 2048  # L; up to max_seq_len works (4,096: ~5% slower per token)
    c.train.grad_accum = 64  # micro-batches of 4 sequences: what fits one H100 without remat
    c.train.log_every = 10  # steps between metric lines

    c.eval.every = 1000  # steps between held-out evaluations
    c.eval.max_batches = 50  # cap on eval batches
    c.checkpoint.every = 1000  # ~2.5 hours of one H100 between checkpoints
    c.checkpoint.keep_every = 10_000  # keep milestones for later comparison
    c.sample.prompt = "The"  # prose prompt: this recipe is for a general-text corpus

    c.mesh.preset = "fsdp"  # one chip: no split; on several, parameters and state are split
    c.mesh.shape = (1, -1, 1)  # every chip on the fsdp axis
    return c

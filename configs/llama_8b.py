"""Llama-3-8B shapes (8.03B parameters), pretrained for a Chinchilla-sized budget.

    python tools/estimate.py --config=configs/llama_8b.py --hardware=h100 --chips=64
    python -m jaxlm.main --config=configs/llama_8b.py   # on every host; see below
    python tools/compile.py --config=configs/llama_8b.py --target=v5p-64   # TPU compile, on a CPU

Hardware: 64 x H100 80GB (8 hosts of 8; multi-host start-up is automatic under SLURM, or set
--config.mesh.multihost=True). The parameters, gradients and AdamW state are split over all 64
chips (fsdp), every block is rematerialised, and each chip takes one 8192-token sequence per
micro-batch (grad_accum 8): the estimator puts that at ~14 GiB per chip, most of it the fp32
logits of the 128,256-word vocabulary.
Batch: 512 sequences x 8192 tokens = 4.19M tokens per step (Llama 3's early batch size).
Tokens: 38,000 steps = 159B tokens, ~20 per parameter (Chinchilla compute-optimal).
Expected (planner estimate, not a measured run): 51.5 GFLOPs per token (6 x matmul weights +
attention); at 40% MFU that is ~490K tokens/s, 8.5 s per step and ~3.8 days (~5,800
chip-hours); `tools/estimate.py` prints the same for other hardware, chip counts and MFUs.
On TPU: the TPU compiler (tools/compile.py, run on a CPU; docs/perf.md) puts the step at
26.3 GiB per chip on v5p-64 and 15.5 GiB on v5p-128. On a 2-core CPU the v5p-64 compile took
1,389 s wall (measured at 756db8c): 524 s for the step itself, the rest for the two small
compiles that cost it. The 32 layers are scanned: unrolled, the main compile takes ~4x longer.
Data: point data.datasets at a web-scale corpus (the default stdlib corpus is a smoke test).
Tokenizer: a 128,256-piece vocabulary as in Llama 3; train one with data prep or set
tokenizer.path to an existing sentencepiece model of that size.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.name = "llama_8b"

    c.model.d_model = 4096  # D
    c.model.n_layers = 32
    c.model.n_heads = 32  # H
    c.model.n_kv_heads = 8  # K: grouped-query attention, 4 query heads per kv head
    c.model.head_dim = 128  # E
    c.model.d_ff = 14336  # F, SwiGLU hidden width
    c.model.max_seq_len = 8192  # Llama 3's pretraining context
    c.model.rope_theta = 500000.0
    # Llama 3.1 long-context RoPE scaling: (factor, low_freq_factor, high_freq_factor, orig. len).
    c.model.rope_scaling = (8.0, 1.0, 4.0, 8192)
    c.model.norm_eps = 1e-5
    c.model.tie_embeddings = False  # separate output head: 2 x 525M of the 8.03B parameters
    c.model.dtype = "bfloat16"  # compute dtype; parameters and optimizer state stay fp32
    c.model.remat = "full"  # keep only each block's input; recompute the rest in the backward
    c.model.attention = "auto"  # cuDNN flash attention on GPUs, splash on TPUs, XLA elsewhere
    c.model.scan_layers = True  # one scanned block: compile time does not grow with depth

    c.tokenizer.vocab_size = 128256  # Llama 3's vocabulary size

    c.optim.lr = 3e-4  # Llama 3 8B's peak learning rate
    c.optim.init_lr = 0.0
    c.optim.min_lr_ratio = 0.1  # cosine to 3e-5
    c.optim.warmup_steps = 2000
    c.optim.schedule = "cosine"
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.1
    c.optim.clip_norm = 1.0

    c.train.steps = 38_000  # x 4.19M tokens = 159B tokens
    c.train.batch_size = 512  # global sequences per step
    c.train.seq_len = 8192  # L
    c.train.grad_accum = 8  # 64 sequences per micro-batch: one per chip on 64 chips
    c.train.log_every = 10

    c.eval.every = 1000
    c.eval.max_batches = 50
    c.checkpoint.every = 1000
    c.checkpoint.keep = 3
    c.checkpoint.keep_every = 10_000

    c.mesh.preset = "fsdp"
    c.mesh.shape = (1, -1, 1)  # every chip on the fsdp axis
    return c

"""TinySolar-248m-4k shapes (248M parameters), pretrained from scratch at 4K context on one GPU.

    python tools/estimate.py --config=configs/tinysolar_248m.py --hardware=h100 --chips=1 \\
        --mfu=0.45
    python -m jaxlm.main --config=configs/tinysolar_248m.py \\
        --config.data.datasets.stdlib.paths='~/corpus/*.jsonl' \\
        --config.tokenizer.path=~/models/tinysolar/tokenizer.model
    python benchmarks/bench.py --config=configs/tinysolar_248m.py   # measure tokens/s on the chip

Model: the architecture in upstage/TinySolar-248m-4k's config.json (a Llama): d 1024, 12
layers, 32 query heads and 8 key/value heads of 32, SwiGLU 4096, vocabulary 32,000, separate
output head, RoPE theta 10,000, RMSNorm eps 1e-6. 248,013,824 parameters, the 248M of the name
(tests/test_recipes.py checks it). To continue training the released weights instead, use
configs/continue_pretraining.py.
Hardware: one H100 80GB. Each step is 16 micro-batches of 8 x 4,096 tokens, no
rematerialisation: ~41 GiB per the planner (51% of HBM). On an H200, grad_accum 8 (micro-batch
16, ~77 GiB, 55% of 141 GiB) also fits.
Batch: 128 sequences x 4,096 tokens = 524,288 tokens per step. Tokens: 9,500 steps = 4.98B
tokens, ~20 per parameter (Chinchilla compute-optimal).
Expected (planner estimates from tools/estimate.py, not measured runs; no GPU was used):
1.59e9 model FLOPs per token (19% of it attention at L = 4,096); at 45% MFU ~279K tokens/s,
1.9 s per step and ~5.0 hours (~5 H100-hours); 8 x H100 with grad_accum 2: ~37 minutes.
Data and tokenizer: a real corpus (the default stdlib corpus is ~31 MB of Python) and a
32,000-piece tokenizer: TinySolar's own tokenizer.model (sentencepiece) in tokenizer.path, or
one trained by data preparation from a corpus large enough for that vocabulary.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.name = "tinysolar_248m"

    c.model.d_model = 1024  # D (hidden_size)
    c.model.n_layers = 12  # num_hidden_layers
    c.model.n_heads = 32  # H (num_attention_heads)
    c.model.n_kv_heads = 8  # K (num_key_value_heads): 4 query heads per kv head
    c.model.head_dim = 32  # E = hidden_size / num_attention_heads
    c.model.d_ff = 4096  # F (intermediate_size)
    # The "4k" of the name: the context trained for. config.json's max_position_embeddings is
    # 32768 (inherited from TinyMistral-248M). RoPE has no position table: this bounds seq_len
    # and is the max_position_embeddings an HF export records.
    c.model.max_seq_len = 4096
    c.model.rope_theta = 10000.0  # rope_theta (no rope_scaling)
    c.model.norm_eps = 1e-6  # rms_norm_eps
    c.model.tie_embeddings = False  # tie_word_embeddings: a separate 32.8M-parameter head
    c.model.dtype = "bfloat16"  # compute dtype; parameters and Adam state stay fp32
    c.model.remat = "none"  # micro-batch 8 x 4,096 fits without recomputation (~41 GiB)
    c.model.scan_layers = True  # one scanned block: compile time does not grow with depth

    c.tokenizer.vocab_size = 32000  # TinySolar's (Llama 2 / Mistral-sized) vocabulary

    c.optim.lr = 6e-4  # a usual peak for ~250M models at a 0.5M-token batch
    c.optim.warmup_steps = 500  # ~0.26B tokens of linear warmup
    c.optim.schedule = "cosine"  # decay to min_lr_ratio x lr (6e-5) by the last step

    c.train.steps = 9_500  # x 524,288 tokens = 4.98B tokens, ~20 per parameter
    c.train.batch_size = 128  # global sequences per step
    c.train.seq_len = 4096  # L: the model's full 4K context
    c.train.grad_accum = 16  # micro-batches of 8 sequences: fits one H100 without remat
    c.train.log_every = 10  # steps between metric lines

    c.eval.every = 500  # steps between held-out evaluations
    c.eval.max_batches = 50  # cap on eval batches
    c.checkpoint.every = 500  # ~16 minutes of one H100 between checkpoints
    c.sample.prompt = "The"  # prose prompt: this recipe is for a general-text corpus

    c.mesh.preset = "fsdp"  # one chip: no split; on several, parameters and state are split
    c.mesh.shape = (1, -1, 1)  # every chip on the fsdp axis
    return c

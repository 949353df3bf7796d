"""Qwen3-30B-A3B shapes (30.5B parameters, 3.35B active per token), a dropless mixture of experts.

    python tools/estimate.py --config=configs/qwen3_30b_a3b.py --target=v5p-64
    python tools/compile.py --config=configs/qwen3_30b_a3b.py --target=v5p-64   # on a CPU
    python tools/compile.py --config=configs/qwen3_30b_a3b.py --target=v5p-128 \\
        --config.mesh.shape='(-1,16,1)' --config.train.grad_accum=16
    python -m jaxlm.main --config=configs/qwen3_30b_a3b.py   # on every host of the slice

Model: Qwen/Qwen3-30B-A3B's config.json: vocabulary 151,936, d 2048, 48 layers, 32 query heads
and 4 key/value heads of 128, RMSNorm per head on q and k (qk_norm head), RoPE theta 1,000,000,
RMSNorm eps 1e-6, untied output head; every layer sparse: 128 SwiGLU experts of width 768, each
token routed to 8 by a softmax router whose top-8 weights are renormalised, dropless, with the
load-balance loss at 0.001 (Qwen3-MoE's router_aux_loss_coef). 30,532,122,624 parameters,
3,353,032,704 of them active per token (tests/test_estimate.py counts both).
Hardware: a TPU v5p-64 slice (32 chips). `ep_fsdp` over all 32 chips, mesh (1, 32, 1): the
batch and every weight split 32 ways, the experts whole (4 per chip). Dropless dispatch gathers
the tokens of the whole expert group (here every chip) and runs the chip's own experts as
megablox grouped matmuls (`grouped_matmul=auto`). On v5p-128 the compiled command uses expert
groups of 16 chips, mesh (4, 16, 1), with grad_accum 16 (docs/perf.md).
Every block is rematerialised; each chip takes one 4,096-token sequence per micro-batch.
Batch: 1,024 sequences x 4,096 tokens = 4.19M tokens per step. Tokens: 60,000 steps = 252B
tokens (Qwen3 trained ~36T; raise train.steps for that).
On TPU, by the TPU compiler (tools/compile.py on a CPU; docs/perf.md): 45.4 GiB per chip on
v5p-64 and 65.7 GiB on v5p-128 with the command above (planner 46.9 and 64.7).
"""

from configs import base


def get_config():
    c = base.get_config()
    c.name = "qwen3_30b_a3b"

    c.model.d_model = 2048  # D
    c.model.n_layers = 48
    c.model.n_heads = 32  # H
    c.model.n_kv_heads = 4  # K: grouped-query attention, 8 query heads per kv head
    c.model.head_dim = 128  # E (H x E = 4096, twice d_model)
    c.model.d_ff = 768  # F: the experts' width (no dense MLP layer)
    c.model.max_seq_len = 4096  # trained context here (the published model allows 40,960)
    c.model.rope_theta = 1_000_000.0
    c.model.norm_eps = 1e-6
    c.model.qk_norm = "head"  # RMSNorm over each head's q and k (Qwen3)
    c.model.tie_embeddings = False
    c.model.dtype = "bfloat16"  # compute dtype; parameters and optimizer state stay fp32
    c.model.remat = "full"  # keep each block's input only
    c.model.scan_layers = True  # one scanned block: compile time flat in depth

    c.model.moe.n_experts = 128  # X
    c.model.moe.top_k = 8
    c.model.moe.expert_d_ff = 768
    c.model.moe.normalize_top_k = True  # Qwen3-MoE's norm_topk_prob
    c.model.moe.aux_loss_coef = 0.001  # Qwen3-MoE's router_aux_loss_coef
    c.model.moe.capacity_factor = 0.0  # dropless
    c.model.moe.grouped_matmul = "auto"  # megablox gmm on TPU, ragged_dot on GPU

    c.tokenizer.vocab_size = 151936  # Qwen3's

    c.optim.lr = 3e-4
    c.optim.init_lr = 0.0
    c.optim.min_lr_ratio = 0.1
    c.optim.warmup_steps = 2000
    c.optim.schedule = "cosine"
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.weight_decay = 0.1
    c.optim.clip_norm = 1.0

    c.train.steps = 60_000  # x 4.19M tokens = 252B tokens
    c.train.batch_size = 1024  # global sequences per step
    c.train.seq_len = 4096  # L
    c.train.grad_accum = 32  # one sequence per chip per micro-batch on 32 chips
    c.train.log_every = 10

    c.eval.every = 1000
    c.eval.max_batches = 50
    c.checkpoint.every = 1000
    c.checkpoint.keep_every = 10_000

    c.mesh.preset = "ep_fsdp"  # experts whole per chip, split over the fsdp axis
    c.mesh.shape = (1, -1, 1)  # one expert group of every chip
    return c

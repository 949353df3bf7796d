"""OLMoE-1B-7B shapes (6.92B parameters, 1.28B active per token), a dropless mixture of experts.

    python tools/estimate.py --config=configs/olmoe_1b_7b.py --target=v5p-64
    python tools/compile.py --config=configs/olmoe_1b_7b.py --target=v5p-64   # on a CPU
    python tools/compile.py --config=configs/olmoe_1b_7b.py --target=v5p-128 \\
        --config.mesh.shape='(-1,16,1)' --config.train.grad_accum=16
    python -m jaxlm.main --config=configs/olmoe_1b_7b.py   # on every host of the slice

Model: allenai/OLMoE-1B-7B-0924's config.json: vocabulary 50,304, d 2048, 16 layers, 16 heads
of 128 (no grouped-query attention), RMSNorm over all of q and k (qk_norm full), RoPE theta
10,000, untied output head; every layer sparse: 64 SwiGLU experts of width 1,024, each token
routed to 8 by a softmax router whose top-8 weights are not renormalised, dropless. Balance:
the load-balance loss at 0.01 and the router z-loss at 0.001, as OLMoE. 6,919,161,856
parameters, 1,282,017,280 of them active per token (tests/test_estimate.py counts both).
Hardware: a TPU v5p-64 slice (32 chips). `ep_fsdp` on a (4, 8, 1) mesh: the batch split 32
ways, every weight split 8 ways over `fsdp`, the experts whole (8 per chip); dropless
dispatch gathers the tokens of the 8 chips of an expert group and runs the chip's own experts
as megablox grouped matmuls (`grouped_matmul=auto`).
Every block is rematerialised; each chip takes one 4,096-token sequence per micro-batch.
On v5p-128 (a 4x4x4 torus, whose mesh axes must be products of its sides: no axis of 8) the
expert groups are 16 chips, mesh (4, 16, 1), with grad_accum 16.
Batch: 1,024 sequences x 4,096 tokens = 4.19M tokens per step (OLMoE's). Tokens: 60,000 steps
= 252B tokens (OLMoE trained 5.1T; raise train.steps for that).
On TPU, by the TPU compiler (tools/compile.py on a CPU; docs/perf.md): 30.7 GiB per chip on
v5p-64 and 22.5 GiB on v5p-128 with the command above (planner 30.8 and 22.7).
"""

from configs import base


def get_config():
    c = base.get_config()
    c.name = "olmoe_1b_7b"

    c.model.d_model = 2048  # D
    c.model.n_layers = 16
    c.model.n_heads = 16  # H
    c.model.n_kv_heads = 16  # K: full multi-head attention
    c.model.head_dim = 128  # E
    c.model.d_ff = 1024  # F: the experts' width (no dense MLP layer)
    c.model.max_seq_len = 4096  # OLMoE's pretraining context
    c.model.rope_theta = 10000.0
    c.model.norm_eps = 1e-5
    c.model.qk_norm = "full"  # RMSNorm over all of q and all of k (OLMo / OLMoE)
    c.model.tie_embeddings = False
    c.model.dtype = "bfloat16"  # compute dtype; parameters and optimizer state stay fp32
    c.model.remat = "full"  # keep each block's input only
    c.model.scan_layers = True  # one scanned block: compile time flat in depth

    c.model.moe.n_experts = 64  # X
    c.model.moe.top_k = 8
    c.model.moe.expert_d_ff = 1024
    c.model.moe.normalize_top_k = False  # OLMoE weights by the raw softmax scores
    c.model.moe.aux_loss_coef = 0.01  # OLMoE's load-balance loss weight
    c.model.moe.z_loss_coef = 0.001  # OLMoE's router z-loss weight
    c.model.moe.capacity_factor = 0.0  # dropless
    c.model.moe.grouped_matmul = "auto"  # megablox gmm on TPU, ragged_dot on GPU

    c.tokenizer.vocab_size = 50304  # OLMoE's (GPT-NeoX tokenizer, padded)

    c.optim.lr = 4e-4  # OLMoE's peak learning rate
    c.optim.init_lr = 0.0
    c.optim.min_lr_ratio = 0.1
    c.optim.warmup_steps = 2500  # ~10B tokens
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
    c.mesh.shape = (-1, 8, 1)  # expert groups of 8 chips; data takes the rest
    return c

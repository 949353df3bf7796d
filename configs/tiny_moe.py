"""Tiny mixture-of-experts on the Python standard library: configs/tiny.py with each MLP
replaced by 8 experts, top-2, at the same active parameters.

    python -m jaxlm.main --config=configs/tiny_moe.py

Hardware: any CPU. Data, tokenizer, schedule, batches and evaluation: those of configs/tiny.py
(250 steps of 16 x 256 tokens), so the two runs see the same tokens in the same order; each
step is one 16-row batch here, where tiny computes it as two micro-batches of 8 (the MoE step
gained nothing from them: 1.09x dearer, measured beside another job, and its router statistics
and bias step then see the whole batch).
Model: 3 layers, d=384, every layer sparse: 8 SwiGLU experts of width 512 (half tiny's d_ff of
1024), each token routed to 2 of them by a softmax router (fp32), dropless. A token meets
2 x 3 x 384 x 512 expert weights per layer, exactly tiny's dense MLP, plus the 384 x 8 router
(+9,216 active parameters in all, 0.15%); 16.9M parameters in all against tiny's 6.3M.
Balance: the Switch/OLMoE auxiliary loss at 0.01, the router z-loss at 0.001 and DeepSeek-V3's
selection-bias step (`moe.bias_update_rate` 0.01 per step); the train log reports
moe_balance_loss, moe_z_loss, moe_dropped and moe_load_max_over_mean (1 is perfect balance)
every log line. Optimizer: Muon on the attention matrices and on each expert's matrices, AdamW
on the embedding, norms and router.

Measured (2-core Xeon VM, 2026-12-08, beside other jobs; losses do not depend on the load):
final held-out 1.924 bits/byte (loss 3.8962) against tiny's 1.928 (3.9039) on the same tokens,
0.004 bits/byte lower (0.2%): at this scale and length the experts only just pay. Expert load
max/mean: 1.86 at step 30 (the end of warmup), 1.65 at 40, at most 1.37 from step 50 on, 1.19
at the end. With the bias step at DeepSeek-V3's 0.001 it first reached 1.5 at step 80; at 0.03
it overshoots (2.34 at step 30). A step costs 1.58x tiny's (`benchmarks/bench.py --steps=6
--rounds=3 --split=false`, same sitting, 2026-12-07: 4,138 vs 2,622 ms; tiny's step is cheaper
now, docs/perf.md has the new ratio).
"""

from configs import tiny


def get_config():
    c = tiny.get_config()
    c.name = "tiny_moe"
    c.model.moe.n_experts = 8  # X routed experts per layer
    c.model.moe.top_k = 2  # 2 x 512 = tiny's d_ff of 1024 per token
    c.model.moe.expert_d_ff = 512  # half tiny's d_ff: the same active MLP weights
    c.model.moe.aux_loss_coef = 0.01  # load-balance loss (Switch/OLMoE), as OLMoE
    c.model.moe.z_loss_coef = 0.001  # keeps router logits small (ST-MoE's value)
    c.model.moe.bias_update_rate = 0.01  # 10x DeepSeek-V3's: balanced by step 50, not 80
    c.train.grad_accum = 1  # one 16-row batch: the MoE step gains nothing from micro-batches
    return c

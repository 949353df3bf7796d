"""Tiny mixture-of-experts on the Python standard library: configs/tiny.py with each MLP
replaced by 8 experts, top-2, at the same active parameters.

    python -m jaxlm.main --config=configs/tiny_moe.py

Hardware: any CPU. Data, tokenizer, schedule, batches and evaluation: those of configs/tiny.py
(205 steps of 16 x 256 tokens), so the two runs see the same tokens in the same order.
Model: 3 layers, d=384, every layer sparse: 8 SwiGLU experts of width 512 (half tiny's d_ff of
1024), each token routed to 2 of them by a softmax router (fp32), dropless. A token meets
2 x 3 x 384 x 512 expert weights per layer, exactly tiny's dense MLP, plus the 384 x 8 router
(+9,216 active parameters in all, 0.15%); 16.9M parameters in all against tiny's 6.3M.
Balance: the Switch/OLMoE auxiliary loss at 0.01, the router z-loss at 0.001 and DeepSeek-V3's
selection-bias step (`moe.bias_update_rate` 0.001 per step); the train log reports
moe_balance_loss, moe_z_loss, moe_dropped and moe_load_max_over_mean (1 is perfect balance)
every log line. Optimizer: Muon on the attention matrices and on each expert's matrices, AdamW
on the embedding, norms and router.

Measured (2-core Xeon VM, 2026-12-08, beside other jobs; losses do not depend on the load):
final held-out 2.002 bits/byte (loss 4.0538) against tiny's 2.0034 (4.0568) on the same tokens,
0.0014 bits/byte lower (0.07%): at this scale and length the experts only just pay. Expert load
max/mean: 2.24 at step 10, 1.81 at step 60, at most 1.5 from step 100 on (1.38 at most, 1.28 at
the end). Without the bias step (2026-12-07, rows packed end to end) it stayed above 1.5
throughout (1.81 at the end). A step costs 1.58x tiny's (`benchmarks/bench.py --steps=6
--rounds=3 --split=false`, same sitting, 2026-12-07: 4,138 vs 2,622 ms).
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
    c.model.moe.bias_update_rate = 0.001  # DeepSeek-V3's value: load max/mean 1.81 -> 1.28
    return c

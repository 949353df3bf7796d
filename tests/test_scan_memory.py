"""Scanned layers cost no memory: the TPU compiler (libtpu, compile-only devices) gives a
scanned step no more temporaries per chip than the same step unrolled (remat="none", the policy
that was 1.64x on llama_1b; dots and full are in docs/perf.md's table, kept out of the suite's
time).

The model is llama_1b's step in miniature: bf16, splash attention, fsdp on v5p-8, two
micro-batches of one sequence per chip, an MLP four times wider than the model. Before the
scan had a policy for `remat="none"`, its temporaries here were 1.58x the unrolled step's
(the SwiGLU and norm intermediates of every layer stacked for the backward pass).
"""

from jaxlm import aot
from tests.helpers import tiny_config


def small_config(scan_layers: bool, remat: str):
    """Two layers whose heads (128 wide) and length (256) splash tiles, d_ff = 4 d_model."""
    c = tiny_config(
        d_model=256,
        n_heads=4,
        n_kv_heads=2,
        head_dim=128,
        d_ff=1024,
        max_seq_len=256,
        scan_layers=scan_layers,
        remat=remat,
    )
    c.model.dtype = "bfloat16"
    c.model.attention = "auto"  # splash on a TPU target
    c.tokenizer.vocab_size = 1024
    c.train.seq_len = 256
    c.train.batch_size = 8
    c.train.grad_accum = 2  # the layer scan runs inside the accumulation scan, as in llama_1b
    c.mesh.preset = "fsdp"
    c.mesh.shape = (1, -1, 1)
    return c


def test_scanned_temporaries_stay_within_a_tenth_of_unrolled():
    memory = {
        scan: aot.compile_step(small_config(scan, "none"), "v5p-8", with_cost=False).memory
        for scan in (True, False)
    }
    scanned, unrolled = memory[True], memory[False]
    assert scanned["arguments"] == unrolled["arguments"]  # the same state, stacked or not
    assert scanned["temp"] <= 1.1 * unrolled["temp"], (scanned["temp"], unrolled["temp"])

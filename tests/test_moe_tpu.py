"""MoE on TPU: `grouped_matmul=auto` reaches a TPU slice as the Pallas megablox kernels (Mosaic
custom calls, one group of experts per device under expert parallelism), and the kernel, run
here in interpret mode, computes what `jax.lax.ragged_dot` does, gradients included.

libtpu comes with the [test] extra: without it the compile test fails with the sentence
`hardware.target_devices` raises, rather than skip.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import hardware, moe, sharding, train
from jaxlm import spec as run_spec
from tests.helpers import tiny_config

EXPERTS, CHIPS = 8, 4  # v5e-4 under ep_fsdp: two whole experts per chip


def test_auto_picks_the_kernel_each_platform_has():
    assert moe.default_for("tpu") == "gmm"
    assert moe.default_for("gpu") == "ragged"
    assert moe.default_for("cpu") == "tiled"  # CPU numerics stay those of the tiled path


def test_megablox_gmm_equals_ragged_dot_in_values_and_gradients():
    # 41 rows (padded to a 128-row tile inside), an empty group, 6 rows past the groups.
    D, F = 256, 128  # whole 128-lane blocks, as the kernel tiles them on a TPU
    group_sizes = jnp.array([9, 0, 17, 1, 5, 3], jnp.int32)
    keys = jax.random.split(jax.random.key(0), 3)
    xs, w = jax.random.normal(keys[0], (41, D)), jax.random.normal(keys[1], (6, D, F))
    probe = jax.random.normal(keys[2], (41, F))

    def run(implementation):
        def loss(xs, w):
            out = moe.grouped_matmul(xs, w, group_sizes, implementation)
            return jnp.sum(out * probe), out

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(xs, w)

    (_, out), (dxs, dw) = run("gmm")
    (_, out_ref), (dxs_ref, dw_ref) = run("ragged")
    np.testing.assert_array_equal(out[35:], 0.0)  # rows past the groups: no expert's
    np.testing.assert_array_equal(dw[1], 0.0)  # the empty group gets no gradient
    for got, want in ((out, out_ref), (dxs, dxs_ref), (dw, dw_ref)):
        scale = np.abs(want).max()
        assert scale > 1.0
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)


def moe_tpu_config():
    """Two sparse bf16 layers whose widths (256, experts 128) the kernel tiles in whole blocks."""
    c = tiny_config(d_model=256, n_heads=2, n_kv_heads=1, head_dim=128, d_ff=256, max_seq_len=128)
    c.model.dtype = "bfloat16"
    c.model.moe.update(n_experts=EXPERTS, top_k=2, expert_d_ff=128)  # grouped_matmul: auto
    c.tokenizer.vocab_size = 512
    c.train.seq_len = 128
    c.mesh.preset = "ep_fsdp"
    c.mesh.shape = (1, -1, 1)
    return c


def test_expert_parallel_step_compiles_to_megablox_mosaic_kernels():
    config = moe_tpu_config()
    target = hardware.parse_target(f"v5e-{CHIPS}")
    mesh = sharding.make_mesh(config.mesh.shape, hardware.target_devices(target))
    setup = train.Setup(run_spec.build(config), 512, mesh, platform="tpu")
    hlo = setup.lower_train_step().compile().as_text()
    kernels = re.findall(r"%(t?gmm)(?:\.\d+)? = (\w+)\[([\d,]+)\]\S* custom-call\(", hlo)
    calls = [line for line in hlo.splitlines() if 'custom_call_target="tpu_custom_call"' in line]
    assert len(calls) == len(kernels)  # every Mosaic call is one of the grouped matmuls
    names = [name for name, _, _ in kernels]
    # Per layer: gate, up and down forward; their rows' gradients (gmm) and weights' (tgmm).
    layers = config.model.n_layers
    assert names.count("gmm") == 6 * layers and names.count("tgmm") == 3 * layers
    # Each chip computes the weight gradients of its own EXPERTS / CHIPS experts, in bf16.
    local = EXPERTS // CHIPS
    tgmm_shapes = {(dtype, dims) for name, dtype, dims in kernels if name == "tgmm"}
    assert tgmm_shapes == {("bf16", f"{local},256,128"), ("bf16", f"{local},128,256")}
    assert "ragged-dot" not in hlo and "ragged_dot" not in hlo

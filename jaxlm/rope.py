"""Rotary position embeddings (Hugging Face "rotate half" layout), with angles exact beyond fp32.

Shapes: B batch, L length, N heads, E head dim.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def frequencies(
    head_dim: int, theta: float, scaling: tuple[float, float, float, int] | None
) -> np.ndarray:
    """Inverse frequencies (E/2,) in float64, with Llama-3 long-context scaling when configured
    (`scaling` = factor, low_freq_factor, high_freq_factor, original context length).

    Computed on the host in float64: they are constants of the program, and `cos_sin` needs
    them to more than fp32 precision.
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    inv_freq = 1.0 / theta**exponents
    if scaling is None:
        return inv_freq
    factor, low_freq_factor, high_freq_factor, original_len = scaling
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = original_len / low_freq_factor
    high_freq_wavelen = original_len / high_freq_factor
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    smooth = (original_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    is_medium = (wavelen <= low_freq_wavelen) & (wavelen >= high_freq_wavelen)
    return np.where(is_medium, interpolated, scaled)


def cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos and sin of the angles positions * inv_freq, (B, L, E/2) fp32 each.

    Why not `cos(positions * inv_freq)` in fp32: the angle itself is rounded to fp32, an error
    of up to half an ulp of the angle (1.2e-4 rad at position 2048, 4e-3 at 65536) that no later
    step recovers; over 30 layers it was the largest source of logit error against a float64
    reference. Here the angle is carried as hi + lo, exactly: hi = fl(p * f_hi), lo its rounding
    error (Dekker's exact product, with p and f_hi split into 12-bit halves so every partial
    product is exact in fp32) plus p * f_lo, the part of the float64 frequency fp32 cannot hold.
    cos(hi + lo) and sin(hi + lo) then follow from cos(hi), sin(hi) by a second-order Taylor step
    in lo, accurate to ~1e-7 for positions below 2**17. A few multiplies on (B, L, E/2), computed
    once per forward pass: no measurable cost next to the matmuls.
    """
    f = np.asarray(inv_freq, np.float64)
    f_hi = f.astype(np.float32)
    f_lo = (f - f_hi).astype(np.float32)
    f_hi1 = (f_hi.view(np.uint32) & np.uint32(0xFFFFF000)).view(np.float32)  # top 12 bits
    f_hi2 = f_hi - f_hi1  # the other 12 bits (exact)
    p = positions.astype(jnp.int32)[..., None]  # (B, L, 1); positions < 2**24
    p_hi = (p & ~0xFFF).astype(jnp.float32)  # 12 significant bits
    p_lo = (p & 0xFFF).astype(jnp.float32)
    p32 = p.astype(jnp.float32)
    hi = p32 * f_hi  # (B, L, E/2)
    err = (((p_hi * f_hi1 - hi) + p_hi * f_hi2) + p_lo * f_hi1) + p_lo * f_hi2  # p*f_hi - hi
    lo = err + p32 * f_lo
    cos_hi, sin_hi = jnp.cos(hi), jnp.sin(hi)
    half_lo2 = 0.5 * lo * lo
    cos = cos_hi - sin_hi * lo - cos_hi * half_lo2
    sin = sin_hi + cos_hi * lo - sin_hi * half_lo2
    return cos, sin


def apply(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotates x (B, L, N, E) by `cos_sin`'s (cos, sin); "rotate half" layout as in HF."""
    cos, sin = (t[:, :, None, :] for t in rope)  # (B, L, 1, E/2)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)

"""Rotary position embeddings (Hugging Face "rotate half" layout), with angles exact beyond fp32,
and the RoPE scaling rules of Hugging Face: Llama 3, linear and YaRN.

`rope_scaling` (ModelConfig, stages, checkpoint metadata) is a hashable tuple, as `parse_scaling`
returns it:
  (factor, low_freq_factor, high_freq_factor, original_max_pos)    Llama 3 (4 numbers)
  ("linear", factor)                                               positions divided by factor
  ("yarn", factor, original_max_pos, beta_fast, beta_slow, attention_factor, truncate)
      YaRN; a config may stop after original_max_pos (defaults 32, 1, None, True as in HF);
      attention_factor None is HF's 0.1 ln(factor) + 1, applied to cos and sin.

Shapes: B batch, L length, N heads, E head dim.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.errors import ConfigError, ConvertError

YARN_DEFAULTS = (32.0, 1.0, None, True)  # beta_fast, beta_slow, attention_factor, truncate
FORMS = (
    "None, Llama 3's (factor, low_freq_factor, high_freq_factor, original_max_pos), "
    "('linear', factor) or ('yarn', factor, original_max_pos[, beta_fast, beta_slow, "
    "attention_factor, truncate])"
)


def parse_scaling(value: Any, key: str = "model.rope_scaling") -> tuple | None:
    """The canonical tuple of any accepted `rope_scaling` form (a list, as JSON holds it, too).

    Raises:
      ConfigError: an unsupported kind (dynamic, longrope, ...) or a malformed value, in one
        sentence naming `key`.
    """
    if value is None:
        return None
    if not isinstance(value, (tuple, list)) or not value:
        raise ConfigError(f"{key}={value!r} must be {FORMS}.")
    kind, args = (value[0], tuple(value[1:])) if isinstance(value[0], str) else ("llama3", value)
    arity = {"llama3": (4, 4), "linear": (1, 1), "yarn": (2, 6)}
    if kind not in arity:
        raise ConfigError(
            f"{key}={tuple(value)!r}: RoPE scaling type {kind!r} is not supported; use {FORMS}."
        )
    low, high = arity[kind]
    if not low <= len(args) <= high:
        raise ConfigError(
            f"{key}={tuple(value)!r} has {len(args)} values after the type; use {FORMS}."
        )
    if kind == "llama3":
        factor, low_freq, high_freq, original = args
        out = (
            _number(factor, key, "factor"),
            _number(low_freq, key, "low_freq_factor"),
            _number(high_freq, key, "high_freq_factor"),
            _whole(original, key),
        )
        if not out[2] > out[1]:
            raise ConfigError(
                f"{key}={tuple(value)!r}: high_freq_factor must exceed low_freq_factor."
            )
        return out
    if kind == "linear":
        return ("linear", _number(args[0], key, "factor"))
    args = args + YARN_DEFAULTS[len(args) - 2 :]
    factor, original, beta_fast, beta_slow, attention_factor, truncate = args
    out = (
        "yarn",
        _number(factor, key, "factor"),
        _whole(original, key),
        _number(beta_fast, key, "beta_fast"),
        _number(beta_slow, key, "beta_slow"),
        None if attention_factor is None else _number(attention_factor, key, "attention_factor"),
        truncate,
    )
    if not out[3] > out[4]:
        raise ConfigError(f"{key}={tuple(value)!r}: beta_fast must exceed beta_slow.")
    if not isinstance(truncate, bool):
        raise ConfigError(f"{key}={tuple(value)!r}: truncate must be True or False.")
    return out


def _number(value: Any, key: str, name: str) -> float:
    if not _finite(value) or not value > 0:
        raise ConfigError(f"{key}: {name}={value!r} must be a positive number.")
    return float(value)


def _whole(value: Any, key: str) -> int:
    if not _finite(value) or value != int(value) or value <= 0:
        raise ConfigError(f"{key}: original_max_pos={value!r} must be a positive whole number.")
    return int(value)


def _finite(value: Any) -> bool:
    """A real number (not a bool, a string or None), neither infinite nor NaN."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def scaling_from_hf(
    params: dict[str, Any], max_position_embeddings: Any, where: str
) -> tuple | None:
    """The `rope_scaling` tuple of a Hugging Face `rope_scaling` / `rope_parameters` dict
    (`where` names it in errors); None for rope_type default.

    Raises:
      ConvertError: a type or option jaxlm does not implement, or a field it needs is missing.
    """
    rope_type = params.get("rope_type", params.get("type", "default"))
    original = params.get("original_max_position_embeddings", max_position_embeddings)
    if rope_type == "default":
        return None
    if rope_type not in ("llama3", "linear", "yarn"):
        raise ConvertError(
            f"{where}.rope_type={rope_type!r} is not supported; jaxlm implements llama3, linear "
            "and yarn RoPE scaling, or none."
        )
    for option in ("mscale", "mscale_all_dim"):
        if params.get(option) and rope_type == "yarn":
            raise ConvertError(f"{where}.{option} (DeepSeek's YaRN variant) is not supported.")
    if original is None and rope_type != "linear":
        raise ConvertError(
            f"{where} of type {rope_type} lacks the field 'original_max_position_embeddings'."
        )
    try:
        if rope_type == "llama3":
            keys = ("factor", "low_freq_factor", "high_freq_factor")
            value: tuple = (*(params[k] for k in keys), original)
        elif rope_type == "linear":
            value = ("linear", params["factor"])
        else:  # HF: a missing factor is the length ratio; beta 0 or None is the default
            factor = params.get("factor")
            if factor is None and max_position_embeddings:
                factor = max_position_embeddings / original
            value = (
                "yarn",
                factor,
                original,
                params.get("beta_fast") or YARN_DEFAULTS[0],
                params.get("beta_slow") or YARN_DEFAULTS[1],
                params.get("attention_factor"),
                params.get("truncate", True),
            )
        return parse_scaling(value, where)
    except KeyError as e:
        raise ConvertError(f"{where} of type {rope_type} lacks the field {e}.") from None
    except ConfigError as e:
        raise ConvertError(str(e)) from None


def scaling_to_hf(scaling: tuple | None) -> dict[str, Any] | None:
    """The Hugging Face `rope_scaling` dict of a canonical `rope_scaling` tuple (None: none),
    read back by `scaling_from_hf` as the same tuple."""
    if scaling is None:
        return None
    if scaling[0] == "linear":
        return {"rope_type": "linear", "factor": scaling[1]}
    if scaling[0] == "yarn":
        _, factor, original, beta_fast, beta_slow, attention_factor, truncate = scaling
        out = {
            "rope_type": "yarn",
            "factor": factor,
            "original_max_position_embeddings": original,
            "beta_fast": beta_fast,
            "beta_slow": beta_slow,
        }
        if attention_factor is not None:
            out["attention_factor"] = attention_factor
        if not truncate:  # written only when off: transformers before 4.57 always truncate
            out["truncate"] = False
        return out
    factor, low, high, original = scaling
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original,
    }


def frequencies(head_dim: int, theta: float, scaling: tuple | None) -> np.ndarray:
    """Inverse frequencies (E/2,) in float64 under a canonical `rope_scaling` (see the module
    docstring), as Hugging Face's rope init functions define them.

    Computed on the host in float64: they are constants of the program, and `cos_sin` needs
    them to more than fp32 precision.
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    inv_freq = 1.0 / theta**exponents
    if scaling is None:
        return inv_freq
    if scaling[0] == "linear":
        return inv_freq / scaling[1]
    if scaling[0] == "yarn":
        return _yarn(inv_freq, head_dim, theta, scaling)
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


def _yarn(inv_freq: np.ndarray, head_dim: int, theta: float, scaling: tuple) -> np.ndarray:
    """YaRN ("NTK-by-parts"): dimensions turning more than beta_fast times over the original
    length keep their frequency, those turning fewer than beta_slow times are divided by
    `factor`, and a linear ramp over dimension index blends the ones between."""
    _, factor, original, beta_fast, beta_slow, _, truncate = scaling

    def dim_of(turns: float) -> float:  # the dimension that turns `turns` times in `original`
        return head_dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as HF: avoids a zero-width ramp
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    return inv_freq / factor * ramp + inv_freq * (1 - ramp)


def attention_factor(scaling: tuple | None) -> float:
    """The factor YaRN multiplies cos and sin by (so q.k by its square); 1 for other kinds."""
    if scaling is None or scaling[0] != "yarn":
        return 1.0
    factor, given = scaling[1], scaling[5]
    if given is not None:
        return given
    return 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0


def cos_sin(
    positions: jax.Array, inv_freq: np.ndarray, scale: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """cos and sin of the angles positions * inv_freq, (B, L, E/2) fp32 each, times `scale`
    (YaRN's `attention_factor`).

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
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos, sin


def apply(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotates x (B, L, N, E) by `cos_sin`'s (cos, sin); "rotate half" layout as in HF."""
    cos, sin = (t[:, :, None, :] for t in rope)  # (B, L, 1, E/2)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)

"""Shared float64 building blocks of the five families (MODEL_NOTES.md section 0).

Pure NumPy. Every function takes and returns float64 arrays; nothing here rounds unless asked to
(`round_to`), which is how the rounding floor is made.
"""
from __future__ import annotations

import math

import numpy as np

from . import dtypes

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)  # 0.7978845608028654, full double precision
MEGATRON_SQRT_2_OVER_PI = 0.79788456  # Megatron's truncated constant (MODEL_NOTES section 5b)
GELU_CUBIC = 0.044715
GELU_FAST_C = 0.7978845608  # HF FastGELU's own rounding of sqrt(2/pi)


# ----------------------------------------------------------------------------- layer norm
def layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    """torch.nn.LayerNorm: biased variance over the last axis."""
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * gamma + beta


# ----------------------------------------------------------------------------- activations
def gelu_new(x: np.ndarray) -> np.ndarray:
    """HF gelu_new (also OpenAI GPT's "gelu"): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + np.tanh(SQRT_2_OVER_PI * (x + GELU_CUBIC * x**3)))


def gelu_fast(x: np.ndarray) -> np.ndarray:
    """HF gelu_fast: 0.5 x (1 + tanh(x 0.7978845608 (1 + 0.044715 x^2)))."""
    return 0.5 * x * (1.0 + np.tanh(x * GELU_FAST_C * (1.0 + GELU_CUBIC * x * x)))


def gelu_megatron(x: np.ndarray) -> np.ndarray:
    """Megatron's scripted gelu: x 0.5 (1 + tanh(0.79788456 x (1 + 0.044715 x x)))."""
    return x * 0.5 * (1.0 + np.tanh(MEGATRON_SQRT_2_OVER_PI * x * (1.0 + GELU_CUBIC * x * x)))


_erf = np.frompyfunc(math.erf, 1, 1)


def gelu_erf(x: np.ndarray) -> np.ndarray:
    """Exact gelu: 0.5 x (1 + erf(x / sqrt(2)))."""
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(np.float64))


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


ACTIVATIONS = {
    "gelu_new": gelu_new,
    "gelu_pytorch_tanh": gelu_new,  # same function; torch evaluates it in one kernel
    "gelu_fast": gelu_fast,
    "gelu_megatron": gelu_megatron,
    "gelu": gelu_erf,
    "relu": relu,
    "silu": silu,
    "swish": silu,
}


# ----------------------------------------------------------------------------- softmax and masks
def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Softmax where -inf entries get weight exactly 0; a row with no finite entry gives all zeros
    (such rows belong to padded queries and are never compared)."""
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(invalid="ignore", over="ignore"):  # +inf scores (an overflowed floor) give nan
        e = np.exp(x - m)
        s = e.sum(axis=axis, keepdims=True)
        return e / np.where(s > 0, s, 1.0)


def visible_keys(
    q_index: np.ndarray, k_len: int, key_mask: np.ndarray | None, window: int | None
) -> np.ndarray:
    """Boolean [B or 1, 1, Tq, Tk]: may query at absolute index i see key j?

    Causal j <= i; for local (windowed) attention also i - j < window; and the key is a real token
    (key_mask[b, j] == 1). Indices are positions in the sequence (past included), not position ids.
    """
    i = np.asarray(q_index)[:, None]
    j = np.arange(k_len)[None, :]
    vis = j <= i
    if window is not None:
        vis &= (i - j) < window
    vis = vis[None, None]
    if key_mask is not None:
        vis = vis & (np.asarray(key_mask)[:, None, None, :] != 0)
    return vis


def split_heads(x: np.ndarray, n_head: int) -> np.ndarray:
    """(B, T, d) -> (B, H, T, hd), head-major split of the feature axis."""
    b, t, d = x.shape
    return x.reshape(b, t, n_head, d // n_head).transpose(0, 2, 1, 3)


def split3(x: np.ndarray, d: int):
    """Column split of a fused q|k|v projection: [0,d), [d,2d), [2d,3d)."""
    return x[..., :d], x[..., d : 2 * d], x[..., 2 * d :]


def merge_heads(x: np.ndarray) -> np.ndarray:
    """(B, H, T, hd) -> (B, T, H*hd)."""
    b, h, t, hd = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, t, h * hd)


# ----------------------------------------------------------------------------- rotary (GPT-J)
def rotary_sin_cos(positions: np.ndarray, rotary_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """sin, cos of shape positions.shape + (rotary_dim,), each frequency repeated twice
    (interleaved), in float64: theta_{p,j} = p * 10000^(-2j/R)."""
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim))
    theta = np.asarray(positions, dtype=np.float64)[..., None] * inv_freq
    return np.repeat(np.sin(theta), 2, axis=-1), np.repeat(np.cos(theta), 2, axis=-1)


def rotate_every_two(x: np.ndarray) -> np.ndarray:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    out = np.empty_like(x)
    out[..., 0::2] = -x[..., 1::2]
    out[..., 1::2] = x[..., 0::2]
    return out


def apply_rotary(x: np.ndarray, sin: np.ndarray, cos: np.ndarray, rotary_dim: int) -> np.ndarray:
    """Interleaved-pair rotary on the first rotary_dim dims of each head.

    x: (B, H, T, hd); sin, cos: (B, T, R). Dims R..hd-1 pass through."""
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    s, c = sin[:, None], cos[:, None]
    rot = rot * c + rotate_every_two(rot) * s
    return np.concatenate([rot, rest], axis=-1)


# ----------------------------------------------------------------------------- rotary (GPT-NeoX)
def rotary_half_sin_cos(positions: np.ndarray, rotary_dim: int, base: float = 10000.0):
    """sin, cos of shape positions.shape + (rotary_dim,) for rotate-half rotary, float64:
    theta_{p,j} = p * base^(-2j/R), the R/2 frequencies laid out twice, [f0..f_{R/2-1} | f0..]."""
    inv_freq = 1.0 / (float(base) ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim))
    theta = np.asarray(positions, dtype=np.float64)[..., None] * inv_freq
    theta = np.concatenate([theta, theta], axis=-1)
    return np.sin(theta), np.cos(theta)


def rotate_half(x: np.ndarray) -> np.ndarray:
    """[x_0..x_{R/2-1} | x_{R/2}..x_{R-1}] -> [-x_{R/2}..-x_{R-1} | x_0..x_{R/2-1}]."""
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def apply_rotary_half(x: np.ndarray, sin: np.ndarray, cos: np.ndarray, rotary_dim: int):
    """Rotate-half rotary on the first rotary_dim dims of each head (x_j paired with x_{j+R/2}).

    x: (B, H, T, hd); sin, cos: (B, T, R). Dims R..hd-1 pass through."""
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    rot = rot * cos[:, None] + rotate_half(rot) * sin[:, None]
    return np.concatenate([rot, rest], axis=-1)


# ----------------------------------------------------------------------------- rounding (floor)
def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round float64 values to the nearest value of `dtype` (float16 / bfloat16), ties to even,
    with subnormals and overflow to +-inf, returned as float64. Pure bit arithmetic.

    float64 / float32 are accepted too (float32 through NumPy's own correctly rounded cast)."""
    dtype = dtypes.canonical(dtype)
    x = np.asarray(x, dtype=np.float64)
    if dtype == "float64":
        return x
    if dtype == "float32":
        return x.astype(np.float32).astype(np.float64)
    f = dtypes.facts(dtype)
    mant, emin, fmax = f.mantissa, f.min_exp, f.max
    shift = 52 - mant
    bits = x.view(np.int64)
    lsb = (bits >> shift) & 1
    bits = (bits + ((1 << (shift - 1)) - 1) + lsb) & ~np.int64((1 << shift) - 1)
    normal = bits.view(np.float64)
    # below the smallest normal: multiples of the smallest subnormal, ties to even (np.round)
    q = 2.0 ** (emin - mant)
    with np.errstate(over="ignore", invalid="ignore"):  # huge/inf x: the `normal` branch wins
        sub = np.round(x / q) * q
    out = np.where(np.abs(x) < 2.0**emin, sub, normal)
    out = np.where(np.abs(out) > fmax, np.copysign(np.inf, x), out)
    return np.where(np.isfinite(x), out, x)


def identity(x: np.ndarray) -> np.ndarray:
    return x


# Accumulation dtype of the rounding floor's GEMMs, per floor dtype. A half-precision GEMM
# accumulates in fp32, whose error is far below a half ulp: the floor takes the exact float64
# product and rounds it once (no entry). An fp32 GEMM accumulates in fp32, the output's own
# precision — there is no wider accumulator to round once from, and its error grows with the
# reduction length K (about sqrt(K/2) half-ulps for a running sum). The best an fp32
# implementation can do is therefore the product of its fp32 operands computed in fp32
# arithmetic: the floor runs that GEMM (NumPy's sgemm, FMA-based and K-blocked, i.e. among the
# more accurate fp32 kernels) and then applies the same single rounding as ever.
GEMM_ACCUMULATION = {"float32": np.float32}


def floor_matmul(a: np.ndarray, b: np.ndarray, dtype: str | None = None) -> np.ndarray:
    """a @ b as the rounding floor of `dtype` computes it (float64 result): exact float64 for
    half dtypes (and the float64 reference); for float32, float32 operands multiplied and
    accumulated in float32 (see GEMM_ACCUMULATION)."""
    acc = GEMM_ACCUMULATION.get(dtypes.canonical(dtype)) if dtype else None
    if acc is None:
        return a @ b
    return (np.asarray(a).astype(acc) @ np.asarray(b).astype(acc)).astype(np.float64)

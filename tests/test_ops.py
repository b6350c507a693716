"""`reference/ops.py` against values computed independently of it.

Each building block is checked against another implementation of the same math: Python's
`math` module, torch's float64 kernels, NumPy's float16 cast, exact rational arithmetic
(`fractions.Fraction`) for rounding, and plain loops written from MODEL_NOTES.md for rotary and
masks.

bfloat16 note: torch converts float64 -> bfloat16 through float32 (two roundings: 1 + 2^-8 +
2^-40 becomes 1.0, not the correctly rounded 1 + 2^-7), so torch is only an oracle for inputs
that are already float32; the general check is an exact rational one.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from parity.engine.budgets import tolerance
from reference import ops

EXACT = "float64_exact"


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# ----------------------------------------------------------------------------- activations
GELU_POINTS = [-10.0, -5.0, -2.7, -1.0, -0.5, -1e-3, 0.0, 1e-8, 1e-3, 0.5, 1.0, 2.7, 5.0, 10.0]


def test_gelu_erf_matches_math_erf_closed_form():
    x = np.array(GELU_POINTS)
    expected = [0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in GELU_POINTS]
    # the same function through erfc, a different evaluation: x * Phi(x) = 0.5 x erfc(-x/sqrt2)
    via_erfc = [0.5 * v * math.erfc(-v / math.sqrt(2.0)) for v in GELU_POINTS]
    got = ops.gelu_erf(x)
    assert got.dtype == np.float64
    assert rel_err(got, expected) <= tolerance(EXACT)
    assert rel_err(got, via_erfc) <= tolerance(EXACT)
    assert got[GELU_POINTS.index(0.0)] == 0.0


def test_gelu_erf_odd_part_identity():
    """x Phi(x) - (-x) Phi(-x) = x exactly in real arithmetic, for any x."""
    x = np.linspace(-8, 8, 161)
    assert rel_err(ops.gelu_erf(x) - ops.gelu_erf(-x), x) <= tolerance(EXACT)


def test_gelu_new_matches_torch_tanh_gelu_float64():
    x = np.linspace(-10, 10, 20001)
    t = torch.nn.functional.gelu(torch.from_numpy(x), approximate="tanh").numpy()
    assert np.max(np.abs(ops.gelu_new(x) - t)) <= tolerance("gelu_identity")
    # gelu_pytorch_tanh is the same function by construction
    assert ops.ACTIVATIONS["gelu_pytorch_tanh"] is ops.gelu_new


def test_gelu_megatron_gap_from_gelu_new_is_bounded_and_real():
    """Megatron's truncated constant moves the gelu by at most 2.6e-10 and at least visibly."""
    x = np.linspace(-10, 10, 200001)
    gap = np.abs(ops.gelu_new(x) - ops.gelu_megatron(x))
    assert gap.max() <= tolerance("megatron_gelu_gap")
    assert gap.max() > tolerance("megatron_gelu_gap_min")
    # written out independently: x 0.5 (1 + tanh(0.79788456 x (1 + 0.044715 x^2)))
    pts = [-3.0, -1.33, 0.7, 1.33, 4.0]
    mine = [v * 0.5 * (1 + math.tanh(0.79788456 * v * (1 + 0.044715 * v * v))) for v in pts]
    assert rel_err(ops.gelu_megatron(np.array(pts)), mine) <= tolerance(EXACT)


# ----------------------------------------------------------------------------- layer norm
def _rows(seed=0, shape=(5, 7, 24)):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) * rng.uniform(0.01, 100, size=shape[:-1] + (1,))
    return x + rng.normal(size=shape[:-1] + (1,)) * 10  # per-row offsets too


def test_layer_norm_unit_affine_gives_mean_zero_and_biased_variance():
    """gamma=1, beta=0: each row has mean 0 and mean square var / (var + eps) (biased var)."""
    x, eps = _rows(), 1e-5
    y = ops.layer_norm(x, np.ones(24), np.zeros(24), eps)
    var = x.var(axis=-1)  # numpy's default is the biased (/d) variance
    assert np.max(np.abs(y.mean(axis=-1))) <= tolerance(EXACT) * np.max(np.abs(y))
    assert rel_err((y**2).mean(axis=-1), var / (var + eps)) <= tolerance(EXACT)


def test_layer_norm_affine_mean_is_beta_mean_when_gamma_constant():
    x, eps = _rows(1), 1e-5
    beta = np.random.default_rng(2).normal(size=24)
    y = ops.layer_norm(x, np.full(24, 3.0), beta, eps)
    assert np.max(np.abs(y.mean(axis=-1) - beta.mean())) <= tolerance(EXACT) * np.max(np.abs(y))


def test_layer_norm_matches_torch_float64():
    x, eps = _rows(3), 1e-5
    rng = np.random.default_rng(4)
    g, b = 1 + 0.1 * rng.normal(size=24), rng.normal(size=24)
    t = torch.nn.functional.layer_norm(torch.from_numpy(x), (24,), torch.from_numpy(g),
                                       torch.from_numpy(b), eps).numpy()
    assert rel_err(ops.layer_norm(x, g, b, eps), t) <= tolerance(EXACT)


# ----------------------------------------------------------------------------- softmax
def test_softmax_rows_sum_to_one_and_match_torch():
    x = np.random.default_rng(5).normal(size=(4, 3, 9)) * 20
    p = ops.softmax(x)
    assert rel_err(p.sum(-1), np.ones((4, 3))) <= tolerance(EXACT)
    assert rel_err(p, torch.softmax(torch.from_numpy(x), -1).numpy()) <= tolerance(EXACT)


def test_softmax_masked_entries_are_exactly_zero_and_empty_rows_are_zero():
    x = np.random.default_rng(6).normal(size=(3, 6))
    x[0, [1, 4]] = -np.inf
    x[1, :] = -np.inf  # a padded query: no visible key at all
    x[2, :] = [1000.0, 0.0, -1000.0, 5.0, -np.inf, 700.0]  # large spread: no overflow
    p = ops.softmax(x)
    assert np.isfinite(p).all()
    assert (p[0, [1, 4]] == 0.0).all() and (p[0, [0, 2, 3, 5]] > 0).all()
    assert (p[1] == 0.0).all()
    assert p[2, 4] == 0.0 and p[2, 0] == 1.0
    for r in (0, 2):
        assert rel_err(p[r].sum(), 1.0) <= tolerance(EXACT)
    # the visible entries of row 0 are the softmax of those entries alone
    keep = np.array([0, 2, 3, 5])
    e = np.exp(x[0, keep] - x[0, keep].max())
    assert rel_err(p[0, keep], e / e.sum()) <= tolerance(EXACT)


# ----------------------------------------------------------------------------- rounding
# IEEE parameters, written here from the format definitions (not read from ops):
# (stored mantissa bits, minimum normal exponent, largest finite value)
FORMATS = {
    "float16": (10, -14, Fraction(65504)),
    "bfloat16": (7, -126, Fraction(2) ** 127 * (2 - Fraction(1, 2**7))),
}


def exact_round(x: float, fmt: str) -> float:
    """Round to nearest, ties to even, by exact rational arithmetic: the quantum at x's binade
    (or the subnormal quantum), the two neighbouring multiples, the nearer one (even on a tie),
    overflow to +-inf."""
    if math.isnan(x) or math.isinf(x) or x == 0.0:
        return x
    mant, emin, fmax = FORMATS[fmt]
    lead = math.frexp(abs(x))[1] - 1  # abs(x) in [2^lead, 2^(lead+1))
    q = Fraction(2) ** (max(lead, emin) - mant)
    f = Fraction(abs(x)) / q
    n = math.floor(f)
    rem = f - n
    if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and n % 2 == 1):
        n += 1
    r = n * q
    if r > fmax:
        return math.copysign(math.inf, x)
    return math.copysign(float(r), x)


def _from_bits(sign, exp, mant52):
    bits = (sign.astype(np.int64) << 63) | ((exp + 1023).astype(np.int64) << 52) | mant52
    return bits.view(np.float64)


def rounding_sample(fmt: str, n: int, seed: int) -> np.ndarray:
    """float64 values that probe every branch of a rounding routine: random values spanning
    subnormals to overflow, exact ties between neighbours (and one float64 ulp either side),
    the edges of the subnormal range and of the largest finite value, signed zeros, nan, inf."""
    rng = np.random.default_rng(seed)
    mant, emin, fmax = FORMATS[fmt]
    lo, hi = emin - mant - 3, int(math.log2(float(fmax))) + 3
    rand = _from_bits(rng.integers(0, 2, n), rng.integers(lo, hi, n),
                      rng.integers(0, 2**52, n, dtype=np.int64))
    # neighbours a < b of the format, from its own bit patterns; their midpoint is exact in float64
    if fmt == "float16":
        grid = np.arange(0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)
    else:
        grid = (np.arange(0x7F80, dtype=np.uint32) << 16).view(np.float32).astype(np.float64)
    i = rng.integers(0, grid.size - 1, n // 4)
    mid = (grid[i] + grid[i + 1]) / 2
    ties = np.concatenate([mid, np.nextafter(mid, np.inf), np.nextafter(mid, -np.inf)])
    ties = ties * rng.choice([-1.0, 1.0], ties.size)
    tiny = float(Fraction(2) ** (emin - mant))  # smallest subnormal
    big, ulp_top = float(fmax), float(Fraction(2) ** (int(math.log2(float(fmax))) - mant))
    edges = [0.0, -0.0, math.inf, -math.inf, math.nan, tiny, tiny / 2, tiny * 1.5, tiny / 4,
             np.nextafter(tiny / 2, 1.0), np.nextafter(tiny / 2, 0.0), 2.0**emin,
             np.nextafter(2.0**emin, 0.0), big, big + ulp_top / 2, np.nextafter(big + ulp_top / 2, 0),
             big + ulp_top, 5e-324, 1.7976931348623157e308, 1 + 2**-8 + 2**-40, 1 + 2**-11 + 2**-40]
    edges = np.array(edges + [-e for e in edges])
    return np.concatenate([rand, ties, edges])


def assert_bitwise_equal(got: np.ndarray, expected: np.ndarray, x: np.ndarray):
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    nan = np.isnan(expected)
    assert (np.isnan(got) == nan).all(), f"nan mismatch at {x[np.isnan(got) != nan][:5]}"
    diff = got[~nan].view(np.int64) != expected[~nan].view(np.int64)  # signed zeros too
    assert not diff.any(), (
        f"{int(diff.sum())} values differ, e.g. x={x[~nan][diff][:5]!r} "
        f"got={got[~nan][diff][:5]!r} expected={expected[~nan][diff][:5]!r}")


def test_round_to_float16_bitwise_equals_numpy_cast():
    x = rounding_sample("float16", 200_000, seed=7)
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16).astype(np.float64)
    assert_bitwise_equal(ops.round_to(x, "float16"), expected, x)


@pytest.mark.parametrize("fmt", ["float16", "bfloat16"])
def test_round_to_bitwise_equals_exact_rational_rounding(fmt):
    x = rounding_sample(fmt, 8_000, seed=8)
    expected = np.array([exact_round(float(v), fmt) for v in x])
    assert_bitwise_equal(ops.round_to(x, fmt), expected, x)


def test_round_to_bfloat16_equals_torch_on_float32_inputs():
    """For float32 inputs torch's bfloat16 cast is a single rounding, so it is an oracle there."""
    x = rounding_sample("bfloat16", 200_000, seed=9)
    with np.errstate(over="ignore"):
        x32 = x.astype(np.float32)
    expected = torch.from_numpy(x32).to(torch.bfloat16).to(torch.float64).numpy()
    assert_bitwise_equal(ops.round_to(x32.astype(np.float64), "bfloat16"), expected, x32)


def test_round_to_accepts_aliases_and_wider_dtypes():
    x = rounding_sample("float16", 1000, seed=10)
    assert_bitwise_equal(ops.round_to(x, "fp16"), ops.round_to(x, "float16"), x)
    assert_bitwise_equal(ops.round_to(x, "bf16"), ops.round_to(x, "bfloat16"), x)
    assert_bitwise_equal(ops.round_to(x, "float64"), x, x)
    with np.errstate(over="ignore"):
        assert_bitwise_equal(ops.round_to(x, "float32"),
                             x.astype(np.float32).astype(np.float64), x)


# ----------------------------------------------------------------------------- rotary (GPT-J)
def rotary_loop(x: np.ndarray, pos: np.ndarray, r: int) -> np.ndarray:
    """MODEL_NOTES section 4, literally: theta_{p,j} = p 10000^(-2j/R); for each pair
    (x_2j, x_2j+1) of the first R dims: x'_2j = x_2j cos - x_2j+1 sin,
    x'_2j+1 = x_2j+1 cos + x_2j sin; dims R..hd-1 unchanged. x: (B, H, T, hd); pos: (B, T)."""
    out = x.copy()
    b_, h_, t_, _ = x.shape
    for b in range(b_):
        for t in range(t_):
            p = int(pos[b, t])
            for j in range(r // 2):
                theta = p * 10000.0 ** (-2.0 * j / r)
                s, c = math.sin(theta), math.cos(theta)
                for h in range(h_):
                    x0, x1 = x[b, h, t, 2 * j], x[b, h, t, 2 * j + 1]
                    out[b, h, t, 2 * j] = x0 * c - x1 * s
                    out[b, h, t, 2 * j + 1] = x1 * c + x0 * s
    return out


def test_rotate_every_two_is_the_pair_rotation():
    x = np.random.default_rng(11).normal(size=(2, 3, 4, 10))
    y = ops.rotate_every_two(x)
    for j in range(5):
        assert np.array_equal(y[..., 2 * j], -x[..., 2 * j + 1])
        assert np.array_equal(y[..., 2 * j + 1], x[..., 2 * j])


@pytest.mark.parametrize("hd, r", [(12, 4), (6, 6), (24, 8), (10, 2)])
def test_apply_rotary_matches_loop_from_model_notes(hd, r):
    rng = np.random.default_rng(hd * 100 + r)
    x = rng.normal(size=(2, 3, 5, hd))
    pos = np.array([[0, 1, 2, 3, 4], [7, 8, 9, 40, 2047]])  # arbitrary, not necessarily 0..T-1
    sin, cos = ops.rotary_sin_cos(pos, r)
    assert sin.shape == cos.shape == (2, 5, r)
    got = ops.apply_rotary(x, sin, cos, r)
    assert rel_err(got, rotary_loop(x, pos, r)) <= tolerance(EXACT)
    assert np.array_equal(got[..., r:], x[..., r:])


# ----------------------------------------------------------------------------- masks
def visible_loop(q_index, k_len, key_mask, window, batch):
    out = np.zeros((batch, 1, len(q_index), k_len), bool)
    for b in range(batch):
        for a, i in enumerate(q_index):
            for j in range(k_len):
                ok = j <= i and (window is None or i - j < window)
                out[b, 0, a, j] = ok and (key_mask is None or key_mask[b, j] == 1)
    return out


@pytest.mark.parametrize("window", [None, 1, 3, 100])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("past", [0, 4])
def test_visible_keys_causal_local_and_padding(window, padded, past):
    t = 5
    k_len = past + t
    q_index = np.arange(past, past + t)
    key_mask = None
    if padded:  # left padding of 0, 2 and 6 positions (the last row is padded into the new part)
        key_mask = np.ones((3, k_len), np.int64)
        key_mask[1, :2] = 0
        key_mask[2, :6] = 0
    got = ops.visible_keys(q_index, k_len, key_mask, window)
    batch = 3 if padded else 1
    expected = visible_loop(q_index, k_len, key_mask, window, batch)
    assert got.shape == expected.shape
    assert np.array_equal(got, expected)

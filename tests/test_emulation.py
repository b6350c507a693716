"""CPU emulation of CUDA half precision, op by op (parity/subjects/EMULATION.md).

Each test computes the op with `parity.subjects.fast.Numerics(emulate=True)` and, independently, in
float64 NumPy rounded with `reference.ops.round_to` at exactly the points EMULATION.md documents
(an fp32 "opmath" result is `round_to(., "float32")`, a half store is `round_to(., dtype)`).
The two must agree bitwise.

Where the op involves a transcendental function or a reduction, torch's fp32 result is not
the correctly rounded one (an fp32 tanh or a sum of 768 terms is off by a few fp32 ulps), so an
element whose float64 value lies within that fp32 error of a half-precision rounding boundary
could legitimately round either way. Those elements (named "ambiguous") are excluded from the
bitwise check, their share is bounded, and everything else must be identical. GEMM tests use
inputs on a coarse grid (k/64, |k| <= 64, K = 64) so that fp32 accumulation is exact and the
check is bitwise on every element.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from parity.engine.budgets import tolerance
from parity.subjects.fast import (MEGATRON_SQRT_2_OVER_PI, SQRT_2_OVER_PI, Numerics,
                         megatron_gelu_form)
from reference.ops import round_to

# every op here runs on torch's fp32 (and, for `emulate=False`, half) CPU kernels, whose bits
# depend on the CPU kernel level: CI reruns this module under other levels (conftest MARKERS)
pytestmark = pytest.mark.cpu_kernels

HALVES = ("float16", "bfloat16")
FP32_ERR = "emulation_fp32_error"  # ulps (of the op's magnitude scale) an fp32 kernel may be off


def r32(x):
    return round_to(x, "float32")


def store(x, dt):
    """An elementwise kernel: computed in fp32 (opmath), written in the half dtype."""
    return round_to(r32(x), dt)


def c32(v: float) -> float:
    return float(np.float32(v))


def grid(rng, shape, dt):
    """Values k/64 with |k| <= 64: exact in fp16 and bf16, products and K=64 sums exact in fp32."""
    return rng.integers(-64, 65, size=shape) / 64.0


def halves(rng, shape, dt, scale=3.0):
    return round_to(rng.normal(size=shape) * scale, dt)


def emu(dt) -> Numerics:
    n = Numerics(dt, "cpu", emulate=True)
    assert n.emulate and n.phys == torch.float32
    return n


def t(a) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, np.float64)).float()  # exact: inputs are halves


def out(x: torch.Tensor) -> np.ndarray:
    return x.double().numpy()


def ambiguous(v, dt, scale):
    """v (float64) lies within the fp32 kernel error (FP32_ERR ulps of `scale`) of a `dt`
    rounding boundary: either rounding is a faithful fp32 kernel."""
    delta = tolerance(FP32_ERR, "ulps") * 2.0**-23 * np.abs(scale)
    return round_to(v - delta, dt) != round_to(v + delta, dt)


def gelu_scale(x, v):
    """0.5 x (1 + f(x)): f is off by about an ulp of 1 in fp32, so the result by that times
    |0.5 x|, plus the rounding of the result itself."""
    return 0.5 * np.abs(x) + np.abs(v)


def check_bitwise_except_ambiguous(got, model, amb):
    share = float(np.mean(amb))
    assert share <= tolerance(FP32_ERR, "max_ambiguous_share"), f"ambiguous share {share:.4f}"
    bad = (got != model) & ~amb
    assert not bad.any(), (f"{int(bad.sum())} of {bad.size} elements differ from the float64 "
                           f"model, e.g. got {got[bad][:3]} expected {model[bad][:3]}")


# ----------------------------------------------------------------------------- GEMMs
@pytest.mark.parametrize("dt", HALVES)
def test_gemm_with_bias_rounds_once(dt):
    rng = np.random.default_rng(1)
    x, w, b = grid(rng, (24, 64), dt), grid(rng, (64, 40), dt), grid(rng, (40,), dt)
    got = out(emu(dt).linear(t(x), t(w), t(b)))
    exact = x @ w + b  # exact in float64 and in fp32 on this grid
    assert np.array_equal(got, round_to(exact, dt))
    # the check can fail: rounding the product before adding the bias is a different result
    twice = round_to(round_to(x @ w, dt) + b, dt)
    assert (twice != got).any()


@pytest.mark.parametrize("dt", HALVES)
def test_baddbmm_applies_alpha_before_its_one_rounding(dt):
    rng = np.random.default_rng(2)
    hd = 12  # alpha = 1/sqrt(12) is not a power of two
    q, k = grid(rng, (2, 3, 20, 64), dt), grid(rng, (2, 3, 20, 64), dt)
    acc = q @ np.swapaxes(k, -1, -2)  # exact
    num = emu(dt)
    alpha = 1.0 / math.sqrt(hd)
    bad = out(num.baddbmm(t(q), t(np.swapaxes(k, -1, -2)), alpha))
    assert np.array_equal(bad, round_to(r32(acc * c32(alpha)), dt))
    # HF GPT-2 v5: matmul (rounded), then * scale (rounded again)
    mm = num.matmul(t(q), t(np.swapaxes(k, -1, -2)))
    mul = out(num.r(mm * num.c(hd ** -0.5)))
    assert np.array_equal(mul, store(round_to(acc, dt) * c32(hd ** -0.5), dt))
    # OpenAI GPT: matmul, then / sqrt(hd), which CUDA runs as * fp32 reciprocal
    div = out(num.div(mm, math.sqrt(hd)))
    inv = float(np.float32(1.0) / np.float32(math.sqrt(hd)))
    assert np.array_equal(div, store(round_to(acc, dt) * inv, dt))
    assert (bad != mul).any(), "baddbmm and matmul-then-scale must differ somewhere"


@pytest.mark.parametrize("dt", HALVES)
def test_power_of_two_scale_makes_baddbmm_and_matmul_agree(dt):
    """hd = 64 (GPT-2's released sizes): scaling by 1/8 is exact, so both orders agree."""
    rng = np.random.default_rng(3)
    q, kT = grid(rng, (1, 2, 16, 64), dt), grid(rng, (1, 2, 64, 16), dt)
    num = emu(dt)
    a = out(num.baddbmm(t(q), t(kT), 0.125))
    b = out(num.r(num.matmul(t(q), t(kT)) * 0.125))
    assert np.array_equal(a, b)


# ----------------------------------------------------------------------------- elementwise
@pytest.mark.parametrize("dt", HALVES)
def test_residual_add_rounds_its_output(dt):
    rng = np.random.default_rng(4)
    a = halves(rng, (4000,), dt, 1e3)
    b = halves(rng, (4000,), dt, 1e-2)  # magnitudes apart: fp32 then half is a double rounding
    got = out(emu(dt).r(t(a) + t(b)))
    assert np.array_equal(got, store(a + b, dt))


@pytest.mark.parametrize("dt", HALVES)
def test_pow3_is_two_roundings_like_cuda(dt):
    """CUDA's pow(x, 3.0) for half evaluates base*base*base in Half arithmetic."""
    rng = np.random.default_rng(5)
    x = halves(rng, (20000,), dt)
    got = out(emu(dt).pow3(t(x)))
    assert np.array_equal(got, store(store(x * x, dt) * x, dt))
    assert (got != round_to(x**3, dt)).any(), "two roundings must differ from one somewhere"


def _gelu_new_eager_model(x, dt):
    """HF NewGELU, op by op: 0.5*x; pow(x,3); 0.044715*p; x+.; sqrt(2/pi)*.; tanh; 1.0+.; *."""
    a = store(0.5 * x, dt)
    p = store(store(x * x, dt) * x, dt)
    u = store(c32(SQRT_2_OVER_PI) * store(x + store(c32(0.044715) * p, dt), dt), dt)
    th64 = np.tanh(r32(u))
    amb = ambiguous(th64, dt, th64)
    th = store(th64, dt)
    return store(a * store(1.0 + th, dt), dt), amb


@pytest.mark.parametrize("dt", HALVES)
def test_eager_gelu_new_rounds_after_every_op(dt):
    rng = np.random.default_rng(6)
    x = halves(rng, (50000,), dt, 1.5)
    got = out(emu(dt).gelu(t(x), "tanh", "gelu_new"))
    model, amb = _gelu_new_eager_model(x, dt)
    check_bitwise_except_ambiguous(got, model, amb)
    # and it is not the once-rounded gelu
    once = round_to(0.5 * x * (1 + np.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x**3))), dt)
    assert (got != once).mean() > 0.01


@pytest.mark.parametrize("dt", HALVES)
@pytest.mark.parametrize("activation", ["gelu_new", "gelu_megatron"])
def test_jit_gelu_is_fp32_inside_and_rounds_once(dt, activation):
    rng = np.random.default_rng(7)
    x = halves(rng, (50000,), dt, 1.5)
    num = emu(dt)
    got = out(num.gelu(t(x), "jit", activation))
    c = c32(MEGATRON_SQRT_2_OVER_PI if activation == "gelu_megatron" else SQRT_2_OVER_PI)
    # the Megatron form in fp32, every intermediate an fp32 value, one half rounding at the end
    inner = r32(r32(c * x) * r32(1.0 + r32(r32(c32(0.044715) * x) * x)))
    v = r32(r32(x * 0.5) * r32(1.0 + r32(np.tanh(inner))))
    check_bitwise_except_ambiguous(got, round_to(v, dt), ambiguous(v, dt, gelu_scale(x, v)))
    eager = out(num.gelu(t(x), "tanh", activation))
    assert (eager != got).mean() > 0.01, "fused (one rounding) and eager must differ"


@pytest.mark.parametrize("dt", HALVES)
@pytest.mark.parametrize("form", ["torch_tanh", "erf"])
def test_one_kernel_gelus_round_once(dt, form):
    from reference.ops import gelu_erf, gelu_new

    rng = np.random.default_rng(8)
    x = halves(rng, (50000,), dt, 1.5)
    got = out(emu(dt).gelu(t(x), form, "gelu_new"))
    exact = gelu_new(x) if form == "torch_tanh" else gelu_erf(x)
    check_bitwise_except_ambiguous(got, round_to(exact, dt),
                                   ambiguous(exact, dt, gelu_scale(x, exact)))


def test_megatron_form_in_fp32_matches_scripted_function_on_cpu():
    """The emulated jit gelu and the scripted function are the same fp32 expression."""
    from parity.subjects.fast import scripted_gelu

    x = torch.linspace(-8, 8, 4001)
    for meg in (True, False):
        c = MEGATRON_SQRT_2_OVER_PI if meg else SQRT_2_OVER_PI
        assert torch.equal(scripted_gelu(meg)(x), megatron_gelu_form(x, c32(c)))


# ----------------------------------------------------------------------------- reductions
@pytest.mark.parametrize("dt", HALVES)
@pytest.mark.parametrize("fp32_knob", [False, True])
def test_layer_norm_reduces_in_fp32_and_rounds_once(dt, fp32_knob):
    from reference.ops import layer_norm

    rng = np.random.default_rng(9)
    d = 768
    x = halves(rng, (48, d), dt) + round_to(rng.normal(size=(48, 1)) * 5, dt)
    x = round_to(x, dt)
    w, b = round_to(1 + 0.2 * rng.normal(size=d), dt), round_to(0.1 * rng.normal(size=d), dt)
    got = out(emu(dt).layer_norm(t(x), t(w), t(b), 1e-5, fp32=fp32_knob))
    exact = layer_norm(x, w, b, 1e-5)
    mu = x.mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    scale = (np.abs(x) + np.abs(mu)) * rstd * np.abs(w) + np.abs(b)
    check_bitwise_except_ambiguous(got, round_to(exact, dt), ambiguous(exact, dt, scale))


@pytest.mark.parametrize("dt", HALVES)
def test_layernorm_knob_paths(dt, monkeypatch):
    """Which LayerNorm kernel each `layernorm` knob reaches. Under emulation both values run
    the same fp32 LayerNorm (CUDA's half kernel is fp32 inside: EMULATION.md), so comparing
    the two knob values with each other on a CPU shows nothing; what can fail is that each one
    equals the float64 LayerNorm rounded once (test above) and that the paths split where they
    should: with native CPU half kernels `native` hands the half tensor to torch and `fp32`
    upcasts x, gamma and beta first, giving the emulation's values bitwise."""
    import torch.nn.functional as F

    from parity.subjects import fast

    seen, real = [], F.layer_norm
    monkeypatch.setattr(fast.F, "layer_norm",
                        lambda x, *a, **k: seen.append((x.dtype, a[1].dtype)) or real(x, *a, **k))
    rng = np.random.default_rng(11)
    x = halves(rng, (16, 96), dt)
    w, b = round_to(1 + 0.2 * rng.normal(size=96), dt), round_to(0.1 * rng.normal(size=96), dt)
    half = torch.float16 if dt == "float16" else torch.bfloat16
    emulated, native = emu(dt), Numerics(dt, "cpu", emulate=False)
    assert not native.emulate and native.phys == half
    got = {}
    for name, num in (("emulated", emulated), ("native", native)):
        for knob in (False, True):
            seen.clear()
            y = num.layer_norm(t(x).to(num.phys), t(w).to(num.phys), t(b).to(num.phys), 1e-5,
                               fp32=knob)
            assert y.dtype == num.phys
            got[name, knob] = (seen[0], out(y))
    f32 = (torch.float32, torch.float32)
    assert got["emulated", False][0] == got["emulated", True][0] == f32
    assert got["native", False][0] == (half, half)      # torch's own half kernel
    assert got["native", True][0] == f32                 # Megatron's upcast
    assert np.array_equal(got["native", True][1], got["emulated", True][1])
    assert np.array_equal(got["emulated", False][1], got["emulated", True][1])


@pytest.mark.parametrize("dt", HALVES)
def test_softmax_reduces_in_fp32_and_rounds_once(dt):
    from reference.ops import softmax

    rng = np.random.default_rng(10)
    s = halves(rng, (8, 64, 64), dt, 4.0)
    got = out(emu(dt).softmax(t(s), torch.float16 if dt == "float16" else torch.bfloat16))
    exact = softmax(s)
    check_bitwise_except_ambiguous(got, round_to(exact, dt), ambiguous(exact, dt, exact))


def test_rounding_is_round_to_nearest_even_with_subnormals():
    """Numerics.r agrees with reference.ops.round_to on ties, subnormals and overflow."""
    num16, numbf = emu("float16"), emu("bfloat16")
    x = np.array([1 + 2**-11, 1 + 3 * 2**-11, 2**-25, 3 * 2**-25, 2**-24 * 1.5, 65519.0,
                  65520.0, -65520.0, 1e-8, 1 + 2**-8, 1 + 3 * 2**-8])
    xf = r32(x)
    assert np.array_equal(out(num16.r(t(xf))), round_to(xf, "float16"))
    assert np.array_equal(out(numbf.r(t(xf))), round_to(xf, "bfloat16"))


def test_float64_input_is_rounded_once_not_through_float32():
    """Numerics.tensor on float64 arrays (the reference's stream in lockstep) rounds once."""
    x = np.array([1 + 2**-8 + 2**-40, -(1 + 2**-11 + 2**-40)])
    assert np.array_equal(out(emu("bfloat16").tensor(x)), round_to(x, "bfloat16"))
    assert np.array_equal(out(emu("float16").tensor(x)), round_to(x, "float16"))

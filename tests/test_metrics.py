"""`parity/engine/metrics.py` against hand-computed cases, and subjects judged in units of the floor.

Every expected figure below is worked out by hand in the test (the arithmetic is written out, not
produced by the code under test). ULP distances are counted from the bit layout of the formats:
float16 = 1 sign, 5 exponent (bias 15), 10 mantissa bits; bfloat16 = 1, 8 (bias 127), 7. The
number of representable non-negative values below a positive x is the integer its bits spell
(with the sign bit clear), so 1.0 sits at 15 << 10 = 15360 in float16 and 127 << 7 = 16256 in
bfloat16.

Infinity: `ordered_bits` places +inf one step past the largest finite value (as IEEE nextafter
does), but `ulp_distance` reports any pair with a non-finite member as inf (its docstring): an
overflowed value is not "n ulps off", it is a non-finite value, which the verdict handles.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import reference
from parity.engine import budgets as B
from parity.engine import metrics as M
from parity.checkpoints.checkpoint import load_checkpoint
from parity.engine.compare import make_records, token_rows
from parity.checkpoints.inputs import default_batch

EXACT = "float64_exact"

F16_MIN_SUB = 2.0**-24
F16_MIN_NORMAL = 2.0**-14
F16_MAX = 65504.0  # (2 - 2^-10) * 2^15
BF16_MIN_SUB = 2.0**-133
BF16_MIN_NORMAL = 2.0**-126
BF16_MAX = (2 - 2.0**-7) * 2.0**127


def ulps(a, b, dtype):
    return float(M.ulp_distance(np.array([a]), np.array([b]), dtype)[0])


def close(a, b) -> bool:
    return abs(a - b) <= B.tolerance(EXACT) * abs(b)


# ----------------------------------------------------------------------------- ULP distance
# (y, r, steps): hand-counted steps between two values of the format
ULP_CASES = {
    "float16": [
        (0.0, -0.0, 0),                                   # +0 and -0 are the same value
        (F16_MIN_SUB, -F16_MIN_SUB, 2),                   # -s, (0), +s
        (1.0, 1.0 + 2.0**-10, 1),                         # 1 and its successor
        (-1.0, -(1.0 + 2.0**-10), 1),                     # same on the negative side
        (-1.0, 1.0, 2 * (15 << 10)),                      # 15360 values in (0, 1] each side
        (F16_MIN_NORMAL - F16_MIN_SUB, F16_MIN_NORMAL, 1),  # largest subnormal -> smallest normal
        (F16_MIN_SUB, F16_MIN_NORMAL, 1023),              # the 1023 subnormal steps
        (F16_MAX, 32768.0, 1023),                         # top binade: 1023 steps of 32
        (4.0, 5.0, 256),                                  # ulp in [4, 8) is 2^-8
        (1.0 + 2.0**-12, 1.0, 0),                         # y is rounded first: 1 + 2^-12 -> 1
    ],
    "bfloat16": [
        (0.0, -0.0, 0),
        (BF16_MIN_SUB, -BF16_MIN_SUB, 2),
        (1.0, 1.0 + 2.0**-7, 1),
        (-1.0, -(1.0 + 2.0**-7), 1),
        (-1.0, 1.0, 2 * (127 << 7)),                      # 16256 values in (0, 1] each side
        (BF16_MIN_NORMAL - BF16_MIN_SUB, BF16_MIN_NORMAL, 1),
        (BF16_MIN_SUB, BF16_MIN_NORMAL, 127),             # 127 subnormals
        (BF16_MAX, 2.0**127, 127),
        (4.0, 5.0, 32),                                   # ulp in [4, 8) is 2^-5
        (1.0 + 2.0**-9, 1.0, 0),
    ],
}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_ulp_distance_edge_values(dtype):
    for y, r, steps in ULP_CASES[dtype]:
        assert ulps(y, r, dtype) == steps, (y, r)
        assert ulps(r, y, dtype) == steps, (r, y)  # symmetric


@pytest.mark.parametrize("dtype,top", [("float16", F16_MAX), ("bfloat16", BF16_MAX)])
def test_infinity_is_one_step_past_the_largest_finite_but_reported_as_inf(dtype, top):
    bits = M.ordered_bits(np.array([top, math.inf, -top, -math.inf]), dtype)
    assert bits[1] - bits[0] == 1
    assert bits[2] - bits[3] == 1
    assert ulps(top, math.inf, dtype) == math.inf
    assert ulps(math.nan, 1.0, dtype) == math.inf
    assert ulps(1.0, -math.inf, dtype) == math.inf


@pytest.mark.parametrize("dtype,succ", [("float32", 1.0 + 2.0**-23), ("float64", 1.0 + 2.0**-52)])
def test_ulp_distance_of_the_wide_formats(dtype, succ):
    assert ulps(1.0, succ, dtype) == 1
    assert ulps(-0.0, 0.0, dtype) == 0
    assert ulps(-succ, -1.0, dtype) == 1


def test_ordered_bits_rejects_an_unknown_dtype():
    with pytest.raises(ValueError, match="int8"):
        M.ordered_bits(np.array([1.0]), "int8")


# ----------------------------------------------------------------------------- error figures
def test_site_metrics_hand_case_ignores_padded_rows():
    # hidden site (B=1, T=2, d=2); row 0 real, row 1 padded and full of garbage
    r = np.array([[[3.0, 4.0], [1.0, 1.0]]])
    y = np.array([[[3.0, 5.0], [1e9, np.nan]]])
    valid = M.valid_mask("blocks.0.resid_post", r, np.array([[True, False]]))
    m = M.site_metrics(y, r, "float16", valid)
    assert m["max_abs"] == 1.0                       # |5 - 4|
    assert m["mean_abs"] == 0.5                      # (0 + 1) / 2
    assert m["rel_l2"] == 1.0 / 5.0                  # ||(0, 1)|| / ||(3, 4)||
    assert close(m["cosine"], (3 * 3 + 4 * 5) / (5.0 * math.sqrt(3**2 + 5**2)))
    assert m["nonfinite"] == 0                       # the NaN sits in the padded row
    assert m["ref_max_abs"] == 4.0
    assert m["headroom"] == F16_MAX / 4.0
    assert m["max_ulp"] == 256                       # 4 -> 5 in steps of 2^-8
    assert M.site_metrics(y, r, "bfloat16", valid)["max_ulp"] == 32   # steps of 2^-5


def test_site_metrics_counts_non_finite_subject_values():
    r = np.array([[[1.0, 2.0, 2.0]]])
    y = np.array([[[1.0, np.inf, 2.0]]])
    m = M.site_metrics(y, r, "float16")
    assert m["nonfinite"] == 1
    assert m["rel_l2"] == math.inf
    assert m["max_ulp"] == math.inf
    assert m["max_abs"] == 0.0                       # over the finite elements: both equal


def test_rel_l2_and_cosine_hand_cases():
    r = np.array([1.0, 2.0, 2.0])                    # ||r|| = 3
    assert M.rel_l2(r + np.array([0.0, 0.0, 0.3]), r) == pytest.approx(0.1, rel=B.tolerance(EXACT))
    assert M.rel_l2(np.zeros(3), np.zeros(3)) == 0.0  # 0 / 0
    assert M.rel_l2(np.ones(3), np.zeros(3)) == math.inf
    # a non-finite subject value is an infinite error, not a dropped element (an all-NaN
    # subject once read as exact); outside the valid elements it does not count
    assert M.rel_l2(np.full(3, np.nan), r) == math.inf
    assert M.rel_l2(np.array([1.0, 2.0, np.inf]), r) == math.inf
    assert M.rel_l2(np.array([1.0, 2.0, np.inf]), r, np.array([True, True, False])) == 0.0
    # an opposite vector: cosine -1; orthogonal: 0
    assert close(M.site_metrics(-r, r, "float64")["cosine"], -1.0)
    assert M.site_metrics(np.array([0.0, 1.0]), np.array([1.0, 0.0]), "float64")["cosine"] == 0.0


def test_floor_ratio_with_zero_and_non_zero_floor():
    assert M.floor_ratio(0.0, 0.0) == 1.0            # both exact: as good as the floor
    assert M.floor_ratio(1e-9, 0.0) == math.inf      # any error where the floor has none
    assert M.floor_ratio(6e-4, 3e-4) == pytest.approx(2.0, rel=B.tolerance(EXACT))
    assert M.floor_ratio(3e-4, 3e-4) == 1.0


# ----------------------------------------------------------------------------- logits
def softmax_row(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def kl_by_hand(p_logits, q_logits):
    p, q = softmax_row(p_logits), softmax_row(q_logits)
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def test_logit_metrics_top1_and_kl_hand_case():
    r = np.array([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 0.0, 0.0]]])   # (B=1, T=3, V=3)
    y = np.array([[[2.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 9.0]]])
    rows = np.array([[True, True, False]])          # the third token is padding
    m = M.logit_metrics(y, r, rows)
    assert m["top1"] == 0.5                          # row 0 agrees (0 = 0), row 1 not (1 vs 0)
    expected = (0.0 + kl_by_hand([0.0, 1.0, 0.0], [2.0, 0.0, 0.0])) / 2
    assert close(m["kl"], expected)
    # all three rows: the third disagrees as well
    assert M.logit_metrics(y, r)["top1"] == pytest.approx(1 / 3, rel=B.tolerance(EXACT))


def test_logit_metrics_non_finite_and_empty():
    r = np.array([[[1.0, 0.0], [0.0, 1.0]]])
    y = np.array([[[np.inf, 0.0], [0.0, 1.0]]])
    m = M.logit_metrics(y, r)
    assert m["kl"] == math.inf
    assert m["top1"] == 1.0                          # +inf still points at the right token
    empty = M.logit_metrics(y, r, np.zeros((1, 2), bool))   # no row: top-1 not measured
    assert math.isnan(empty["top1"]) and (empty["kl"], empty["top1_rows"]) == (0.0, 0)


def test_top1_counts_only_rows_the_dtype_can_decide():
    # row 0: margin 1.0, floor error 0.01 -> decisive; row 1: margin 0.001 -> a near tie that
    # the floor itself may flip, not counted
    r = np.array([[[2.0, 1.0, 0.0], [1.0, 0.999, 0.0]]])
    floor = r + 0.01
    flipped_tie = np.array([[[2.0, 1.0, 0.0], [0.999, 1.0, 0.0]]])
    m = M.logit_metrics(flipped_tie, r, floor=floor, margin_factor=16.0)
    assert (m["top1"], m["top1_rows"]) == (1.0, 1)
    flipped_decisive = np.array([[[1.0, 2.0, 0.0], [1.0, 0.999, 0.0]]])
    m = M.logit_metrics(flipped_decisive, r, floor=floor, margin_factor=16.0)
    assert (m["top1"], m["top1_rows"]) == (0.0, 1)
    # without a floor every row counts, as before
    assert M.logit_metrics(flipped_tie, r)["top1"] == 0.5


# ----------------------------------------------------------------------------- valid masks
def test_valid_mask_excludes_padded_rows_and_masked_scores():
    inf = -np.inf
    # (B=1, H=1, T=3, Tk=3): causal, key 0 is padding (so query 0 sees nothing)
    scores = np.array([[[[inf, inf, inf], [inf, 0.5, inf], [inf, 0.2, 0.1]]]])
    rows = np.array([[False, True, True]])
    m = M.valid_mask("blocks.0.attn.scores", scores, rows)
    assert m.tolist() == [[[[False, False, False], [False, True, False], [False, True, True]]]]
    # probabilities: every key of a real query counts (a masked key must get 0: leaking
    # probability into it is an error), padded queries do not
    probs = np.array([[[[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.6, 0.4]]]])
    p = M.valid_mask("blocks.0.attn.probs", probs, rows)
    assert p.tolist() == [[[[False] * 3, [True] * 3, [True] * 3]]]
    # q/k/v (B, H, T, hd) and hidden (B, T, d) follow the token rows
    q = M.valid_mask("blocks.0.attn.q", np.zeros((1, 2, 3, 4)), rows)
    assert q.shape == (1, 2, 3, 4) and not q[:, :, 0].any() and q[:, :, 1:].all()
    h = M.valid_mask("ln_f", np.zeros((1, 3, 5)), rows)
    assert not h[:, 0].any() and h[:, 1:].all()
    assert M.valid_mask("logits", np.zeros((1, 3, 5)), None).all()


def test_masked_score_fill_values_do_not_count():
    inf = -np.inf
    ref = np.array([[[[0.25, inf], [0.5, 0.75]]]])
    sub = np.array([[[[0.25, -65504.0], [0.5, 0.75]]]])   # finfo(fp16).min in the masked entry
    valid = M.valid_mask("blocks.0.attn.scores", ref, None)
    m = M.site_metrics(sub, ref, "float16", valid)
    assert m["max_abs"] == 0.0 and m["rel_l2"] == 0.0 and m["max_ulp"] == 0


# ----------------------------------------------------------------------------- the floor
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("family", reference.FAMILIES)
def test_floor_ratio_counts_errors_in_units_of_the_rounding_floor(tiny_checkpoints, family,
                                                                   dtype):
    """make_records judges a subject against the floor, not the floor against itself (which
    is 1 by construction): a subject with twice the floor's error at every element sits at
    floor_ratio 2 at every site, the reference itself at 0, and the floor carries a rounding
    error of the dtype's size (a fraction of an ulp to a few ulps per element) where the model
    starts (the embedding: one rounding of rounded weights)."""
    ckpt = load_checkpoint(tiny_checkpoints[family])
    cfg, weights = ckpt.config, ckpt.weights()
    inputs = default_batch(cfg, 12, seed=1)
    args = (cfg, weights, inputs.input_ids, inputs.attention_mask, inputs.position_ids)
    ref = reference.forward(*args)
    floor = reference.forward(*args, floor=dtype)
    fp64 = {s: "float64" for s in ref.sites}     # the doubled error is no longer on the grid

    def judge(sub):
        return make_records(ref.sites, sub, floor.sites, fp64, token_rows(inputs),
                            B.load_policy(), mode="accumulated", family=family, label="tiny",
                            variant="probe", dtype=dtype, subject_dtype=dtype, device="cpu",
                            emulate=False)

    with np.errstate(invalid="ignore"):          # -inf - -inf at masked scores: not compared
        doubled = {s: np.where(np.isfinite(r), r + 2 * (floor.sites[s] - r), r)
                   for s, r in ref.sites.items()}
    recs = judge(doubled)
    assert [r["site"] for r in recs] == list(ref.sites)
    assert all(r["floor_rel_l2"] > 0 for r in recs)
    ratios = np.array([r["floor_ratio"] for r in recs])
    # twice the floor's error, up to float64 rounding of the sums
    assert np.abs(ratios / 2.0 - 1.0).max() <= B.tolerance("float64_exact"), dict(
        zip(ref.sites, ratios))
    assert {r["verdict"] for r in judge(dict(ref.sites))} == {"pass"}
    assert all(r["floor_ratio"] == 0.0 for r in judge(dict(ref.sites)))
    u = 2.0 ** -(np.finfo(np.float16).nmant + 1 if dtype == "float16" else 8)  # unit roundoff
    embed = recs[0]
    assert embed["site"] == "embed" and u / 16 < embed["floor_rel_l2"] < 4 * u, embed

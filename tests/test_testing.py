"""`parity.testing.assert_parity` and the golden fixture of the pytest plugin, in process.

assert_parity passes what the dtype itself does (the reference rounded once) and fails what it
does not, with the count of mismatched elements and the worst index, judged by the budgets
policy (never a literal here); it never passes a NaN, an overflow or a reference that is not
float64. The golden fixture stores parity-golden/1 files with a tolerance measured when they are
made, fails a missing golden, a changed dtype or changed inputs, and is used here as a user
would: through the plugin's own fixtures (`parity_reference`, `parity_golden`).
"""
from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open

from parity import subjects
from parity.checkpoints.checkpoint import load_checkpoint
from parity.checkpoints.inputs import Inputs
from parity.engine import budgets as B
from parity.engine.metrics import UNIT_ROUNDOFF, rel_l2
from parity.errors import ParityError
from parity.goldens import fixture as GF
from parity.goldens.io import read_golden
from parity.testing import ParityWarning, assert_parity
from reference.ops import round_to

IDS = np.array([[1, 2, 3, 4, 5, 6, 7, 8], [0, 0, 9, 10, 11, 12, 13, 14]])
MASK = (IDS != 0).astype(np.int64)
POS = np.maximum(MASK.cumsum(axis=1) - 1, 0)


def ref_tensor(shape=(4, 8, 30), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


def budget(dtype: str) -> B.Budget:
    return B.budget_for(B.load_policy(), dtype=dtype)


# ----------------------------------------------------------------------------- assert_parity
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_tensor_rounded_once_is_at_the_floor(dtype):
    r = ref_tensor()
    y = torch.from_numpy(r).to(getattr(torch, dtype))
    figures = assert_parity(y, r, dtype=dtype)
    assert figures["verdict"] == "pass" and figures["floor_ratio"] == 1.0
    assert figures["actual_dtype"] == dtype


def test_numpy_inputs_need_no_torch_tensor():
    r = ref_tensor()
    assert assert_parity(r.astype(np.float16), r, dtype="fp16")["floor_ratio"] == 1.0


def test_a_one_percent_error_in_fp16_fails_with_count_and_worst_index():
    r = ref_tensor()
    y = (r * 1.01).astype(np.float16)
    with pytest.raises(AssertionError) as e:
        assert_parity(torch.from_numpy(y), r, dtype="float16", name="hidden")
    msg = str(e.value)
    # the count and the worst element, computed here independently of the engine
    fail = budget("float16").floor_ratio_fail
    floor_rms = np.sqrt(np.mean((round_to(r, "float16") - r) ** 2))
    err = np.abs(y.astype(np.float64) - r)
    over = int((err > fail * floor_rms).sum())
    worst = np.unravel_index(int(np.argmax(err)), r.shape)
    assert f"Mismatched elements: {over} / {r.size} (" in msg, msg
    assert f"Worst at index {tuple(int(i) for i in worst)}: actual " in msg, msg
    ratio = rel_l2(y, r) / rel_l2(round_to(r, "float16"), r)
    assert f"floor_ratio {ratio:.3g} (allowed {fail:g})" in msg, msg
    assert ratio > fail and msg.startswith("'hidden' is not at parity")


def test_bf16_allows_what_its_coarser_floor_implies():
    """bf16's floor is 8x fp16's: a 1% error is within its fail budget (a warning), an error of
    2 x floor_ratio_fail x bf16's unit roundoff is not."""
    r = ref_tensor()
    b = budget("bfloat16")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        f = assert_parity(torch.from_numpy(r * 1.01).bfloat16(), r, dtype="bf16")
    assert f["verdict"] == "warn" and b.floor_ratio_warn < f["floor_ratio"] <= b.floor_ratio_fail
    assert any(issubclass(x.category, ParityWarning) for x in w)
    big = 2 * b.floor_ratio_fail * UNIT_ROUNDOFF["bfloat16"]
    with pytest.raises(AssertionError, match=r"Mismatched elements: \d+ / 960"):
        assert_parity(torch.from_numpy(r * (1 + big)).bfloat16(), r, dtype="bf16")


def test_never_a_pass_for_nan_or_overflow():
    r = ref_tensor()
    y = r.astype(np.float16)
    y[1, 2, 3] = np.nan
    with pytest.raises(AssertionError, match=r"1 non-finite values(.|\n)*Worst at index "
                                             r"\(1, 2, 3\): actual nan"):
        assert_parity(y, r, dtype="fp16")
    big = np.array([1.0, 2.0, 1e5])  # 1e5 is beyond fp16's range: the floor itself is inf
    with pytest.raises(AssertionError, match="overflow"):
        assert_parity(np.array([1.0, 2.0, np.inf], np.float16), big, dtype="fp16")
    with pytest.raises(AssertionError, match="overflow"):
        assert_parity(np.array([1.0, 2.0, 65504.0]), big, dtype="fp16")


def test_non_finite_reference_values_must_be_matched():
    r = ref_tensor((2, 5))
    r[0, 4] = -np.inf  # a masked score
    y = round_to(r, "float16")
    assert assert_parity(y, r, dtype="fp16")["verdict"] == "pass"
    y[0, 4] = -1e4  # a finite fill where the reference is -inf
    with pytest.raises(AssertionError, match="where the reference is not finite"):
        assert_parity(y, r, dtype="fp16")


def test_bad_input_is_refused():
    r = ref_tensor((3, 4))
    with pytest.raises(ParityError, match="reference must be float64, got float32"):
        assert_parity(r, r.astype(np.float32), dtype="fp16")
    with pytest.raises(ParityError, match="not a float dtype"):
        assert_parity(r, r, dtype="int8")
    with pytest.raises(AssertionError, match=r"shapes differ: actual \[4, 3\]"):
        assert_parity(r.T, r, dtype="fp16")


def test_float64_is_held_to_the_float64_budget():
    r = ref_tensor((3, 4))
    assert assert_parity(torch.from_numpy(r), r, dtype=torch.float64)["verdict"] == "pass"
    tol = budget("float64").rel_l2_max
    with pytest.raises(AssertionError, match="rel_l2 .* > .* in float64"):
        assert_parity(r * (1 + 10 * tol), r, dtype="float64")


def test_the_budget_comes_from_the_policy_with_site_overrides(tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text(B.DEFAULT_FILE.read_text() + '\n[[overrides]]\nsite = "loose.*"\n'
                      'floor_ratio_fail = 1000\nfloor_ratio_warn = 1000\n'
                      'reason = "test: a site the policy lets through"\n')
    r = ref_tensor()
    y = (r * 1.01).astype(np.float16)
    assert assert_parity(y, r, dtype="fp16", policy=str(policy),
                         name="loose.site")["budget_fail"] == 1000
    with pytest.raises(AssertionError):
        assert_parity(y, r, dtype="fp16", policy=str(policy), name="strict.site")


def test_logits_add_top1_and_kl(parity_reference, tiny_checkpoints):
    ref = parity_reference(tiny_checkpoints["gpt2"], IDS)["logits"]
    f = assert_parity(round_to(ref, "float16"), ref, dtype="fp16", name="logits")
    assert f["top1"] == 1.0 and 0.0 <= f["kl"] < budget("float16").kl_max
    shuffled = round_to(ref[..., ::-1].copy(), "float16")  # the vocabulary reversed
    with pytest.raises(AssertionError, match="top-1"):
        assert_parity(shuffled, ref, dtype="fp16", name="logits")


def test_a_subject_is_judged_against_the_rounding_floor_trace(parity_reference,
                                                              tiny_checkpoints):
    """The plugin's reference fixture as a user would use it: the fast path's fp16 logits
    against the float64 reference, with the rounding floor (every op rounded once) as floor."""
    ck = tiny_checkpoints["gpt2"]
    ref = parity_reference(ck, IDS, MASK, POS)
    floor = parity_reference(ck, IDS, MASK, POS, floor="fp16")
    assert parity_reference(ck, IDS, MASK, POS) is ref  # cached per session
    out = subjects.run("fast", load_checkpoint(ck), Inputs(IDS, MASK, POS), dtype="float16")
    rows = MASK.astype(bool)
    assert_parity(out["logits"][rows], ref["logits"][rows], dtype="fp16",
                  floor=floor["logits"][rows], name="logits")


# ----------------------------------------------------------------------------- golden fixture
def checker(tmp_path, reason=None, name="test_x", written=None) -> GF.GoldenChecker:
    return GF.GoldenChecker(test_file=tmp_path / "test_mod.py", test_name=name,
                            test_id=f"test_mod.py::{name}", update_reason=reason,
                            written=[] if written is None else written)


@pytest.fixture(scope="module")
def gpt2_run(tiny_checkpoints):
    """(float64 reference trace, fast fp16 trace) of the tiny GPT-2 on a left-padded batch."""
    ck = tiny_checkpoints["gpt2"]
    inp = Inputs(IDS, MASK, POS)
    ckpt = load_checkpoint(ck)
    ref = subjects.run("reference", ckpt, inp)
    out = subjects.run("fast", ckpt, inp, dtype="float16", sites="blocks.*.resid_post,logits")
    return ref, out


def test_a_missing_golden_fails_and_says_how_to_make_it(tmp_path, gpt2_run):
    ref, out = gpt2_run
    with pytest.raises(AssertionError, match=r"no golden file .*goldens/test_mod/test_x\.fp16"
                                             r"\.safetensors: make it with pytest "
                                             r"'test_mod.py::test_x' --parity-update-golden="):
        checker(tmp_path).check(out, "fp16", reference=ref)


def test_making_a_golden_needs_a_reason_and_a_reference(tmp_path, gpt2_run):
    ref, out = gpt2_run
    with pytest.raises(ParityError, match="needs reference="):
        checker(tmp_path, reason="first").check(out, "fp16")
    with pytest.raises(ParityError, match="needs a reason"):
        checker(tmp_path, reason=" ").check(out, "fp16", reference=ref)
    assert not (tmp_path / "goldens").exists()


def test_a_golden_stores_its_measured_error_model_and_reason(tmp_path, gpt2_run):
    ref, out = gpt2_run
    written = []
    p = checker(tmp_path, reason="first fp16 golden", written=written).check(
        out, "fp16", reference=ref)
    assert written == [(str(p), "first fp16 golden")]
    g = read_golden(p)  # a parity-golden/1 file the gate can take as it is
    assert g.meta["update_reason"] == "first fp16 golden" and g.meta["dtype"] == "float16"
    model = json.loads(g.meta[GF.META_KEY])
    assert model["margin"] == B.tolerance(GF.MARGIN)
    with safe_open(str(p), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys() if k not in GF.INPUTS} == {"F16"}
    rows = MASK.astype(bool)
    e = model["sites"]["logits"]
    assert e["producer_rel_l2"] == pytest.approx(
        rel_l2(out["logits"][rows], ref["logits"][rows]), rel=1e-12)
    assert e["floor_rel_l2"] == pytest.approx(
        rel_l2(round_to(ref["logits"][rows], "float16"), ref["logits"][rows]), rel=1e-12)
    assert e["tolerance_rel_l2"] == pytest.approx(
        model["margin"] * max(e["producer_rel_l2"], e["floor_rel_l2"]), rel=1e-12)
    assert set(model["sites"]) == set(out.sites)
    np.testing.assert_array_equal(g.sites["logits"], out["logits"])


def test_a_golden_passes_its_own_run_and_fails_a_change_beyond_its_tolerance(tmp_path,
                                                                             gpt2_run):
    ref, out = gpt2_run
    checker(tmp_path, reason="first").check(out, "fp16", reference=ref)
    checker(tmp_path).check(out, "fp16")  # the same run: passes
    halves = {k: torch.from_numpy(v).half() for k, v in out.sites.items()}
    checker(tmp_path).check(dict(halves, input_ids=IDS), "fp16")  # mask, positions unstated
    tol = json.loads(read_golden(tmp_path / "goldens/test_mod/test_x.fp16.safetensors")
                     .meta[GF.META_KEY])["sites"]["blocks.1.resid_post"]["tolerance_rel_l2"]
    site = "blocks.1.resid_post"
    for factor, fails in ((0.25, False), (4.0, True)):
        sites = dict(out.sites)
        sites[site] = round_to(out[site] * (1 + factor * tol), "float16")
        changed = dict(sites, input_ids=IDS, attention_mask=MASK, position_ids=POS)
        arrays = {k: (torch.from_numpy(v).half() if k in out.sites else v)
                  for k, v in changed.items()}
        if fails:
            with pytest.raises(AssertionError, match=rf"{re.escape(site)}: rel_l2 .* against "
                                                     r"the golden > tolerance .* worst at"):
                checker(tmp_path).check(arrays, "fp16")
        else:
            checker(tmp_path).check(arrays, "fp16")


def test_a_changed_dtype_or_input_fails(tmp_path, gpt2_run):
    ref, out = gpt2_run
    checker(tmp_path, reason="first").check(out, "fp16", reference=ref)
    as_fp32 = {k: torch.from_numpy(v).float() for k, v in out.sites.items()}
    with pytest.raises(AssertionError, match="logits: dtype float32, the golden's is float16"):
        checker(tmp_path).check(dict(as_fp32, input_ids=IDS, attention_mask=MASK,
                                     position_ids=POS), "fp16")
    other = IDS.copy()
    other[0, 0] = 7
    with pytest.raises(AssertionError, match="input_ids differ"):
        checker(tmp_path).check(dict(out.sites, input_ids=other, attention_mask=MASK,
                                     position_ids=POS), "fp16")


def test_an_update_rewrites_only_the_goldens_it_runs(tmp_path, gpt2_run):
    ref, out = gpt2_run
    a = checker(tmp_path, reason="first", name="test_a").check(out, "fp16", reference=ref)
    b = checker(tmp_path, reason="first", name="test_b").check(out, "fp16", reference=ref)
    before = b.read_bytes()
    checker(tmp_path, reason="second", name="test_a").check(out, "fp16", reference=ref)
    assert read_golden(a).meta["update_reason"] == "second"
    assert b.read_bytes() == before


def test_the_fast_path_keeps_its_committed_golden(parity_reference, parity_golden,
                                                  tiny_checkpoints):
    """The plugin's golden fixture on this repo's own fast path: tests/goldens/test_testing/
    (made with `pytest tests/test_testing.py --parity-update-golden=REASON`)."""
    ck = tiny_checkpoints["gpt2"]
    ref = parity_reference(ck, IDS, MASK, POS)
    out = subjects.run("fast", load_checkpoint(ck), Inputs(IDS, MASK, POS), dtype="float16",
                       sites="embed,blocks.*.resid_post,logits")
    parity_golden.check(out, "gpt2-fp16", reference=ref)

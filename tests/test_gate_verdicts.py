"""Wrong verdicts the gate must never give: a PASS that checked nothing, a stale PASS after an
error, NaN read as a pass, sites dropped unseen, determinism of another subject, a tied head
read wrongly, structural defects that leave CI nothing to read, unchecked parts that look
checked. Each test here failed on the code before the fix it pins.
"""
from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy

import reference
from parity.engine import budgets as B
from parity import cli
from parity.checkpoints.checkpoint import load_checkpoint, open_checkpoint
from parity.engine.compare import Subject, compare, make_records, verdict
from parity.errors import StructureError
from parity.checkpoints.inputs import default_batch
from tests.test_gate import REPORT_FILES, checks, copy_ckpt, gate, rewrite_weights

TOKENS = np.array([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]], np.int64)


def reference_logits(ckpt: Path) -> np.ndarray:
    c = load_checkpoint(ckpt)
    return reference.forward(c.config, c.weights(), TOKENS).logits


def write_golden(path: Path, logits: np.ndarray, dtype: str, store=np.float32) -> Path:
    save_numpy({"input_ids": TOKENS, "logits": logits.astype(store)}, str(path),
               metadata={"format": "parity-golden/1", "family": "gpt2", "dtype": dtype,
                         "producer": "test"})
    return path


# ----------------------------------------------------------------------------- golden labels
def test_a_golden_whose_logits_its_dtype_cannot_hold_is_refused(tiny_checkpoints, tmp_path,
                                                                 capsys):
    """float32 logits with 4% noise labelled bfloat16 used to PASS at bf16's loose tolerance."""
    ck = tiny_checkpoints["gpt2"]
    r = reference_logits(ck)
    noisy = r * (1 + 0.04 * np.random.default_rng(0).standard_normal(r.shape))
    g = write_golden(tmp_path / "noisy.safetensors", noisy, "bfloat16")
    rc, out, err = gate(capsys, ck, "--golden", g, report=tmp_path / "rep")
    assert rc == 2 and "PASS" not in out, (rc, out, err)
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "noisy.safetensors" in err and "bfloat16 cannot represent" in err


def test_a_golden_computed_in_its_declared_dtype_is_still_judged(tiny_checkpoints, tmp_path,
                                                                  capsys):
    """Logits rounded to bf16 and stored as float32 (an upcast head) hold only bf16 values: the
    label is believable and the golden passes; the same golden with a wrong weight fails."""
    from reference.ops import round_to

    ck = tiny_checkpoints["gpt2"]
    g = write_golden(tmp_path / "bf16.safetensors", round_to(reference_logits(ck), "bfloat16"),
                     "bfloat16")
    rc, out, err = gate(capsys, ck, "--golden", g, report=tmp_path / "rep")
    assert rc == 0, (out, err)
    assert checks(tmp_path / "rep")["golden:bf16.safetensors"]["verdict"] == "pass"


# ----------------------------------------------------------------------------- stale files
def test_an_error_after_a_pass_leaves_no_stale_pass(tiny_checkpoints, tmp_path, capsys):
    ck, rep, junit = tiny_checkpoints["gpt2"], tmp_path / "rep", tmp_path / "gate.xml"
    rc, out, err = gate(capsys, ck, "--junit", junit, report=rep)
    assert rc == 0 and ET.parse(junit).getroot().get("failures") == "0"
    bad = tmp_path / "policy.toml"
    bad.write_text('schema = "parity-budgets/1"\n[defaults.float16\n')
    rc, out, err = gate(capsys, ck, "--junit", junit, "--policy", bad, report=rep)
    assert rc == 2 and err.startswith("error: ") and "policy.toml" in err
    root = ET.parse(junit).getroot()
    assert root.get("errors") == "1" and root.get("tests") == "1"
    assert "policy.toml" in root.find("testcase/error").get("message")
    for f in REPORT_FILES:
        assert not (rep / f).exists(), f"{f} from the earlier PASS left behind"


# ----------------------------------------------------------------------------- NaN verdicts
BUDGET = B.Budget(floor_ratio_warn=2.0, floor_ratio_fail=8.0, top1_min=0.9, kl_max=1e-3)


def _m(**kw):
    m = dict(ref_max_abs=1.0, nonfinite=0, headroom=65504.0, rel_l2=1e-3, floor_rel_l2=1e-3,
             floor_ratio=1.0, top1=math.nan, kl=math.nan)
    return {**m, **kw}


@pytest.mark.parametrize("m", [
    _m(rel_l2=math.inf, floor_rel_l2=math.inf, floor_ratio=math.nan),   # inf / inf
    _m(floor_ratio=math.nan, floor_rel_l2=math.nan),                      # no floor at all
    _m(floor_rel_l2=math.inf, floor_ratio=0.0),                           # floor overflowed
], ids=["inf-over-inf", "missing-floor", "non-finite-floor"])
def test_a_floor_ratio_that_cannot_be_measured_never_passes(m):
    v, why = verdict(m, BUDGET, "blocks.0.attn.probs", "float16", "float16")
    assert v == "unmeasured" and "not measured" in why


def test_top1_without_decisive_rows_is_not_measured(tiny_checkpoints):
    """Equal logits: no row is decisive, so top-1 is n/a (was reported as 1.0)."""
    r = np.zeros((1, 3, 8))
    rec = make_records({"logits": r}, {"logits": r + 1e-3}, {"logits": r + 1e-3},
                       {"logits": "float16"}, None, B.load_policy(), mode="accumulated",
                       family="gpt2", label="t", variant="hf", dtype="float16",
                       subject_dtype="float16", device="cpu", emulate=True)[0]
    assert math.isnan(rec["top1"])


# ----------------------------------------------------------------------------- sites dropped
def _records(sub_sites, policy=None):
    ref = {"embed": np.ones((1, 2, 4)), "blocks.0.attn.probs": np.full((1, 1, 2, 2), 0.5),
           "blocks.0.resid_post": np.ones((1, 2, 4)), "logits": np.eye(4)[None, :2]}
    sub = {k: v for k, v in ref.items() if k in sub_sites}
    return make_records(ref, sub, dict(ref), {}, None, policy or B.load_policy(),
                        mode="accumulated", family="gpt2", label="t", variant="hf",
                        dtype="float16", subject_dtype="float16", device="cpu", emulate=True)


def test_a_site_the_subject_does_not_expose_is_listed_not_dropped():
    rows = {r["site"]: r for r in _records({"embed", "blocks.0.resid_post", "logits"})}
    assert rows["blocks.0.attn.probs"]["verdict"] == "not_exposed"
    assert "not exposed" in rows["blocks.0.attn.probs"]["reason"]
    assert len(rows) == 4


@pytest.mark.parametrize("hidden", ["logits", "blocks.0.resid_post"])
def test_a_required_site_the_subject_does_not_expose_fails(hidden):
    rows = {r["site"]: r for r in _records({"embed", "blocks.0.attn.probs",
                                            "blocks.0.resid_post", "logits"} - {hidden})}
    assert rows[hidden]["verdict"] == "fail" and "required" in rows[hidden]["reason"]


def test_a_policy_can_require_more_sites():
    policy = dict(B.load_policy(), gate={"require_sites": ["blocks.*.attn.probs"]})
    rows = {r["site"]: r for r in _records({"embed", "blocks.0.resid_post", "logits"}, policy)}
    assert rows["blocks.0.attn.probs"]["verdict"] == "fail"


def test_the_gate_lists_sites_the_hf_sdpa_subject_does_not_expose(tiny_checkpoints, tmp_path,
                                                                  capsys):
    pytest.importorskip("transformers", reason="the hf subject needs the [hf] extra")
    rep = tmp_path / "rep"
    rc, out, err = gate(capsys, tiny_checkpoints["gpt2"], "--impl", "hf", "--variant", "sdpa",
                        "--dtype", "float32", report=rep)
    subj = checks(rep)["subject"]
    assert subj["figures"]["sites_not_exposed"] > 0, subj
    assert "attn.probs" in subj["figures"]["not_exposed"]
    assert "not exposed" in subj["detail"]


# ----------------------------------------------------------------------------- determinism
def test_determinism_reruns_the_subject_that_was_judged(tiny_checkpoints, tmp_path, capsys,
                                                        monkeypatch):
    pytest.importorskip("transformers", reason="the hf subject needs the [hf] extra")
    from parity import subjects

    seen = []
    real = subjects.run

    def spy(impl, *a, **kw):
        seen.append(kw.get("variant"))
        return real(impl, *a, **kw)

    monkeypatch.setattr(subjects, "run", spy)
    gate(capsys, tiny_checkpoints["gpt2"], "--impl", "hf", "--variant", "sdpa", "--dtype",
         "float32", report=tmp_path / "rep")
    assert len(seen) >= 2 and set(seen) == {"sdpa"}, seen


# ----------------------------------------------------------------------------- golden summary
def test_the_gates_golden_row_fails_when_nothing_was_compared(tiny_checkpoints, monkeypatch):
    from parity.commands import gate as G
    from parity.goldens import foreign as goldens

    rows = [{"site": "blocks.9.resid_post", "status": "skip", "reason": "not a site",
             "rel": math.nan, "tolerance_name": "golden_float64", "tolerance": 1e-12}]
    monkeypatch.setattr(goldens, "check_foreign_golden", lambda path, ckpt: rows)
    c = G.golden_check(open_checkpoint(tiny_checkpoints["gpt2"]), "g.safetensors")
    assert c.verdict == "fail" and "no site" in c.detail


# ----------------------------------------------------------------------------- tied heads
def _untied_copy(src: Path, dst: Path, delta: float) -> Path:
    def add_head(d):
        d["lm_head.weight"] = d["transformer.wte.weight"].clone() + delta
    return rewrite_weights(copy_ckpt(src, dst), add_head)


def test_a_stored_head_that_differs_from_the_tied_embedding_fails_structure(
        tiny_checkpoints, tmp_path, capsys):
    ck = _untied_copy(tiny_checkpoints["gpt2"], tmp_path / "ck", 0.01)
    rep, junit = tmp_path / "rep", tmp_path / "g.xml"
    rc, out, err = gate(capsys, ck, "--junit", junit, report=rep)
    assert rc == 1, (out, err)
    s = checks(rep)["structure"]
    assert s["verdict"] == "fail"
    assert "lm_head.weight" in s["detail"] and "transformer.wte.weight" in s["detail"]
    assert ET.parse(junit).getroot().get("failures") != "0"
    with pytest.raises(StructureError, match="tie"):
        load_checkpoint(ck)


def test_a_stored_head_equal_to_the_embedding_is_fine(tiny_checkpoints, tmp_path, capsys):
    ck = _untied_copy(tiny_checkpoints["gpt2"], tmp_path / "ck", 0.0)
    rc, out, err = gate(capsys, ck, report=tmp_path / "rep")
    assert rc == 0 and checks(tmp_path / "rep")["structure"]["verdict"] == "pass", (out, err)


def test_transformers_uses_a_stored_untied_head(tiny_checkpoints, tmp_path):
    """Why a differing stored head must fail: transformers reads it (the logits differ from a
    tied reading), so the reference's tied logits would not be what users run."""
    pytest.importorskip("transformers", reason="the outside oracle needs the [hf] extra")
    from transformers import AutoModelForCausalLM

    ck = _untied_copy(tiny_checkpoints["gpt2"], tmp_path / "ck", 0.01)
    m = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float64).eval()
    with torch.no_grad():
        hf = m(torch.from_numpy(TOKENS)).logits.numpy()
    tied = reference_logits(tiny_checkpoints["gpt2"])
    assert np.abs(hf - tied).max() / np.abs(tied).max() > B.tolerance("reference_vs_hf_float64")


# ----------------------------------------------------------------------------- structural defects
def _drop(key):
    return lambda d: d.pop(key)


STRUCTURAL = [
    ("missing-weight", _drop("transformer.h.1.ln_1.bias"), ["missing weights", "h.1.ln_1.bias"]),
    ("unexpected-weight", lambda d: d.update({"transformer.h.7.ln_1.weight": torch.ones(64)}),
     ["unexpected weights", "h.7.ln_1.weight"]),
    ("wrong-shape", lambda d: d.update({"transformer.h.0.mlp.c_fc.weight": d[
        "transformer.h.0.mlp.c_fc.weight"].T.contiguous()}),
     ["h.0.mlp.c_fc.weight", "[256, 64]", "[64, 256]"]),
]


@pytest.mark.parametrize("case,edit,expect", STRUCTURAL, ids=[s[0] for s in STRUCTURAL])
def test_a_structural_defect_is_a_structure_fail_with_report_and_junit(
        case, edit, expect, tiny_checkpoints, tmp_path, capsys):
    ck = rewrite_weights(copy_ckpt(tiny_checkpoints["gpt2"], tmp_path / "ck"), edit)
    rep, junit = tmp_path / "rep", tmp_path / "g.xml"
    rc, out, err = gate(capsys, ck, "--junit", junit, report=rep)
    assert rc == 1, (out, err)
    s = checks(rep)["structure"]
    assert s["verdict"] == "fail"
    for e in expect:
        assert e in s["detail"], (e, s["detail"])
    assert checks(rep)["subject"]["verdict"] == "skip"
    cases = {c.get("name"): c for c in ET.parse(junit).getroot().iter("testcase")}
    assert cases["structure"].find("failure") is not None
    assert {c.get("classname") for c in cases.values()} == {"parity.gate"}  # what dashboards key on
    assert all((rep / f).exists() for f in REPORT_FILES)


def test_unreadable_input_still_writes_an_error_testcase(tiny_checkpoints, tmp_path, capsys):
    ck = copy_ckpt(tiny_checkpoints["gpt2"], tmp_path / "ck")
    (ck / "model.safetensors").write_bytes(b"garbage")
    junit = tmp_path / "g.xml"
    rc, out, err = gate(capsys, ck, "--junit", junit, report=tmp_path / "rep")
    assert rc == 2 and err.startswith("error: ")
    root = ET.parse(junit).getroot()
    assert root.get("errors") == "1" and "model.safetensors" in root.find(
        "testcase/error").get("message")


# ----------------------------------------------------------------------------- unchecked parts
def test_a_pass_says_what_was_not_checked(tiny_checkpoints, tmp_path, capsys):
    rep = tmp_path / "rep"
    rc, out, err = gate(capsys, tiny_checkpoints["gpt2"], report=rep)
    assert rc == 0
    run = json.loads((rep / "run.json").read_text())
    assert run["verdict_line"].startswith("PASS - tokenizer not checked: no tokenizer files")
    assert "tokenizer not checked" in " ".join(out.split())
    assert "tokenizer not checked" in (rep / "summary.md").read_text()


def test_a_policy_can_require_a_check(tiny_checkpoints, tmp_path, capsys):
    policy = tmp_path / "policy.toml"
    policy.write_text(B.DEFAULT_FILE.read_text().replace('require = []',
                                                         'require = ["tokenizer"]'))
    rep = tmp_path / "rep"
    rc, out, err = gate(capsys, tiny_checkpoints["gpt2"], "--policy", policy, report=rep)
    assert rc == 1, (out, err)
    t = checks(rep)["tokenizer"]
    assert t["verdict"] == "fail" and "required by the policy" in t["detail"]


def test_a_policy_requiring_an_unknown_check_is_bad_input(tiny_checkpoints, tmp_path, capsys):
    policy = tmp_path / "policy.toml"
    policy.write_text(B.DEFAULT_FILE.read_text().replace('require = []',
                                                         'require = ["tokenizr"]'))
    rc, out, err = gate(capsys, tiny_checkpoints["gpt2"], "--policy", policy,
                        report=tmp_path / "rep")
    assert rc == 2 and "tokenizr" in err and "policy.toml" in err


# ----------------------------------------------------------------------------- reasons
def test_a_reason_says_how_many_elements_and_where(tiny_checkpoints):
    """Like torch.testing.assert_close: the count over budget and the worst index, both values."""
    ck = load_checkpoint(tiny_checkpoints["gpt2"])
    inp = default_batch(ck.config, 8, seed=0)
    ref = reference.forward(ck.config, ck.weights(), inp.input_ids, inp.attention_mask,
                            inp.position_ids)
    flo = reference.forward(ck.config, ck.weights(), inp.input_ids, inp.attention_mask,
                            inp.position_ids, floor="float16")
    sub = dict(flo.sites)
    bad = sub["blocks.0.mlp.act"].copy()
    bad[0, 3, 7] += 1.0
    sub["blocks.0.mlp.act"] = bad
    rows = {r["site"]: r for r in make_records(
        ref.sites, sub, flo.sites, {}, None, B.load_policy(), mode="accumulated",
        family="gpt2", label="t", variant="hf", dtype="float16", subject_dtype="float16",
        device="cpu", emulate=True)}
    r = rows["blocks.0.mlp.act"]
    assert r["verdict"] == "fail"
    n = bad.size  # no padding: every element counts
    assert f"1 / {n} elements" in r["reason"] and "worst at (0, 3, 7)" in r["reason"]
    assert "subject" in r["reason"] and "reference" in r["reason"]


def test_a_limit_is_printed_with_enough_digits():
    budget = B.Budget(floor_ratio_warn=4.0, floor_ratio_fail=8.0, top1_min=0.9, kl_max=1e-3)
    v, why = verdict(_m(floor_ratio=4.0003), budget, "blocks.0.ln_1", "float16", "float16")
    assert v == "warn" and "4.0003 > 4" in why


# ----------------------------------------------------------------------------- float64 policy
def test_the_float64_row_of_a_policy_is_honoured(tiny_checkpoints, tmp_path):
    ck = load_checkpoint(tiny_checkpoints["gpt2"])
    inp = default_batch(ck.config, 8, seed=0)
    builtin = compare(ck, inp, [Subject(variant="hf", dtype="float64")], modes=("accumulated",))
    assert set(builtin["verdict"]) == {"pass"}
    policy = B.load_policy()
    strict = dict(policy, defaults=dict(policy["defaults"], float64=dict(
        policy["defaults"]["float64"], rel_l2_max=0.0)))
    df = compare(ck, inp, [Subject(variant="hf", dtype="float64")], modes=("accumulated",),
                 policy=strict)
    moved = df[df["rel_l2"] > 0]
    assert len(moved) and set(moved["verdict"]) == {"fail"}


# ----------------------------------------------------------------------------- KL against the floor
def test_kl_is_judged_against_what_the_dtype_itself_reaches():
    """On OpenAI GPT stress bf16 the rounding floor's own KL reached 0.016 > kl_max 0.01: an
    absolute limit there fails healthy subjects by lot. A subject at the fail budget may reach
    floor_ratio_fail^2 x the floor's KL."""
    b = B.budget_for(B.load_policy(), dtype="bfloat16")
    floor_kl = 1.6 * b.kl_max
    ok = _m(top1=1.0, kl=1.2 * b.kl_max, floor_kl=floor_kl)
    assert verdict(ok, b, "logits", "bfloat16", "bfloat16")[0] == "pass"
    bad = _m(top1=1.0, kl=1.01 * b.floor_ratio_fail ** 2 * floor_kl, floor_kl=floor_kl)
    v, why = verdict(bad, b, "logits", "bfloat16", "bfloat16")
    assert v == "fail" and "the floor's KL" in why
    # where the floor is good, the absolute limit still decides
    assert verdict(_m(top1=1.0, kl=1.1 * b.kl_max, floor_kl=1e-9), b, "logits", "bfloat16",
                   "bfloat16")[0] == "fail"

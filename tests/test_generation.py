"""Generation parity (parity/engine/generation.py and the gate's `generation`, `cache`, `batch`
rows).

What a release engineer relies on: a healthy fast path greedy-decodes every family's tiny
checkpoint exactly as the float64 reference does (a pass, not a false alarm on near-uniform
logits); an fp16 path that overflows (GPT-2 stress, naive-half) fails, naming the first divergent
step; a divergence is judged decisive (fail) or a near-tie (warn) by the reference's margin
against what the dtype resolves, with both numbers in the reason; a KV cache that forgets a
token fails; --max-new-tokens 0 skips the check and a negative count is bad input; transformers'
OpenAI GPT (no cache) is decoded by re-running the sequence and says so; the streamed reference
computes what the in-memory one does.
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pytest

import parity
import reference
from parity import cli
from parity.checkpoints.checkpoint import load_checkpoint
from parity.checkpoints.inputs import Inputs, gate_batch
from parity.checkpoints.recipes import make_checkpoint
from parity.engine import budgets as B
from parity.engine.compare import Subject
from parity.engine.generation import STEP_COLUMNS, generation_check, judge
from parity.engine.reference_runner import ReferenceRunner
from parity.errors import ParityError

FP16 = Subject(variant="hf", dtype="float16")


@pytest.fixture(scope="module")
def stress_gpt2(tmp_path_factory):
    return make_checkpoint("gpt2", tmp_path_factory.mktemp("gen") / "gpt2", preset="stress")


def gate(capsys, ckpt, *args, report):
    rc = cli.main(["gate", str(ckpt), "--device", "cpu", "--report", str(report), *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def checks(report) -> dict[str, dict]:
    return {c["check"]: c for c in json.loads((report / "run.json").read_text())["checks"]}


# ----------------------------------------------------------------------------- healthy models
@pytest.mark.parametrize("family", reference.FAMILIES)
def test_a_healthy_fast_path_decodes_every_tiny_checkpoint_like_the_reference(
        family, tiny_checkpoints):
    ck = load_checkpoint(tiny_checkpoints[family])
    inp = gate_batch(ck.config, seed=0)
    g = generation_check(ck, inp, FP16, max_new_tokens=8, bounded=True)
    f = g.result.figures
    assert g.verdict == "pass", g.result.detail
    assert f["tokens_compared"] == inp.input_ids.shape[0] * 8 and f["exact_match"] == 1.0
    assert f["prompts_diverged"] == 0 and f["decoding"] == "KV cache"
    budget = B.budget_for(B.load_policy(), dtype="float16", family=family, site="logits")
    assert f["logits_floor_ratio"] <= budget.floor_ratio_warn
    assert list(g.steps.columns) == STEP_COLUMNS and set(g.steps["phase"]) == {"agree"}
    np.testing.assert_array_equal(g.reference_tokens, g.subject_tokens)


def test_the_streamed_reference_computes_what_the_in_memory_one_does(tiny_checkpoints):
    """Bounded memory (weights streamed per layer, chunked GEMMs) against the in-memory
    reference, with a past cache and as the rounding floor."""
    ck = load_checkpoint(tiny_checkpoints["gptj"])
    inp = gate_batch(ck.config, seed=1)
    head = Inputs(inp.input_ids[:, :-2], inp.attention_mask[:, :-2], inp.position_ids[:, :-2])
    tail = Inputs(inp.input_ids[:, -2:], inp.attention_mask, inp.position_ids[:, -2:])
    tol = B.tolerance("float64_exact")
    for floor in (None, "float16"):
        runs = [ReferenceRunner(ck, bounded=b) for b in (False, True)]
        outs = [r.forward(tail, past=r.forward(head, floor=floor).cache, floor=floor)
                for r in runs]
        a, b = (np.asarray(o.logits) for o in outs)
        assert a.shape == b.shape and np.abs(a - b).max() <= tol * np.abs(a).max(), floor


# ----------------------------------------------------------------------------- verdicts
def synthetic(margin: float, n=6, vocab=32, seed=0, diverge_at=2):
    """Reference logits whose top-1 leads by `margin` at step `diverge_at` of prompt 0, a floor
    0.01 away from them, and a subject that picks the runner-up there."""
    rng = np.random.default_rng(seed)
    r = rng.normal(size=(2, n, vocab))
    r[0, diverge_at] = np.sort(r[0, diverge_at])  # ascending: top-1 is the last token
    r[0, diverge_at, -1] = r[0, diverge_at, -2] + margin
    top = np.argmax(r, axis=-1)
    f = r + 0.01 * rng.choice([-1.0, 1.0], size=r.shape)
    sub = top.copy()
    sub[0, diverge_at:] = vocab - 2
    return top, r, sub, f


@pytest.mark.parametrize("margin, verdict, kind", [(0.05, "warn", "near-tie"),
                                                   (5.0, "fail", "decisive")])
def test_a_divergence_is_decisive_or_a_near_tie_by_the_margin_the_dtype_resolves(
        tiny_checkpoints, margin, verdict, kind):
    cfg = load_checkpoint(tiny_checkpoints["gpt2"]).config
    top, r, sub, f = synthetic(margin)
    policy = B.load_policy()
    g = judge(cfg, FP16, "float16", policy, top, r, sub, r, np.argmax(r, -1), r, f,
              asked=top.shape[1], has_cache=True)
    k = B.tolerance("generation_decisive_margin") * B.budget_for(
        policy, dtype="float16", family="gpt2", site="logits").floor_ratio_fail
    resolvable = k * float(np.abs(f - r).max())
    assert g.verdict == verdict, g.result.detail
    assert "first divergent step 2" in g.result.detail and kind in g.result.detail
    assert f"margin {margin:.3g} vs {resolvable:.3g}" in g.result.detail  # both numbers
    assert g.result.figures["first_divergent_steps"] == "2, -"
    phases = g.steps[g.steps["prompt"] == 0]["phase"].tolist()
    assert phases == ["agree", "agree", "divergence", "drift", "drift", "drift"]


def test_no_divergence_and_a_subject_at_the_floor_pass(tiny_checkpoints):
    cfg = load_checkpoint(tiny_checkpoints["gpt2"]).config
    top, r, _, f = synthetic(1.0)
    g = judge(cfg, FP16, "float16", B.load_policy(), top, r, top, f, top, f, f,
              asked=top.shape[1], has_cache=True)
    assert g.verdict == "pass" and g.result.figures["exact_match"] == 1.0, g.result.detail
    # the same subject with one step's logits non-finite fails, naming the step
    bad = f.copy()
    bad[1, 3, 0] = np.nan
    g = judge(cfg, FP16, "float16", B.load_policy(), top, r, top, bad, top, bad, f,
              asked=top.shape[1], has_cache=True)
    assert g.verdict == "fail" and "non-finite subject logits from step 3 of prompt 1" in \
        g.result.detail


def test_a_kv_cache_that_forgets_a_token_fails_the_generation_check(tiny_checkpoints):
    from tests.mutants import CacheForgets

    ck = load_checkpoint(tiny_checkpoints["gpt2"])
    inp = gate_batch(ck.config, seed=0)
    bug = CacheForgets(ck, "hf", dtype="float16")
    g = generation_check(ck, inp, FP16, max_new_tokens=6, model=bug)
    assert g.verdict == "fail", g.result.detail
    fail = B.budget_for(B.load_policy(), dtype="float16", family="gpt2",
                        site="logits").floor_ratio_fail
    assert g.result.figures["logits_floor_ratio"] > fail
    healthy = generation_check(ck, inp, FP16, max_new_tokens=6)
    assert healthy.verdict == "pass", healthy.result.detail


# ----------------------------------------------------------------------------- the gate
def test_gpt2_stress_in_naive_half_fp16_fails_generation_naming_the_first_divergent_step(
        stress_gpt2, tmp_path, capsys):
    rep, junit = tmp_path / "rep", tmp_path / "gate.xml"
    rc, out, err = gate(capsys, stress_gpt2, "--variant", "naive-half", "--dtype", "float16",
                        "--junit", junit, report=rep)
    assert (rc, err) == (1, ""), err
    c = checks(rep)
    gen = c["generation"]
    assert gen["verdict"] == "fail"
    assert "first divergent step 0" in gen["detail"] and "decisive" in gen["detail"]
    assert "non-finite subject logits" in gen["detail"]
    assert gen["figures"]["exact_match"] < 1 and gen["figures"]["prompts_diverged"] > 0
    assert c["cache"]["verdict"] == "fail" and c["batch"]["verdict"] == "fail"
    suite = ET.parse(junit).getroot()
    failing = {t.get("name") for t in suite.findall("testcase") if t.find("failure") is not None}
    assert {"generation", "cache", "batch", "subject"} <= failing
    msg = suite.find("testcase[@name='generation']/failure").get("message")
    assert "first divergent step 0" in msg
    summary = (rep / "summary.md").read_text()
    assert "## Generation" in summary and "step 0: decisive" in summary
    assert "| generation | **FAIL** |" in summary


def test_max_new_tokens_zero_skips_generation_and_a_negative_count_is_bad_input(
        tiny_checkpoints, tmp_path, capsys):
    rep = tmp_path / "zero"
    rc, out, err = gate(capsys, tiny_checkpoints["gpt2"], "--max-new-tokens", 0, report=rep)
    assert (rc, err) == (0, ""), err
    gen = checks(rep)["generation"]
    assert gen["verdict"] == "skip" and "--max-new-tokens 0" in gen["detail"]
    assert "generation not checked: --max-new-tokens 0" in out
    assert "## Generation" not in (rep / "summary.md").read_text()

    rep = tmp_path / "neg"
    rc, out, err = gate(capsys, tiny_checkpoints["gpt2"], "--max-new-tokens", -1, report=rep)
    assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "max-new-tokens" in err and "PASS" not in out
    assert not (rep / "summary.md").exists()


def test_a_policy_can_require_the_generation_check(tiny_checkpoints, tmp_path, capsys):
    policy = tmp_path / "policy.toml"
    policy.write_text(B.DEFAULT_FILE.read_text().replace('require = []',
                                                         'require = ["generation"]'))
    rep = tmp_path / "rep"
    rc, out, err = gate(capsys, tiny_checkpoints["gpt2"], "--policy", policy,
                        "--max-new-tokens", 0, report=rep)
    assert (rc, err) == (1, ""), err
    gen = checks(rep)["generation"]
    assert gen["verdict"] == "fail" and "required by the policy" in gen["detail"]


def test_openai_gpt_in_transformers_is_decoded_without_a_cache(tiny_checkpoints, tmp_path,
                                                               capsys):
    pytest.importorskip("transformers")
    rep = tmp_path / "rep"
    rc, out, err = gate(capsys, tiny_checkpoints["openai-gpt"], "--impl", "hf",
                        "--max-new-tokens", 6, report=rep)
    assert (rc, err) == (0, ""), err
    c = checks(rep)
    assert c["generation"]["verdict"] == "pass", c["generation"]["detail"]
    assert "no cache" in c["generation"]["figures"]["decoding"]
    assert c["cache"]["verdict"] == "skip" and "no key/value cache" in c["cache"]["detail"]
    assert c["batch"]["verdict"] == "pass"


def test_parity_generate_compare_is_the_generation_check(tiny_checkpoints):
    g = parity.generate_compare(tiny_checkpoints["gptj"], np.array([[1, 2, 3, 4, 5, 6]]),
                                dtype="bf16", max_new_tokens=4)
    assert g.verdict == "pass", g.result.detail
    assert isinstance(g.steps, pd.DataFrame) and len(g.steps) == 4
    assert g.result.figures["tokens_compared"] == 4
    with pytest.raises(ParityError, match="out of range"):
        parity.generate_compare(tiny_checkpoints["gpt2"], np.array([[1, 2, 10**6]]))


def test_the_gate_batch_row_pools_rows_and_sees_a_leaking_pad(tiny_checkpoints):
    """The batch row judges every row's real tokens pooled (a three-token prompt alone is a
    few dozen elements per site, where a floor ratio is noise): a subject whose real tokens see
    the pads fails it, the healthy one passes."""
    from parity.engine.consistency import gate_sites, pooled_batch_check
    from tests.mutants import PadsLeak

    ck = load_checkpoint(tiny_checkpoints["gpt_neo"])
    ids = np.array([[464, 3, 290, 318, 11, 7, 8, 9, 10, 12, 13], [0] * 8 + [5, 6, 7]])
    mask = (np.arange(11)[None] >= np.array([[0], [8]])).astype(np.int64)
    inp = Inputs(ids, mask, np.maximum(np.cumsum(mask, axis=1) - 1, 0))
    sites = gate_sites("gpt_neo")
    healthy = pooled_batch_check(ck, inp, FP16, sites=sites)
    assert set(healthy["case"]) == {"2 rows pooled, 8 pads (tokens row 0: 0..10; row 1: 11..13)"}
    assert set(healthy["verdict"]) == {"pass"}, healthy[["site", "reason"]]
    leak = pooled_batch_check(ck, inp, FP16, sites=sites, model_factory=PadsLeak)
    assert leak["verdict"].isin(["fail"]).any()


def test_a_model_too_large_to_restream_skips_the_costly_rows_unless_asked(
        tiny_checkpoints, tmp_path, capsys, monkeypatch):
    """Over LARGE_MODEL_ELEMENTS weights in bounded memory (GPT-J-6B's shape) the cache, batch
    and generation rows are skipped by default, saying why and how to run them; --max-new-tokens
    runs them. The threshold is lowered here so a tiny model stands for a large one."""
    from parity.engine import generation as G

    gptj6b = reference.parse_config({"model_type": "gptj", "n_embd": 4096, "n_layer": 28,
                                     "n_head": 16, "rotary_dim": 64, "vocab_size": 50400,
                                     "n_positions": 2048})
    assert G.too_costly(gptj6b, bounded=True) and not G.too_costly(gptj6b, bounded=False)
    assert not G.too_costly(load_checkpoint(tiny_checkpoints["gpt2"]).config, bounded=True)
    monkeypatch.setattr(G, "LARGE_MODEL_ELEMENTS", 0)
    rep = tmp_path / "default"
    rc, out, err = gate(capsys, tiny_checkpoints["gpt2"], report=rep)
    assert (rc, err) == (0, ""), err
    c = checks(rep)
    for name in ("cache", "batch", "generation"):
        assert c[name]["verdict"] == "skip" and "--max-new-tokens N runs them" in c[name]["detail"]
    rep = tmp_path / "asked"
    rc, out, err = gate(capsys, tiny_checkpoints["gpt2"], "--max-new-tokens", 2, report=rep)
    assert (rc, err) == (0, ""), err
    c = checks(rep)
    assert [c[n]["verdict"] for n in ("cache", "batch", "generation")] == ["pass"] * 3
    assert c["generation"]["figures"]["new_tokens"] == 2


def test_prompts_that_fill_every_position_skip_generation_with_the_reason(tiny_checkpoints,
                                                                          tmp_path, capsys):
    ck = tiny_checkpoints["gpt2"]
    n = load_checkpoint(ck).config.n_positions
    prompts = tmp_path / "full.txt"
    prompts.write_text("ids: " + " ".join(["7"] * n) + "\n")
    rep = tmp_path / "rep"
    rc, out, err = gate(capsys, ck, "--prompts", prompts, report=rep)
    assert (rc, err) == (0, ""), err
    gen = checks(rep)["generation"]
    assert gen["verdict"] == "skip" and f"fill all {n} positions" in gen["detail"]


@pytest.mark.slow(reason="compiles the fast path once per new sequence length (Inductor, "
                         "static shapes): about 30 s on 2 cores")
def test_a_compiled_fast_subject_decodes_with_its_cache_and_passes(tiny_checkpoints, tmp_path,
                                                                   capsys):
    rep = tmp_path / "rep"
    rc, out, err = gate(capsys, tiny_checkpoints["gpt2"], "--compile", "inductor",
                        "--max-new-tokens", 2, report=rep)
    assert (rc, err) == (0, ""), err
    c = checks(rep)
    assert c["generation"]["verdict"] == "pass", c["generation"]["detail"]
    assert c["generation"]["figures"]["decoding"] == "KV cache"
    assert c["cache"]["verdict"] == "pass" and c["batch"]["verdict"] == "pass"

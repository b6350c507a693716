"""`parity/engine/compare.py` and the verdict budgets: no false alarms on healthy presets, every
planted bug flagged at its layer, the stress checkpoints' known findings, the budgets schema, and
the shape of the comparison frame.

Local vs accumulated: a bug planted in layer L must be pinned on layer L in `local` mode (each
layer fed the reference's input), at a site of the planted op; in `accumulated` mode the first
non-pass may only come at L or later (the layers before L are healthy, and the bug's error may be
diluted by the error the subject inherited, so it can show up later or as a warning).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

import reference
from parity.engine import budgets as B
from parity.checkpoints.checkpoint import load_checkpoint
from parity.engine.compare import (COLUMNS, MODES, Subject, compare, first_divergent, overall,
                            verdict)
from parity.errors import ParityError
from parity.checkpoints.inputs import default_batch
from parity.checkpoints.recipes import make_checkpoint
from reference.sites import site_names

from tests import mutants as Mu

PRESETS = ("hf", "meg", "sdpa", "naive-half")
HALVES = ("float16", "bfloat16")
SEEDS = (0, 1, 2)
SEQ = {"tiny": 16, "stress": 24}   # stress: longer than GPT-Neo's window of 8
PLANTED = 2                         # the layer the mutants break (of 4): not the first, not the last


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """(family, preset, seed) -> loaded checkpoint, made on first use."""
    root, made = tmp_path_factory.mktemp("compare"), {}

    def get(family, preset="tiny", seed=0):
        key = (family, preset, seed)
        if key not in made:
            made[key] = load_checkpoint(make_checkpoint(family, root / f"{family}-{preset}-{seed}",
                                                        preset=preset, seed=seed))
        return made[key]
    return get


def run(ckpt, subjects, preset="tiny", seed=0, **kw) -> pd.DataFrame:
    return compare(ckpt, default_batch(ckpt.config, SEQ[preset], seed=seed), subjects,
                   label=preset, **kw)


def first(df, mode):
    """(site, layer, verdict) of the first non-pass of the frame's single subject, or None."""
    f = first_divergent(df, mode)
    assert len(f) <= 1
    return None if f.empty else (f["site"].iloc[0], f["layer"].iloc[0], f["verdict"].iloc[0])


# ----------------------------------------------------------------------------- no false alarms
@pytest.mark.parametrize("family", reference.FAMILIES)
def test_healthy_presets_stay_within_budget_on_many_seeds(ckpts, family):
    """Every preset in fp16 and bf16 on tiny checkpoints of three seeds (weights and tokens):
    no site fails or overflows, in either mode."""
    subjects = [Subject(variant=v, dtype=d) for v in PRESETS for d in HALVES]
    for seed in SEEDS:
        df = run(ckpts(family, seed=seed), subjects, seed=seed)
        bad = df[df["verdict"].isin(["fail", "overflow"])]
        assert bad.empty, (f"seed {seed}:\n"
                           + bad[["variant", "dtype", "mode", "site", "reason"]].to_string())
        assert set(df["mode"]) == set(MODES)


# ----------------------------------------------------------------------------- planted bugs
# mutant -> the sites of the planted op where local mode must pin it
MUTANTS = {
    Mu.WrongScale: ("attn.scores",),
    # the extra visible key is masked in the reference, so scores there are not compared; the
    # probability that leaks into it is
    Mu.MaskOffByOne: ("attn.probs",),
    Mu.WrongLnEps: ("ln_1",),
    Mu.WrongGelu: ("mlp.act",),
}


def _cases():
    for cls, sites in MUTANTS.items():
        for family in reference.FAMILIES:
            yield pytest.param(cls, family, "float16", sites, id=f"{cls.__name__}-{family}-fp16")
    for cls in (Mu.WrongScale, Mu.MaskOffByOne):
        for family in ("gpt2", "gpt_neo"):
            yield pytest.param(cls, family, "bfloat16", MUTANTS[cls],
                               id=f"{cls.__name__}-{family}-bf16")


@pytest.mark.parametrize("cls,family,dtype,sites", list(_cases()))
def test_planted_bug_is_flagged_at_its_layer(ckpts, cls, family, dtype, sites):
    df = run(ckpts(family), [Subject(variant="hf", dtype=dtype)],
             model_factory=Mu.factory(cls, PLANTED))
    assert overall(df) == "fail"
    site, layer, v = first(df, "local")
    assert layer == PLANTED and site in {f"blocks.{PLANTED}.{s}" for s in sites}, (site, v)
    assert v == "fail"
    acc = first(df, "accumulated")
    assert acc is not None and acc[1] is not pd.NA and acc[1] >= PLANTED, acc
    # the healthy layers before it pass in both modes; in local mode the ones after it pass too
    # (each is fed the reference's input: the error is not inherited)
    early = df[df["layer"].notna() & (df["layer"] < PLANTED)]
    assert set(early["verdict"]) == {"pass"}
    local = df[df["mode"] == "local"]
    late = local[local["layer"].isna() | (local["layer"] > PLANTED)]
    late = late[late["site"] != "embed"]
    assert set(late["verdict"]) == {"pass"}, late[late["verdict"] != "pass"][["site", "reason"]]


def test_missing_upcast_on_gpt_neo_stress_is_flagged_at_its_layer(ckpts):
    """GPT-Neo's unscaled scores need HF's fp32 upcast; the mutant computes and stores them in
    fp16 in one layer: the scores of that layer cannot be held (overflow), and the non-finite
    values that follow are classified as that overflow's consequence."""
    df = run(ckpts("gpt_neo", "stress"), [Subject(variant="hf", dtype="float16")], "stress",
             model_factory=Mu.factory(Mu.NoUpcast, PLANTED))
    assert overall(df) == "overflow"  # what follows inherits it: overflow, not a parity failure
    site = f"blocks.{PLANTED}.attn.scores"
    assert first(df, "local") == (site, PLANTED, "overflow")
    assert first(df, "accumulated") == (site, PLANTED, "overflow")
    row = df[(df["site"] == site) & (df["mode"] == "local")].iloc[0]
    assert row["site_dtype"] == "float16" and row["ref_max_abs"] > 65504
    healthy = df[(df["site"] == "blocks.0.attn.scores")]
    assert set(healthy["site_dtype"]) == {"float32"} and set(healthy["verdict"]) == {"pass"}


# ----------------------------------------------------------------------------- stress findings
def test_gpt2_stress_fp16_hf_overflows_raw_scores_meg_does_not(ckpts):
    """HF GPT-2 computes q.k^T in fp16 and scales afterwards: the raw product passes 65504 where
    the scaled scores fit. Megatron's baddbmm scales inside the GEMM and stays finite."""
    df = run(ckpts("gpt2", "stress"), [Subject(variant="hf", dtype="float16"),
                                       Subject(variant="meg", dtype="float16")],
             "stress")
    hf, meg = df[df["variant"] == "hf"], df[df["variant"] == "meg"]
    for mode in MODES:
        f = first_divergent(hf, mode)
        assert len(f) == 1
        site, layer = f["site"].iloc[0], f["layer"].iloc[0]
        assert site == f"blocks.{layer}.attn.scores" and f["verdict"].iloc[0] == "fail"
        row = hf[(hf["site"] == site) & (hf["mode"] == mode)].iloc[0]
        # a fail, not an overflow: the scaled reference fits in fp16, the subject does not
        assert row["nonfinite"] > 0 and row["ref_max_abs"] < 65504 and row["headroom"] > 1
    assert overall(hf) == "fail"
    assert overall(meg) == "pass"


def test_gpt_neo_stress_fp16_naive_half_overflows_hf_upcast_passes(ckpts):
    df = run(ckpts("gpt_neo", "stress"), [Subject(variant="naive-half", dtype="float16"),
                                          Subject(variant="hf", dtype="float16")], "stress")
    naive, hf = df[df["variant"] == "naive-half"], df[df["variant"] == "hf"]
    for mode in MODES:
        assert first(naive, mode) == ("blocks.0.attn.scores", 0, "overflow")
    row = naive[naive["site"] == "blocks.0.attn.scores"].iloc[0]
    assert row["ref_max_abs"] > 65504 and row["headroom"] < 1
    assert overall(hf) == "pass"
    assert set(hf[hf["kind"] == "attn.scores"]["site_dtype"]) == {"float32"}


# ----------------------------------------------------------------------------- verdict rules
BUDGET = B.Budget(floor_ratio_warn=2.0, floor_ratio_fail=8.0, top1_min=0.9, kl_max=1e-3)


def metrics(**kw):
    m = dict(ref_max_abs=1.0, nonfinite=0, headroom=65504.0, rel_l2=1e-3, floor_ratio=1.0,
             top1=math.nan, kl=math.nan)
    return {**m, **kw}


@pytest.mark.parametrize("m,site,expected", [
    (metrics(), "blocks.0.ln_1", "pass"),
    (metrics(floor_ratio=2.0), "blocks.0.ln_1", "pass"),       # limits are "greater than"
    (metrics(floor_ratio=2.5), "blocks.0.ln_1", "warn"),
    (metrics(floor_ratio=8.5), "blocks.0.ln_1", "fail"),
    (metrics(nonfinite=3), "blocks.0.ln_1", "fail"),
    (metrics(nonfinite=3, ref_max_abs=7e4), "blocks.0.attn.scores", "overflow"),
    # fp16's overflow threshold is 65520 (max 65504 plus half an ulp of 32, ties to even)
    (metrics(nonfinite=3, ref_max_abs=65520.0), "blocks.0.attn.scores", "overflow"),
    (metrics(ref_max_abs=65519.0), "blocks.0.attn.scores", "pass"),   # rounds to 65504: held
    (metrics(top1=0.5, kl=0.0), "logits", "fail"),
    (metrics(top1=1.0, kl=1e-2), "logits", "fail"),
    (metrics(top1=1.0, kl=1e-4), "logits", "pass"),
])
def test_verdict_rules(m, site, expected):
    v, why = verdict(m, BUDGET, site, "float16", "float16")
    assert v == expected
    assert (why == "") == (expected == "pass")


def test_verdict_of_a_wide_site_uses_its_own_range():
    """Upcast scores kept in fp32 may exceed 65504: no overflow for an fp16 subject."""
    assert verdict(metrics(ref_max_abs=7e4), BUDGET, "blocks.0.attn.scores", "float32",
                   "float16")[0] == "pass"


def test_overall_severity_order():
    df = lambda *vs: pd.DataFrame({"verdict": list(vs)})  # noqa: E731
    assert overall(df("pass", "pass")) == "pass"
    assert overall(df("pass", "warn")) == "warn"
    assert overall(df("warn", "overflow")) == "overflow"
    assert overall(df("overflow", "fail", "warn")) == "fail"


# ----------------------------------------------------------------------------- budgets schema
GOOD_DEFAULTS = """
schema = "parity-budgets/1"
[defaults.float16]
floor_ratio_warn = 2.0
floor_ratio_fail = 8.0
top1_min = 0.9
kl_max = 1e-3
"""

GARBLED = {
    "bad_toml": ("schema = \n[defaults", "not valid TOML"),
    "no_defaults": ('schema = "parity-budgets/1"\n', "defaults"),
    "defaults_incomplete": ('schema = "parity-budgets/1"\n[defaults.float16]\n'
                            "floor_ratio_warn = 2.0\n", "lacks"),
    "override_without_reason": (GOOD_DEFAULTS + '[[overrides]]\nfamily = "gpt2"\n'
                                "floor_ratio_fail = 20\n", "reason"),
    "override_unknown_key": (GOOD_DEFAULTS + '[[overrides]]\nfamly = "gpt2"\n'
                             'floor_ratio_fail = 20\nreason = "r"\n', "famly"),
    "override_without_budget": (GOOD_DEFAULTS + '[[overrides]]\nfamily = "gpt2"\n'
                                'reason = "r"\n', "sets no budget"),
    "non_numeric": (GOOD_DEFAULTS + '[[overrides]]\nfamily = "gpt2"\n'
                    'floor_ratio_fail = "eight"\nreason = "r"\n', "must be a number"),
    "negative": (GOOD_DEFAULTS.replace("kl_max = 1e-3", "kl_max = -1"), "negative"),
    "wrong_schema": (GOOD_DEFAULTS.replace("parity-budgets/1", "parity-budgets/9"), "schema"),
}


@pytest.mark.parametrize("name", GARBLED)
def test_garbled_policy_files_raise_naming_the_file(tmp_path, name):
    text, words = GARBLED[name]
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    with pytest.raises(ParityError) as e:
        B.load_policy(str(path))
    assert str(path) in str(e.value) and words in str(e.value)


def test_the_shipped_budgets_file_is_a_valid_policy():
    policy = B.load_policy()
    assert {"float16", "bfloat16"} <= set(policy["defaults"])


def test_overrides_apply_by_glob_and_later_wins(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(GOOD_DEFAULTS + """
[[overrides]]
family = "gpt*"
site = "blocks.*.attn.scores"
floor_ratio_fail = 20
reason = "first"

[[overrides]]
family = "gpt_neo"
floor_ratio_fail = 30
reason = "second"
""")
    policy = B.load_policy(str(path))
    get = lambda **kw: B.budget_for(policy, dtype="float16", **kw)  # noqa: E731
    b = get(family="gpt2", site="blocks.3.attn.scores")
    assert (b.floor_ratio_fail, b.floor_ratio_warn, b.reason) == (20, 2.0, "first")
    b = get(family="gpt_neo", site="blocks.0.attn.scores")
    assert (b.floor_ratio_fail, b.reason) == (30, "first; second")    # both match, later wins
    assert get(family="gpt_neo", site="blocks.0.ln_1").floor_ratio_fail == 30
    assert get(family="gpt2", site="blocks.0.attn.probs").floor_ratio_fail == 8.0
    # globs are anchored: "gpt*" does not match "openai-gpt"
    assert get(family="openai-gpt", site="blocks.0.attn.scores").floor_ratio_fail == 8.0


def test_an_override_changes_a_verdict_in_compare(ckpts, tmp_path):
    """The same subject under a policy whose fail limit is below 1 fails everywhere on GPT-2
    attention sites only (the override's glob)."""
    path = tmp_path / "strict.toml"
    path.write_text(GOOD_DEFAULTS + '[[overrides]]\nsite = "blocks.*.attn.*"\n'
                    'floor_ratio_warn = 0\nfloor_ratio_fail = 0\nreason = "strict"\n')
    df = run(ckpts("gpt2"), [Subject(variant="meg", dtype="float16")], modes=("local",),
             policy=B.load_policy(str(path)))
    attn = df[df["kind"].str.startswith("attn.")]
    rest = df[~df["kind"].str.startswith("attn.")]
    assert set(attn["verdict"]) == {"fail"} and set(attn["budget_fail"]) == {0.0}
    assert set(rest["verdict"]) == {"pass"}


# ----------------------------------------------------------------------------- the frame
def test_frame_has_the_columns_and_one_row_per_site_mode_subject(ckpts):
    ck = ckpts("gptj")
    subjects = [Subject(variant="hf", dtype="float16"), Subject(variant="meg", dtype="bfloat16"),
                Subject(variant="sdpa", dtype="float16")]
    df = run(ck, subjects)
    assert list(df.columns) == COLUMNS
    assert str(df["layer"].dtype) == "Int64"
    names = site_names("gptj", ck.config.n_layer)
    assert len(df) == len(subjects) * len(MODES) * len(names)
    assert not df.duplicated(["variant", "dtype", "mode", "site"]).any()
    for (variant, dtype, mode), g in df.groupby(["variant", "dtype", "mode"], sort=False):
        assert list(g["site"]) == names                       # execution order
    assert df.loc[df["site"] == "embed", "layer"].isna().all()
    assert (df.loc[df["site"] == "blocks.3.mlp.act", "layer"] == 3).all()
    logits = df[df["site"] == "logits"]
    assert logits["top1"].notna().all() and df[df["site"] != "logits"]["top1"].isna().all()
    assert set(df["family"]) == {"gptj"} and set(df["checkpoint"]) == {"tiny"}
    assert np.isfinite(df["floor_ratio"]).all()


def test_a_policy_without_the_subjects_dtype_is_an_error(tmp_path):
    """A subject is never judged by another dtype's limits."""
    p = tmp_path / "policy.toml"
    p.write_text('schema = "parity-budgets/1"\n[defaults.float16]\nfloor_ratio_warn = 2\n'
                 'floor_ratio_fail = 8\ntop1_min = 0.9\nkl_max = 0.001\nreason = "x"\n')
    policy = B.load_policy(str(p))
    assert B.budget_for(policy, dtype="float16").floor_ratio_fail == 8
    with pytest.raises(ParityError, match=r"no \[defaults.bfloat16\]"):
        B.budget_for(policy, dtype="bfloat16")

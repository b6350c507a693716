"""`parity/engine/attribution.py`: which knob causes a divergence, and where two recipes part ways.

On the stress checkpoints the knobs bite: flipping the one that matters removes the error (the
overflow), flipping one that does not leaves the logit error where it was. On the tiny GPT-2
the `meg` and `hf` recipes differ in three precision knobs, and only the gelu moves a single
bit: the score scale of a 16-wide head is 1/4, a power of two, so scaling inside the GEMM
(baddbmm) or after it (matmul) rounds the same; and a half-precision LayerNorm computes in fp32
and rounds once whether or not the model upcasts around it (parity/subjects/EMULATION.md, LayerNorm).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import reference
from parity.engine import budgets as B
from parity.engine.attribution import ATTR_COLUMNS, PRECISE, knob_attribution, pair_divergence
from parity.checkpoints.checkpoint import load_checkpoint
from parity.engine.compare import Subject, compare, first_divergent, overall
from parity.checkpoints.inputs import default_batch
from parity.subjects.knobs import parse_variant
from parity.checkpoints.recipes import make_checkpoint

IRRELEVANT = "attribution_irrelevant_share"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root, made = tmp_path_factory.mktemp("attribution"), {}

    def get(family, preset):
        if (family, preset) not in made:
            ck = load_checkpoint(make_checkpoint(family, root / f"{family}-{preset}",
                                                 preset=preset, seed=0))
            made[family, preset] = (ck, default_batch(ck.config, 24 if preset == "stress"
                                                      else 16, seed=0))
        return made[family, preset]
    return get


def _show(v) -> str:
    return "on" if v is True else "off" if v is False else str(v)


def by_knob(df):
    return {r.knob: r for r in df.itertuples()}


# ----------------------------------------------------------------------------- the knob that matters
@pytest.mark.parametrize("family,variant,knobs", [
    ("gpt2", "hf", ("attn_scores", "attn_upcast")),        # raw q.k^T passes 65504 before scaling
    ("gpt_neo", "naive-half", ("attn_scores", "attn_upcast")),  # unscaled scores need fp32
])
def test_the_knob_that_matters_removes_the_overflow(ckpts, family, variant, knobs):
    ck, inp = ckpts(family, "stress")
    df = knob_attribution(ck, inp, variant, "float16", label="stress")
    assert list(df.columns) == ATTR_COLUMNS
    rows = by_knob(df)
    for k in knobs:
        r = rows[k]
        assert (r.share, r.note) == (1.0, "removes the non-finite values")
        assert math.isinf(r.error_before) and math.isfinite(r.error_after)
    # the other knobs leave the non-finite values in place
    for k, r in rows.items():
        if k not in knobs:
            assert (r.share, r.note) == (0.0, "still non-finite"), k
    # after the flip the subject is healthy: every site within budget, in both modes
    for k in knobs:
        flipped = f"{variant}+{k}={_show(PRECISE[k])}"
        df = compare(ck, inp, [Subject(variant=flipped, dtype="float16")], label="stress")
        assert overall(df) == "pass", flipped


@pytest.mark.parametrize("family,variant,dtype", [
    ("gpt2", "meg", "float16"), ("gpt2", "sdpa", "bfloat16"), ("gpt_neo", "hf", "float16"),
    ("gptmeg", "hf", "bfloat16"),
])
def test_knobs_that_do_not_matter_get_a_share_near_zero(ckpts, family, variant, dtype):
    """Subjects whose logits stay finite on the stress checkpoints: their error is the
    rounding of the residual outliers, which no knob changes."""
    ck, inp = ckpts(family, "stress")
    df = knob_attribution(ck, inp, variant, dtype, label="stress")
    assert len(df) > 0
    assert np.isfinite(df["error_before"]).all() and np.isfinite(df["error_after"]).all()
    assert (df["share"].abs() <= B.tolerance(IRRELEVANT)).all(), df[["knob", "share"]]
    # a knob the family does not have (rotary off GPT-J) changes nothing at all
    if "rotary" in set(df["knob"]):
        assert by_knob(df)["rotary"].share == 0.0


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_attribution_at_a_site_names_gptj_rotary(ckpts, dtype):
    """GPT-J stress: HF rotates q and k in the half dtype with a half sin/cos table. Measured
    where that happens (layer 1's attn.q, local mode, so that only the layer that makes the
    error counts), rotary=fp32 removes a visible share of the error (measured 10%: HF's q is
    1.11x the floor) and no other knob moves it at all. (Attention rows downstream whose
    probabilities the dtype cannot resolve are not judged, so this small error no longer shows
    as a lottery of 8-15x at attn.probs.)"""
    ck, inp = ckpts("gptj", "stress")
    site = "blocks.1.attn.q"
    df = knob_attribution(ck, inp, "hf", dtype, label="stress", site=site, mode="local")
    assert set(df["site"]) == {site}
    rows = by_knob(df)
    assert rows["rotary"].share > B.tolerance(IRRELEVANT), rows["rotary"]
    others = df[df["knob"] != "rotary"]
    assert len(others) and (others["share"] == 0.0).all(), others


def test_flips_are_the_precise_choices_the_subject_lacks(ckpts):
    ck, inp = ckpts("gpt2", "tiny")
    knobs = parse_variant("naive-half", "gpt2", ck.config)
    df = knob_attribution(ck, inp, "naive-half", "float16")
    expected = {k for k, v in PRECISE.items() if getattr(knobs, k) != v}
    assert set(df["knob"]) == expected
    for r in df.itertuples():
        want = PRECISE[r.knob]
        assert r.to_value == _show(want)


def test_meg_against_hf_lists_only_the_knobs_that_differ(ckpts):
    ck, inp = ckpts("gpt2", "tiny")
    meg, hf = (parse_variant(v, "gpt2", ck.config) for v in ("meg", "hf"))
    df = knob_attribution(ck, inp, "meg", "float16", target="hf")
    assert set(df["target"]) == {"hf"}
    # mask_fill differs too, but it only changes entries that get zero weight: not attributed
    assert set(df["knob"]) == set(meg.diff(hf)) & set(PRECISE) == {"attn_scores", "gelu",
                                                                   "layernorm"}
    rows = by_knob(df)
    assert rows["gelu"].error_before > 0
    assert (rows["gelu"].error_after, rows["gelu"].share) == (0.0, 1.0)   # meg+gelu=tanh == hf
    assert rows["attn_scores"].share == 0.0 and rows["layernorm"].share == 0.0
    assert (rows["gelu"].from_value, rows["gelu"].to_value) == ("jit", "tanh")


# ----------------------------------------------------------------------------- subject vs subject
def test_pair_divergence_of_identical_variants_is_identical_everywhere(ckpts):
    ck, inp = ckpts("gptj", "tiny")
    df = pair_divergence(ck, inp, "hf", "hf", "float16")
    assert list(df["site"]) == reference.site_names("gptj", ck.config.n_layer)
    assert df["identical"].all()
    assert (df["rel_l2"] == 0).all() and (df["max_ulp"] == 0).all()


def test_meg_and_hf_part_ways_at_the_first_gelu_on_gpt2(ckpts):
    ck, inp = ckpts("gpt2", "tiny")
    df = pair_divergence(ck, inp, "meg", "hf", "float16")
    names = list(df["site"])
    split = names.index("blocks.0.mlp.act")
    # embed, ln_1 (fp32 vs native LN), the attention scores (baddbmm vs matmul with a power-of-
    # two scale) and everything up to the MLP input: bitwise the same
    assert df["identical"].iloc[:split].all()
    assert {"embed", "blocks.0.ln_1", "blocks.0.attn.scores"} <= set(names[:split])
    row = df.iloc[split]
    assert not row["identical"] and row["rel_l2"] > 0 and row["max_ulp"] >= 1
    assert not df["identical"].iloc[split:].all()


def test_pair_divergence_finds_where_matmul_then_scale_overflows(ckpts):
    """GPT-2 stress, fp16: scaling after the GEMM (hf) and inside it (baddbmm) agree until the
    first layer whose raw q.k^T passes 65504 - the layer `compare` flags."""
    ck, inp = ckpts("gpt2", "stress")
    df = pair_divergence(ck, inp, "hf", "hf+attn_scores=baddbmm", "float16")
    first_diff = df[~df["identical"]].iloc[0]
    flagged = first_divergent(compare(ck, inp, [Subject(variant="hf", dtype="float16")],
                                      label="stress",
                                      modes=("accumulated",)), "accumulated")
    assert first_diff["site"] == flagged["site"].iloc[0]
    assert first_diff["site"].endswith(".attn.scores")
    assert first_diff["rel_l2"] == math.inf and first_diff["max_ulp"] == math.inf

"""`parity search` reports only meaningful figures (issue 11): a floor ratio over a floor ~0 is
"not measured", never a giant number nor the search's target; reproducers are strict JSON; the
worst examples, failing ones included, are always written."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from parity.commands import search as S
from parity.engine.compare import COLUMNS, Subject, compare
from parity.checkpoints.inputs import Inputs

U16, UB16 = 2.0 ** -11, 2.0 ** -8


def _frame(*rows) -> pd.DataFrame:
    """A comparison frame (one subject): rows as (mode, site, rel_l2, floor_rel_l2[, kw])."""
    out = []
    for mode, site, rel, floor, *kw in rows:
        r = dict.fromkeys(COLUMNS)
        r.update(family="gptj", checkpoint="search", variant="hf", dtype="bfloat16",
                 device="cpu", emulate=False, mode=mode, site=site, layer=1, kind=site,
                 site_dtype="bfloat16", rel_l2=rel, floor_rel_l2=floor,
                 floor_ratio=(rel / floor if floor else (1.0 if rel == 0 else math.inf)),
                 nonfinite=0, headroom=1e30, ref_max_abs=1.0, verdict="pass", reason="",
                 budget_warn=2.0, budget_fail=8.0)
        r.update(*kw)
        out.append(r)
    return pd.DataFrame(out, columns=COLUMNS)


def test_a_ratio_over_a_floor_near_zero_is_not_measured():
    df = _frame(("local", "blocks.1.attn.q", 0.004, 0.0035),  # a genuine floor: ~0.9 u
                # a saturated softmax: the floor is 1e-9 u, the ratio 5.8e10 (issue 11's figure)
                ("local", "blocks.1.attn.probs", 0.218, 3.79e-12, {"verdict": "fail"}),
                ("accumulated", "blocks.2.attn.probs", 0.15, 0.0))  # floor exactly 0: inf
    assert df["floor_ratio"].max() == math.inf
    assert list(S.measured(df)) == [True, False, False]
    f = S.figures(df)
    assert f["floor_ratio"] == pytest.approx(0.004 / 0.0035)
    assert f["floor_ratio_site"] == "blocks.1.attn.q"
    assert f["unmeasured_sites"] == 2
    assert f["unmeasured_site"] == "blocks.1.attn.probs (local)"
    assert f["unmeasured_rel_l2"] == pytest.approx(0.218)


def test_the_threshold_is_relative_to_the_unit_roundoff_of_the_site_dtype():
    floor = 0.5 * S.FLOOR_MIN_U * UB16  # below the line in bf16, 4x above it in fp16's u
    assert not S.measured(_frame(("local", "x", 1e-3, floor)))[0]
    assert S.measured(_frame(("local", "x", 1e-3, floor, {"site_dtype": "float16"})))[0]
    assert S.measured(_frame(("local", "x", 1e-3, S.FLOOR_MIN_U * UB16)))[0]


def test_only_unmeasured_sites_give_a_nan_not_a_number_and_non_finite_stays_inf():
    f = S.figures(_frame(("local", "blocks.0.attn.probs", 0.1, 1e-40)))
    assert math.isnan(f["floor_ratio"]) and f["floor_ratio_site"] == ""
    assert S._fmt(f["floor_ratio"]) == S.NOT_MEASURED == "not measured (floor ~0)"
    # a subject that is non-finite where the reference is finite is measured: inf, the worst
    g = S.figures(_frame(("local", "blocks.0.attn.probs", math.inf, 0.0, {"nonfinite": 3}),
                         ("local", "blocks.0.attn.q", 0.004, 0.0035)))
    assert g["floor_ratio"] == math.inf and g["floor_ratio_site"] == "blocks.0.attn.probs"


def test_a_real_saturated_softmax_does_not_make_the_worst_floor_ratio():
    """The example of issue 11 (gptj stress, bf16, q/k x64): softmax probabilities 0 and 1 give
    floors of 1e-42 u, and the old figure read 5.4e+43."""
    ck = S.scaled_checkpoint(S.base_checkpoint("gptj", "stress", None, 550),
                             {"embed": 64, "mlp": 64, "qk": 64})
    ids = np.array([[181, 511, 100, 267, 100, 511, 227, 511, 84, 395, 0, 511, 99]])
    df = compare(ck, Inputs(ids, np.ones_like(ids), np.arange(13)[None]),
                 [Subject(variant="hf", dtype="bfloat16")], label="search")
    # the saturated rows are ones bf16 cannot resolve: compare no longer judges them
    # (attention_resolvable), so no giant ratio is formed at all, and the search's figure is the
    # worst measured one
    probs = df[df["kind"] == "attn.probs"]
    assert probs["reason"].str.contains("not judged").any()
    assert df["floor_ratio"].max() < 100
    f = S.figures(df)
    assert f["floor_ratio"] == df.loc[S.measured(df), "floor_ratio"].max() < 100


# ----------------------------------------------------------------------------- reproducers
def _record(chunk, example, seed, floor_ratio, verdict="pass", headroom=1e3, **kw) -> dict:
    r = dict(chunk=chunk, example=example, seed=seed, scales={"embed": 1, "qk": 1, "mlp": 1},
             batch=[1, 4], input_ids=[[1, 2, 3, 4]], attention_mask=None, position_ids=None,
             floor_ratio=floor_ratio, floor_ratio_site="blocks.0.attn.q" if not
             math.isnan(floor_ratio) else "", floor_ratio_mode="local", unmeasured_sites=0,
             unmeasured_site="", unmeasured_rel_l2=0.0, headroom=headroom,
             headroom_site="blocks.0.attn.scores", verdict=verdict, first_local="",
             first_accumulated="", overflow_sites=0)
    r.update(kw)
    return r


def _strict(text: str):
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def _search(records) -> S.Search:
    s = S.Search("gpt2", "hf", "bfloat16", "tiny", 1, 1, 1, len(records), 0, 8)
    s.records = records
    return s


def test_reproducers_are_strict_json_and_keep_the_worst_and_the_failing_examples(tmp_path):
    records = [
        _record(0, 0, 5, math.inf, "fail", nonfinite=1),             # the worst: non-finite
        _record(0, 1, 5, 3.0, "fail"),                               # same checkpoint, failing
        _record(0, 2, 6, 2.0, "warn", headroom=math.inf),
        _record(0, 3, 7, 1.5),
        _record(0, 4, 8, 1.2),
        _record(0, 5, 9, math.nan, "overflow", unmeasured_sites=2,   # nothing measured, and
                unmeasured_site="blocks.0.attn.probs (local)",       # the least headroom
                unmeasured_rel_l2=0.2, headroom=1.5),
        _record(0, 6, 10, 1.1, "fail"),
    ]
    res = S.write_outputs(tmp_path, _search(records), top=2)
    cases = sorted(tmp_path.glob("case-*/recipe.json"))
    assert len(cases) == len(res["cases"])
    written = []
    for p in cases:
        text = p.read_text()
        assert "Infinity" not in text and "NaN" not in text
        info = _strict(text)
        written.append((info["search"]["chunk"], info["search"]["example"]))
        f = info["figures"]
        if info["search"]["example"] == 0:
            assert f["floor_ratio"] == "inf" and "figures.floor_ratio" in info["figures_notes"]
        if info["search"]["example"] == 2:
            assert f["headroom"] == "inf"
        if info["search"]["example"] == 5:
            assert f["floor_ratio"] is None
            assert S.NOT_MEASURED in info["figures_notes"]["figures.floor_ratio"]
    # the worst two (one per checkpoint), the worst of each failing verdict, the least headroom
    assert written[:2] == [(0, 0), (0, 2)]
    assert (0, 5) in written  # overflow, and the least headroom
    # the worst failing example (and no other fail): example 0 is already written
    assert (0, 1) not in written and (0, 6) not in written
    md = (tmp_path / "search.md").read_text()
    assert "| case-01 | worst floor ratio | inf |" in md
    assert S.NOT_MEASURED in md and "2 (worst rel_l2 0.2 at blocks.0.attn.probs (local))" in md
    csv = pd.read_csv(tmp_path / "search.csv")
    assert csv.loc[csv["example"] == 5, "floor_ratio_note"].item() == S.NOT_MEASURED


def test_a_failing_example_is_written_even_when_it_ranks_low(tmp_path):
    """The failing example shares its checkpoint with a worse passing one and ranks below the
    top: it used to be left out of the reproducers."""
    records = [_record(0, 0, 5, 7.9, "warn"), _record(0, 1, 6, 7.0, "warn"),
               _record(0, 2, 5, 1.3, "fail", first_local="logits (fail)")]
    res = S.write_outputs(tmp_path, _search(records), top=2)
    ex = [(c["search"]["example"], c["chosen_as"]) for c in res["cases"]]
    assert (2, "worst example with verdict fail") in ex
    line = S.summary(_search(records), res, tmp_path, 1)
    assert "1 failing (worst: fail, case-03)" in line and "worst floor ratio 7.9" in line


def test_the_summary_never_prints_an_unmeasured_ratio_as_a_number(tmp_path):
    records = [_record(0, 0, 5, math.nan, "fail", unmeasured_sites=1,
                       unmeasured_site="blocks.0.attn.probs (local)", unmeasured_rel_l2=0.2)]
    res = S.write_outputs(tmp_path, _search(records), top=1)
    line = S.summary(_search(records), res, tmp_path, 1)
    assert f"worst floor ratio {S.NOT_MEASURED}" in line
    assert "1 failing (worst: fail, case-01)" in line


def test_json_safe_replaces_every_non_finite_value():
    notes = {}
    out = S.json_safe({"a": [1.0, math.inf, np.float32("nan")], "floor_ratio": math.nan,
                       "b": np.int64(3)}, notes)
    assert out == {"a": [1.0, "inf", None], "floor_ratio": None, "b": 3}
    assert set(notes) == {"a[1]", "a[2]", "floor_ratio"}
    json.dumps(out, allow_nan=False)

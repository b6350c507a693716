"""The report (parity/reports/: analysis, render, plots) on synthetic divergence/attribution
frames.

The frames are built here with known plants, following the engine's verdicts (parity/engine/compare.py):
in gpt2/stress/meg/fp16 the accumulated stream first leaves its budget (a warn) at
blocks.1.attn.out and the local error is made at blocks.1.mlp.act (a fail); in gpt_neo/stress/
meg/fp16 the reference exceeds fp16 at blocks.0.attn.scores ('overflow') and the accumulated
stream is non-finite after it ('fail'); gpt2/stress/hf/fp16 makes non-finite scores at
blocks.1.attn.scores although the reference fits ('fail'); gpt_neo/stress/hf/bf16 only warns at
the logits. Every float has at most 5 significant digits, so it must survive divergence.csv's
6-digit format exactly.
"""
from __future__ import annotations

import base64
import html
import math
import os
import pickle
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from parity.reports import render as report
from parity.errors import ParityError
from reference.sites import site_kind, site_layer, site_names

FAMILIES = ("gpt2", "gpt_neo")
VARIANTS = ("hf", "meg")
DTYPES = ("fp16", "bf16")
LAYERS = 2
CKPT = "stress"
BUDGET_WARN, BUDGET_FAIL = 2.0, 4.0       # synthetic budgets carried by the frame itself

FAIL_SUBJECT = ("gpt2", CKPT, "meg", "fp16")
WARN_FROM_ACC = "blocks.1.attn.out"        # accumulated drift starts here (warn)
FAIL_AT = "blocks.1.mlp.act"               # the layer that makes the error (local fail)
FAIL_LOGIT_RATIO = 52.5
OVERFLOW_SUBJECT = ("gpt_neo", CKPT, "meg", "fp16")
OVERFLOW_AT = "blocks.0.attn.scores"
OVERFLOW_HEADROOM = 0.5
WARN_SUBJECT = ("gpt_neo", CKPT, "hf", "bf16")
WARN_LOGIT_RATIO = 2.25
NONFINITE_SUBJECT = ("gpt2", CKPT, "hf", "fp16")
NONFINITE_AT = "blocks.1.attn.scores"
NONFINITE_HEADROOM = 2.0
ATTR_SHARE = 0.62
PLANTED = (FAIL_SUBJECT, OVERFLOW_SUBJECT, WARN_SUBJECT, NONFINITE_SUBJECT)
PASS_SUBJECT = ("gpt2", CKPT, "meg", "bf16")
PASS_SHARE = 0.03


def q5(x: float) -> float:
    """Quantise to 5 significant digits (inf and NaN unchanged)."""
    return float(f"{x:.5g}") if math.isfinite(x) else x


def site_row(key, mode, site, i, rng, verdict="pass", ratio=None, nonfinite=0, headroom=None):
    family, ckpt, variant, dtype = key
    floor = q5(3e-4 * (1 + 0.5 * rng.random()) * (1 + i / 10))
    ratio = q5(1.0 + 0.04 * rng.random()) if ratio is None else ratio
    rel = math.inf if nonfinite else q5(floor * ratio)
    reason = "" if verdict == "pass" else (
        f"{nonfinite} non-finite values" if nonfinite
        else f"floor_ratio {ratio:g} > {verdict} budget "
             f"{BUDGET_FAIL if verdict == 'fail' else BUDGET_WARN:g}")
    logits = site == "logits"
    return dict(
        family=family, checkpoint=ckpt, variant=variant, dtype=dtype, device="cpu",
        emulate=True, mode=mode, site=site, layer=site_layer(site), kind=site_kind(site),
        max_abs=q5(rel * 10) if math.isfinite(rel) else math.inf, mean_abs=q5(rel),
        rel_l2=rel, max_ulp=float(rng.integers(1, 9)), cosine=q5(1 - rel if rel < 1 else 0.0),
        floor_rel_l2=floor, floor_ratio=ratio if not nonfinite else math.inf,
        nonfinite=nonfinite,
        headroom=headroom if headroom is not None else q5(65504 / (10 + 100 * rng.random())),
        top1=(0.875 if verdict != "pass" else 1.0) if logits else math.nan,
        kl=q5(1e-6 * (1 + rng.random())) if logits else math.nan,
        budget_warn=BUDGET_WARN, budget_fail=BUDGET_FAIL, verdict=verdict, reason=reason)


def plant(key, mode, site, names):
    """(verdict, floor_ratio, nonfinite, headroom) planted at a site, or None for a pass."""
    pos = names.index(site)
    if key == FAIL_SUBJECT:
        if mode == "local":
            return ("fail", 40.0, 0, None) if site == FAIL_AT else None
        if pos >= names.index(FAIL_AT):
            return ("fail", FAIL_LOGIT_RATIO if site == "logits" else 30.0, 0, None)
        if pos >= names.index(WARN_FROM_ACC):
            return ("warn", 2.5, 0, None)
    if key == OVERFLOW_SUBJECT:
        if site == OVERFLOW_AT:
            return ("overflow", math.inf, 12, OVERFLOW_HEADROOM)
        if mode == "accumulated" and pos > names.index(OVERFLOW_AT):
            return ("fail", math.inf, 12, None)
    if key == NONFINITE_SUBJECT:
        if site == NONFINITE_AT:
            return ("fail", math.inf, 5, NONFINITE_HEADROOM)
        if mode == "accumulated" and pos > names.index(NONFINITE_AT):
            return ("fail", math.inf, 5, None)
    if key == WARN_SUBJECT and mode == "accumulated" and site == "logits":
        return ("warn", WARN_LOGIT_RATIO, 0, None)
    return None


def subjects(families=FAMILIES, checkpoints=(CKPT,), variants=VARIANTS, dtypes=DTYPES):
    return [(f, c, v, d) for f in families for c in checkpoints for v in variants for d in dtypes]


def divergence_frame(keys=None, layers=LAYERS, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for key in keys or subjects():
        names = site_names(key[0], layers)
        for mode in ("accumulated", "local"):
            for i, site in enumerate(names):
                p = plant(key, mode, site, names)
                if p is None:
                    rows.append(site_row(key, mode, site, i, rng))
                else:
                    v, ratio, nf, head = p
                    rows.append(site_row(key, mode, site, i, rng, v, ratio, nf, head))
    df = pd.DataFrame(rows)
    df["layer"] = df["layer"].astype("Int64")
    return df


def attribution_frame() -> pd.DataFrame:
    def row(key, target, knob, a, b, before, share, note=""):
        return dict(zip(("family", "checkpoint", "variant", "dtype"), key), target=target,
                    knob=knob, from_value=a, to_value=b, error_before=before,
                    error_after=q5(before * (1 - share)), share=share, note=note)
    return pd.DataFrame([
        row(FAIL_SUBJECT, "reference", "attn_scores", "baddbmm", "matmul", 0.0125, 0.004),
        row(FAIL_SUBJECT, "reference", "gelu", "jit", "erf", 0.0125, ATTR_SHARE),
        row(FAIL_SUBJECT, "reference", "layernorm", "fp32", "native", 0.0125, -0.25),
        row(OVERFLOW_SUBJECT, "hf", "attn_upcast", "off", "on", 0.5, 0.97, "fp32 q.k"),
        row(PASS_SUBJECT, "reference", "gelu", "jit", "erf", 0.002, PASS_SHARE),
    ])


RUN = {"command": "parity report --families gpt2 gpt_neo", "seeds": [0, 1],
       "versions": {"torch": "2.13.0", "numpy": "2.4.6"}, "device": "cpu",
       "git_revision": "0123abc", "wall_time_s": 12.5}
TITLE = "gpt-parity report (synthetic)"


@pytest.fixture(scope="module")
def frames():
    return divergence_frame(), attribution_frame()


@pytest.fixture(scope="module")
def rendered(frames, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run-1"
    paths = report.write_report(out, *frames, RUN, TITLE)
    return out, paths


# ---------------------------------------------------------------------------- helpers
class StrictHTML(HTMLParser):
    """Collects attributes and fails on an end tag that does not close the open element."""
    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.attrs, self.tables, self.errors = [], [], [], []
        self._cell = None

    def handle_starttag(self, tag, attrs):
        self.attrs += [(tag, k, v or "") for k, v in attrs]
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def md_tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Markdown pipe tables as (headers, rows) with bold markers stripped."""
    tables, block = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            block.append([c.strip().strip("*") for c in line.strip().strip("|").split(" | ")])
        elif block:
            tables.append((block[0], block[2:]))
            block = []
    return tables


def find_row(tables, headers_needed, **match):
    """The rows (as header -> cell dicts) of tables having `headers_needed` that match."""
    out = []
    for head, rows in tables:
        if set(headers_needed) <= set(head):
            for r in rows:
                d = dict(zip(head, r))
                if all(d.get(k) == v for k, v in match.items()):
                    out.append(d)
    return out


def subject_match(key):
    return dict(zip(("family", "checkpoint", "variant", "dtype"), key))


# ---------------------------------------------------------------------------- files
def test_all_four_files_written(rendered):
    out, paths = rendered
    assert set(paths) == set(report.FILES)
    for name, p in paths.items():
        assert p == out / name and p.is_file() and p.stat().st_size > 0
    assert not [p for p in out.iterdir() if p.name not in report.FILES]  # no temp files left


def test_csv_round_trips(rendered, frames):
    div, _ = frames
    back = pd.read_csv(rendered[1]["divergence.csv"], keep_default_na=False,
                       na_values=[""])
    assert list(back.columns) == list(div.columns)
    assert len(back) == len(div)
    for col in div.columns:
        if col == "layer":
            assert back[col].astype("Int64").equals(div[col]), col
        elif not pd.api.types.is_numeric_dtype(div[col]):
            assert back[col].fillna("").astype(str).tolist() == div[col].tolist(), col
        else:
            np.testing.assert_array_equal(back[col].to_numpy(), div[col].to_numpy(), err_msg=col)


def test_csv_floats_keep_full_precision(frames):
    div, _ = frames
    third = div.head(1).assign(rel_l2=1 / 3, max_abs=2e-7 / 3)
    line = report.render_csv(third).decode().splitlines()[1].split(",")
    cols = list(third.columns)
    assert float(line[cols.index("rel_l2")]) == 1 / 3
    assert float(line[cols.index("max_abs")]) == 2e-7 / 3
    assert report.render_csv(third) == report.render_csv(third.copy())


def test_run_json(rendered):
    import json
    text = rendered[1]["run.json"].read_text()
    assert json.loads(text) == RUN
    assert text.index('"command"') < text.index('"device"') < text.index('"wall_time_s"')


def test_two_renders_are_byte_identical(frames, rendered, tmp_path):
    again = report.write_report(tmp_path / "again", *frames, RUN, TITLE)
    for name, p in rendered[1].items():
        assert p.read_bytes() == again[name].read_bytes(), name


def test_render_is_identical_in_a_fresh_process(frames, rendered, tmp_path):
    """Another interpreter (another hash seed, fresh Matplotlib state) gives the same bytes."""
    pkl = tmp_path / "frames.pkl"
    pkl.write_bytes(pickle.dumps((frames, RUN, TITLE)))
    code = ("import pickle,sys; from parity.reports import render as report; "
            "(d,a),run,t = pickle.load(open(sys.argv[1],'rb')); "
            "report.write_report(sys.argv[2], d, a, run, t)")
    subprocess.run([sys.executable, "-c", code, str(pkl), str(tmp_path / "fresh")], check=True,
                   env={**os.environ, "PYTHONHASHSEED": "12345"},
                   cwd=Path(__file__).resolve().parents[1])
    for name, p in rendered[1].items():
        assert p.read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name


def test_unwritable_folder_raises(frames, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for out in (blocker / "report", blocker):
        with pytest.raises(ParityError, match=str(out)):
            report.write_report(out, *frames, RUN, TITLE)


def test_bad_frames_raise(frames, tmp_path):
    div, attr = frames
    with pytest.raises(ParityError, match="verdict"):
        report.write_report(tmp_path, div.drop(columns=["verdict"]), attr, RUN, TITLE)
    with pytest.raises(ParityError, match="empty"):      # nothing compared is never a pass
        report.write_report(tmp_path, div.iloc[:0], attr, RUN, TITLE)
    with pytest.raises(ParityError, match="unknown verdicts"):
        report.write_report(tmp_path, div.assign(verdict="ok"), attr, RUN, TITLE)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------- summary.md
def test_summary_md_verdict_and_first_divergent_sites(rendered, frames):
    div, _ = frames
    md = rendered[1]["summary.md"].read_text()
    # every synthetic subject is on a stress checkpoint: findings, and no verdict that decides
    assert "Overall verdict" not in md
    assert "No healthy checkpoint was compared, so nothing in this run decides a verdict " \
           "(exit code 0)." in md
    assert ("Findings on the stress checkpoints (they do not decide the verdict or the exit "
            "code: knobs are meant to matter there): 3 of 8 subjects fail, 0 overflow, 1 warn, "
            "4 pass.") in md
    tables = md_tables(md)
    row, = find_row(tables, ["first divergent (local)"], **subject_match(FAIL_SUBJECT))
    assert row["first divergent (accumulated)"] == f"{WARN_FROM_ACC} (warn)"
    assert row["first divergent (local)"] == f"{FAIL_AT} (fail)"
    assert row["verdict"] == "FAIL"
    assert row["worst site"] == f"{FAIL_AT} (local)"       # the fail, not the earlier warn
    planted, = div[(div.site == FAIL_AT) & (div["mode"] == "local") & (div.family == "gpt2")
                   & (div.variant == "meg") & (div.dtype == "fp16")]["reason"]
    assert row["why"] == planted
    row, = find_row(tables, ["first divergent (local)"], **subject_match(WARN_SUBJECT))
    assert row["first divergent (accumulated)"] == "logits (warn)"
    assert row["first divergent (local)"] == "none"
    assert row["worst site"] == "logits (accumulated)"
    row, = find_row(tables, ["first divergent (local)"], **subject_match(OVERFLOW_SUBJECT))
    assert row["first divergent (local)"] == f"{OVERFLOW_AT} (overflow)"
    assert row["verdict"] == "FAIL"        # the non-finite stream after it fails
    passing = [k for k in subjects() if k not in PLANTED]
    for key in passing:       # a pass is not listed among the divergences
        assert not find_row(tables, ["first divergent (local)"], **subject_match(key))


def test_summary_md_matrix(rendered):
    md = rendered[1]["summary.md"].read_text()
    (head, rows), = [t for t in md_tables(md) if t[0][0] == "family" and "meg fp16" in t[0]]
    cells = {r[0]: dict(zip(head, r)) for r in rows}
    assert set(cells) == set(FAMILIES)
    assert set(head[1:]) == {f"{v} {d}" for v in VARIANTS for d in DTYPES}
    verdict, ratio, _, site = cells["gpt2"]["meg fp16"].split()
    assert verdict == "FAIL" and float(ratio) == FAIL_LOGIT_RATIO
    assert site == FAIL_AT                   # the local site: the layer that makes it
    assert cells["gpt_neo"]["meg fp16"] == f"FAIL inf from {OVERFLOW_AT} +overflow"
    assert cells["gpt2"]["hf fp16"] == f"FAIL inf from {NONFINITE_AT}"
    verdict, ratio, _, site = cells["gpt_neo"]["hf bf16"].split()
    assert (verdict, float(ratio), site) == ("WARN", WARN_LOGIT_RATIO, "logits")  # acc: no local
    assert cells["gpt2"]["hf bf16"].split()[0] == "pass"
    assert len(cells["gpt2"]["hf bf16"].split()) == 2


def test_summary_md_overflow_and_logits(rendered, frames):
    div, _ = frames
    tables = md_tables(rendered[1]["summary.md"].read_text())
    for key, site, headroom, why in ((OVERFLOW_SUBJECT, OVERFLOW_AT, OVERFLOW_HEADROOM,
                                      "peaks at"),
                                     (NONFINITE_SUBJECT, NONFINITE_AT, NONFINITE_HEADROOM,
                                      "fits")):
        rows = find_row(tables, ["first site", "headroom"], **subject_match(key))
        assert {r["mode"] for r in rows} == {"accumulated", "local"}
        sub = div[(div.family == key[0]) & (div.variant == key[2]) & (div.dtype == key[3])
                  & (div["mode"] == "accumulated")]
        n_acc = ((sub["verdict"] == "overflow") | (sub["nonfinite"] > 0)).sum()
        for r in rows:
            assert r["first site"] == site
            assert float(r["headroom"]) == headroom
            assert why in r["magnitude"]
            assert int(r["sites"]) == (n_acc if r["mode"] == "accumulated" else 1)
    assert len(find_row(tables, ["first site", "headroom"])) == 4   # nothing else listed
    logit, = find_row(tables, ["top1", "KL"], **subject_match(FAIL_SUBJECT))
    planted = div[(div.site == "logits") & (div["mode"] == "accumulated")
                  & (div.variant == "meg") & (div.family == "gpt2") & (div.dtype == "fp16")]
    assert float(logit["top1"].rstrip("%")) == 100 * planted["top1"].item()


def test_attribution_sentence_in_both_documents(rendered, frames):
    _, attr = frames
    row = attr[attr["share"] == ATTR_SHARE].iloc[0].to_dict()
    sentence = report.attribution_sentence(row)
    assert sentence.startswith(f"{ATTR_SHARE:.0%} of the fp16 logit error of meg on gpt2/stress")
    assert "gelu=jit->erf" in sentence
    md = rendered[1]["summary.md"].read_text()
    assert sentence in md
    assert html.escape(sentence) in rendered[1]["index.html"].read_text()
    worse = report.attribution_sentence(attr[attr["share"] < 0].iloc[0].to_dict())
    assert "larger" in worse and "25%" in worse and worse in md
    vs_hf = report.attribution_sentence(attr[attr["target"] == "hf"].iloc[0].to_dict())
    assert "from hf" in vs_hf and vs_hf in md
    # a flip with no visible effect is folded into one line, not a sentence of its own
    quiet = report.attribution_sentence(attr[attr["share"] == 0.004].iloc[0].to_dict())
    assert quiet not in md
    assert "no visible effect (under 0.5% each): attn_scores=baddbmm->matmul" in md
    # a passing subject gets no sentences, only its row in the table of every share
    calm = report.attribution_sentence(attr[attr["share"] == PASS_SHARE].iloc[0].to_dict())
    assert calm not in md
    tables = md_tables(md)
    share_row, = find_row(tables, ["gelu", "layernorm"], **subject_match(PASS_SUBJECT))
    assert share_row["gelu"] == f"+{PASS_SHARE:.0%}" and share_row["layernorm"] == ""
    share_row, = find_row(tables, ["gelu", "layernorm"], **subject_match(FAIL_SUBJECT))
    assert share_row["gelu"] == f"+{ATTR_SHARE:.0%}" and share_row["layernorm"] == "-25%"
    assert share_row["attn_scores"] == "0%"
    # the main cause of the failing subject is the knob with the largest share
    row, = find_row(tables, ["main cause"], **subject_match(FAIL_SUBJECT))
    assert row["main cause"].startswith("gelu=jit->erf")


def test_verdict_follows_the_worst_row(tmp_path):
    keys = subjects(families=("gptj",), checkpoints=("tiny",), variants=("hf",))  # no plants
    clean = divergence_frame(keys)
    assert report.overall_verdict(clean) == "PASS"
    md = report.render_markdown(clean, None, RUN, TITLE)
    assert "**Overall verdict: PASS**" in md and "within budget at every site" in md
    warned = clean.copy()
    warned.loc[warned.index[-1], ["verdict", "reason"]] = ["warn", "floor_ratio over warn"]
    assert report.overall_verdict(warned) == "WARN"
    overflowed = warned.copy()
    overflowed.loc[overflowed.index[3], "verdict"] = "overflow"
    assert report.overall_verdict(overflowed) == "OVERFLOW"
    failed = overflowed.copy()
    failed.loc[failed.index[1], "verdict"] = "fail"
    assert report.overall_verdict(failed) == "FAIL"


def relabel(div, keys, checkpoint):
    """`div` with the subjects `keys` moved to another checkpoint label."""
    out = div.copy()
    for fam, ckpt, var, dt in keys:
        hit = ((out.family == fam) & (out.checkpoint == ckpt) & (out.variant == var)
               & (out.dtype == dt))
        out.loc[hit, "checkpoint"] = checkpoint
    return out


@pytest.mark.parametrize("tiny,verdict,code,tiny_counts,stress_counts", [
    ((PASS_SUBJECT, ("gpt_neo", CKPT, "hf", "fp16")), "PASS", 0, (0, 0, 0, 2), (3, 0, 1, 2)),
    ((PASS_SUBJECT, WARN_SUBJECT), "WARN", 0, (0, 0, 1, 1), (3, 0, 0, 3)),
    ((PASS_SUBJECT, FAIL_SUBJECT), "FAIL", 1, (1, 0, 0, 1), (2, 0, 1, 3)),
    ((PASS_SUBJECT, OVERFLOW_SUBJECT), "FAIL", 1, (1, 0, 0, 1), (2, 0, 1, 3)),  # then non-finite
])
def test_the_headline_is_the_verdict_that_decides_the_exit_code(frames, tiny, verdict, code,
                                                                 tiny_counts, stress_counts):
    """`parity report`'s healthy `tiny` checkpoints decide the headline and the exit code; the
    stress checkpoints' verdicts follow as findings, never as the overall verdict (the old
    headline said FAIL on a run that exits 0)."""
    from parity.reports.run import exit_code

    def counts(n, total):
        return f"{n[0]} of {total} subjects fail, {n[1]} overflow, {n[2]} warn, {n[3]} pass"

    div, attr = frames
    mixed = relabel(div, tiny, "tiny")
    assert exit_code(mixed) == code
    md = report.render_markdown(mixed, attr, RUN, TITLE)
    paras = md.split("\n\n")
    assert paras[1] == (f"**Overall verdict: {verdict}** — on the tiny checkpoints, which decide "
                        f"the exit code ({code}): {counts(tiny_counts, 2)}.")
    assert paras[2] == ("Findings on the stress checkpoints (they do not decide the verdict or "
                        "the exit code: knobs are meant to matter there): "
                        f"{counts(stress_counts, 6)}.")
    assert md.count("Overall verdict") == 1
    page = report.render_html(mixed, attr, RUN, TITLE)
    assert f'<span class="verdict {verdict}">Overall verdict: <b>{verdict}</b></span> on the ' \
           f"tiny checkpoints, which decide the exit code ({code})" in page
    # the terminal table's title carries the same verdict, the findings its caption
    from rich.console import Console
    console = Console(record=True, width=300, color_system=None)
    console.print(report.terminal_summary(mixed, attr))
    text = console.export_text()
    assert text.splitlines()[0].strip() == f"gpt-parity: {verdict}"
    assert "findings on stress (do not decide the verdict)" in text


def test_a_knob_measured_twice_is_listed_once(frames):
    """The report measures each knob at the logits and again at the first divergent site: a
    knob without visible effect at either is named once in the 'no visible effect' line, and
    one visible at either site is not named there at all."""
    div, attr = frames
    twice = attr.copy()
    twice["site"] = "logits"
    at_site = twice[twice["target"] == "reference"].assign(site=FAIL_AT)
    # at the first divergent site the gelu flip is visible, the scores' flip still is not
    at_site.loc[at_site["knob"] == "layernorm", "share"] = 0.001
    md = report.render_markdown(div, pd.concat([twice, at_site], ignore_index=True), RUN,
                                TITLE)
    line, = [ln for ln in md.splitlines() if ln.startswith("- no visible effect")
             and "attn_scores" in ln]
    assert line == "- no visible effect (under 0.5% each): attn_scores=baddbmm->matmul"
    # layernorm is visible at the logits (-25%), so it is not "no visible effect" anywhere
    assert "layernorm=fp32->native" not in line


def test_missing_local_mode_is_not_a_clean_local(frames):
    """A subject compared only in accumulated mode says so instead of 'none'."""
    div, attr = frames
    acc_only = div[div["mode"] == "accumulated"]
    md = report.render_markdown(acc_only, attr, RUN, TITLE)
    row, = find_row(md_tables(md), ["first divergent (local)"], **subject_match(WARN_SUBJECT))
    assert row["first divergent (local)"] == "not measured"


def test_gate_checks_decide_the_headline(frames, tmp_path):
    """A gate report: its checks come first and decide the verdict; with no layer-by-layer
    comparison the divergence frame may be empty, but never with no checks at all."""
    div, attr = frames
    checks = [{"check": "golden logits", "verdict": "fail", "detail": "top-1 0.5 < 0.99",
               "figures": {"top1": 0.5, "kl": 0.25}},
              {"check": "hf oracle", "verdict": "skip", "detail": "transformers missing"}]
    paths = report.write_report(tmp_path / "gate", div.iloc[:0], None, RUN, "gate", checks)
    md = paths["summary.md"].read_text()
    assert "**Overall verdict: FAIL**" in md
    row, = find_row(md_tables(md), ["check", "detail"], check="golden logits")
    assert row["verdict"] == "FAIL" and row["figures"] == "kl=0.25, top1=0.5"
    row, = find_row(md_tables(md), ["check", "detail"], check="hf oracle")
    assert row["verdict"] == "SKIP"
    assert pd.read_csv(paths["divergence.csv"]).empty
    p = StrictHTML()
    p.feed(paths["index.html"].read_text())
    assert not p.errors and not p.stack
    passing = [dict(c, verdict="pass") for c in checks]
    md = report.render_markdown(div, attr, RUN, "gate", passing)
    assert "**Overall verdict: PASS**" in md           # the gate's policy has the last word
    assert "### checkpoint stress: FAIL" in md         # the layer verdicts are still shown
    with pytest.raises(ParityError, match="verdict"):
        report.write_report(tmp_path / "bad", div, attr, RUN, "gate", [{"check": "x"}])


# ---------------------------------------------------------------------------- index.html
def test_html_parses_and_is_self_contained(rendered):
    text = rendered[1]["index.html"].read_text()
    p = StrictHTML()
    p.feed(text)
    p.close()
    assert not p.errors and not p.stack
    refs = [(t, k, v) for t, k, v in p.attrs if k in ("src", "href")]
    assert refs, "the page should embed its plots"
    assert all(v.startswith("data:image/png;base64,") for _, _, v in refs), refs
    for tag in ("script", "link", "iframe", "object"):
        assert all(t != tag for t, _, _ in p.attrs) and f"<{tag}" not in text
    assert "http://" not in text and "https://" not in text and "url(" not in text
    pngs = [base64.b64decode(v.split(",", 1)[1]) for _, _, v in refs]
    assert len(pngs) == len(FAMILIES)             # one figure per family x checkpoint
    assert all(b.startswith(b"\x89PNG\r\n\x1a\n") for b in pngs)
    assert all(b"Software" not in b for b in pngs)


def test_html_has_the_same_tables_with_verdict_colours(rendered):
    text = rendered[1]["index.html"].read_text()
    p = StrictHTML()
    p.feed(text)
    tables = [(t[0], t[1:]) for t in p.tables]
    row, = find_row(tables, ["first divergent (local)"], **subject_match(FAIL_SUBJECT))
    assert row["first divergent (local)"] == f"{FAIL_AT} (fail)"
    md_tabs = md_tables(rendered[1]["summary.md"].read_text())
    assert [h for h, _ in tables] == [h for h, _ in md_tabs]
    assert [len(r) for _, r in tables] == [len(r) for _, r in md_tabs]
    assert '<td class="fail">' in text and '<td class="overflow">' in text
    assert '<td class="warn">' in text and '<td class="pass">' in text


def test_html_size_for_a_full_run(tmp_path):
    """The default run's shape (5 families x tiny/stress x 4 presets x 2 dtypes = 80 subjects,
    4 layers) stays under the page budget."""
    keys = subjects(families=("openai-gpt", "gpt2", "gpt_neo", "gptj", "gptmeg"),
                    checkpoints=("tiny", "stress"), variants=("hf", "meg", "sdpa", "naive-half"))
    div = divergence_frame(keys, layers=4, seed=1)
    text = report.render_html(div, attribution_frame(), RUN, TITLE)
    assert text.count("data:image/png") == 10
    assert len(text.encode()) < report.HTML_SIZE_BUDGET


# ---------------------------------------------------------------------------- terminal
def test_terminal_summary(frames):
    from rich.console import Console
    div, attr = frames
    table = report.terminal_summary(div, attr)
    assert table.row_count == len(subjects())
    console = Console(record=True, width=220, color_system=None)
    console.print(table)
    text = console.export_text()
    lines = text.splitlines()
    fail_line, = [ln for ln in lines if all(w in ln.split() for w in ("gpt2", "meg", "fp16"))]
    assert "FAIL" in fail_line and FAIL_AT in fail_line and WARN_FROM_ACC in fail_line
    assert "gelu=jit->erf" in fail_line
    # only stress subjects: findings, no verdict in the title
    assert lines[0].strip() == "gpt-parity: no healthy checkpoint compared"
    assert "findings on stress (do not decide the verdict): 3 of 8 subjects fail" in \
        text.replace("\n", " ").replace("  ", " ")
    assert report.terminal_summary(div, attr, problems_only=True).row_count == len(PLANTED)


def test_top1_without_decisive_rows_reads_not_measured(tmp_path):
    """A NaN top-1 (no decisive logit row) is 'not measured', never 100% or a bare dash."""
    div = divergence_frame(keys=[(FAMILIES[0], CKPT, VARIANTS[0], DTYPES[0])])
    div.loc[div["site"] == "logits", "top1"] = math.nan
    paths = report.write_report(tmp_path / "r", div, None, RUN, TITLE)
    md = paths["summary.md"].read_text()
    assert report.NO_TOP1 in md and "100.0%" not in md
    assert report.NO_TOP1 in paths["index.html"].read_text()

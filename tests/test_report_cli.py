"""`parity report` end to end, in process (`parity.cli.main`), restricted to GPT-2 x {hf, meg}
x fp16 on the tiny and stress checkpoints so that two full runs take a few seconds.

What is pinned: the four files exist and parse (CSV with pandas, HTML with html.parser), the
CSV is the comparison frame (`COLUMNS`, one row per checkpoint x subject x mode x site), two runs
give the same CSV bytes, and run.json differs only in its clock fields; exit codes 0 / 1 / 2.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
from html.parser import HTMLParser

import pandas as pd
import pytest

import parity.subjects.fast
from parity.cli import main
from parity.engine.compare import COLUMNS, MODES
from parity.reports.run import exit_code
from reference.sites import site_names
from tests import mutants as Mu

ARGS = ["report", "--families", "gpt2", "--variants", "hf", "meg", "--dtypes", "fp16",
        "--device", "cpu"]
FILES = ("summary.md", "index.html", "divergence.csv", "run.json")
CLOCK = ("created", "wall_time_s")   # the only run.json fields allowed to differ between runs


def quiet_main(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two identical report runs: [(exit code, folder), (exit code, folder)]."""
    done = []
    for n in (1, 2):
        out = tmp_path_factory.mktemp(f"report{n}")
        rc, stdout, _ = quiet_main(ARGS + ["--out", str(out)])
        done.append((rc, out, stdout))
    return done


def test_report_writes_the_four_files_and_exits_0(runs):
    for rc, out, stdout in runs:
        # the stress checkpoint's findings (hf fp16 overflows q.k^T) do not fail the run; only
        # a subject leaving its budget on the healthy tiny checkpoint does
        assert rc == 0
        for name in FILES:
            assert (out / name).is_file() and (out / name).stat().st_size > 0, name
        assert str(out) in stdout


def test_the_summary_leads_with_the_verdict_that_decides_the_exit_code(runs):
    """A run that exits 0 says PASS first (the healthy tiny checkpoint); the stress
    checkpoint's failures (hf fp16 overflows q.k^T) follow as findings, not as the verdict."""
    rc, out, stdout = runs[0]
    paras = (out / "summary.md").read_text().split("\n\n")
    assert rc == 0
    assert paras[1].startswith("**Overall verdict: PASS** — on the tiny checkpoints, which "
                               "decide the exit code (0): 0 of 2 subjects fail")
    assert paras[2].startswith("Findings on the stress checkpoints (they do not decide the "
                               "verdict or the exit code")
    assert "1 of 2 subjects fail" in paras[2]
    assert "gpt-parity: PASS" in stdout and "gpt-parity: FAIL" not in stdout
    # not a terminal (a CI log): tables are not cut to 80 columns
    assert "…" not in stdout and "first divergent site" in stdout


def test_csv_parses_and_is_the_comparison_frame(runs):
    df = pd.read_csv(runs[0][1] / "divergence.csv")
    assert list(df.columns) == COLUMNS
    n_sites = len(site_names("gpt2", 4))
    assert len(df) == 2 * 2 * len(MODES) * n_sites          # checkpoints x variants x modes x sites
    assert set(df["checkpoint"]) == {"tiny", "stress"} and set(df["variant"]) == {"hf", "meg"}
    assert set(df["dtype"]) == {"float16"}
    # the known finding survives the round trip: hf fp16 on stress fails at its scores
    bad = df[(df["checkpoint"] == "stress") & (df["variant"] == "hf") & (df["verdict"] == "fail")]
    assert not bad.empty and bad["kind"].iloc[0] == "attn.scores"
    assert set(df[df["checkpoint"] == "tiny"]["verdict"]) <= {"pass", "warn"}


class Structure(HTMLParser):
    """Tag balance and the resources a page refers to."""

    VOID = {"meta", "img", "br", "hr", "link", "input", "col", "source", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors, self.tags, self.refs = [], [], {}, []

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def test_html_parses_and_is_self_contained(runs):
    p = Structure()
    p.feed((runs[0][1] / "index.html").read_text(encoding="utf-8"))
    p.close()
    assert p.errors == [] and p.stack == []
    assert p.tags.get("table", 0) >= 3 and p.tags.get("img", 0) >= 1
    # opens from disk: no file or network references, images inline
    assert all(r.startswith(("data:", "#")) for r in p.refs), p.refs


def test_two_runs_give_the_same_csv_and_run_json_differs_only_in_the_clock(runs):
    (_, a, _), (_, b, _) = runs
    assert (a / "divergence.csv").read_bytes() == (b / "divergence.csv").read_bytes()
    ja, jb = (json.loads((d / "run.json").read_text()) for d in (a, b))
    assert {k for k in ja.keys() | jb.keys() if ja.get(k) != jb.get(k)} <= set(CLOCK)
    assert ja["families"] == ["gpt2"] and ja["variants"] == ["hf", "meg"]
    assert ja["dtypes"] == ["float16"] and "torch" in ja["environment"]


def test_two_runs_give_documents_that_differ_at_most_in_the_clock_lines(runs):
    (_, a, _), (_, b, _) = runs
    for name in ("summary.md", "index.html"):
        la, lb = ((d / name).read_text().splitlines() for d in (a, b))
        assert len(la) == len(lb)
        diff = [(x, y) for x, y in zip(la, lb) if x != y]
        assert all(any(c in x for c in CLOCK) for x, _ in diff), (name, diff[:3])


def test_two_runs_give_identical_documents(runs):
    (_, a, _), (_, b, _) = runs
    for name in ("summary.md", "index.html"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


# ----------------------------------------------------------------------------- exit codes
def test_a_failing_tiny_subject_exits_1(tmp_path, monkeypatch):
    """The whole command with a broken fast path (a wrong attention scale in layer 2)."""
    monkeypatch.setattr(parity.subjects.fast, "FastModel", functools.partial(Mu.WrongScale, layer=2))
    rc, _, _ = quiet_main(["report", "--families", "gpt2", "--variants", "hf", "--dtypes",
                           "fp16", "--device", "cpu", "--no-attribution",
                           "--out", str(tmp_path / "r")])
    assert rc == 1
    df = pd.read_csv(tmp_path / "r" / "divergence.csv")
    tiny = df[(df["checkpoint"] == "tiny") & (df["mode"] == "local") & (df["verdict"] != "pass")]
    assert tiny["site"].iloc[0] == "blocks.2.attn.scores"


def frame(*rows):
    return pd.DataFrame([dict(checkpoint=c, verdict=v) for c, v in rows])


@pytest.mark.parametrize("rows,code", [
    ((("tiny", "pass"), ("stress", "pass")), 0),
    ((("tiny", "warn"), ("stress", "overflow"), ("stress", "fail")), 0),  # stress: findings
    ((("tiny", "pass"), ("tiny", "fail")), 1),
    ((("tiny", "pass"), ("tiny", "overflow")), 1),   # healthy magnitudes must fit the dtype
])
def test_exit_code_rule(rows, code):
    assert exit_code(frame(*rows)) == code


def test_unwritable_out_exits_2_with_one_error_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "report"
    rc, stdout, stderr = quiet_main(ARGS + ["--out", str(out)])
    assert rc == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(out) in lines[0]
    assert "Traceback" not in stderr and not blocker.is_dir()


def test_unknown_family_exits_2_with_one_error_line(tmp_path):
    rc, _, stderr = quiet_main(["report", "--families", "gpt5", "--out", str(tmp_path / "r")])
    assert rc == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "gpt5" in lines[0]

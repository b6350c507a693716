"""A new user's first commands: one dtype vocabulary, a --sites pattern that matches nothing,
options that would be ignored — each refused up front with one `error:` line and nothing
half-written."""
from __future__ import annotations

import json

import pytest

from parity import cli


def run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "internal error" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.mark.parametrize("spelling,canonical", [("fp16", "float16"), ("bf16", "bfloat16"),
                                                ("half", "float16"), ("float32", "float32")])
def test_checkpoint_make_takes_every_dtype_spelling(spelling, canonical, tmp_path, capsys):
    rc, out, err = run(capsys, "checkpoint", "make", "--family", "gpt2", "--layers", "1",
                       "--dtype", spelling, "--out", tmp_path / "ck")
    assert rc == 0, err
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["torch_dtype"] == canonical


@pytest.mark.parametrize("bad", ["int8", "fp8", "uint8"])
def test_checkpoint_make_refuses_other_dtypes_before_writing(bad, tmp_path, capsys):
    rc, out, err = run(capsys, "checkpoint", "make", "--family", "gpt2", "--dtype", bad,
                       "--out", tmp_path / "ck")
    assert rc == 2
    one_error(err, repr(bad), "float16")
    assert not (tmp_path / "ck").exists()


def test_a_sites_pattern_that_matches_nothing_is_an_error(tiny_checkpoints, tmp_path, capsys):
    out = tmp_path / "t.safetensors"
    rc, _, err = run(capsys, "trace", tiny_checkpoints["gpt2"], "--tokens", "1 2 3",
                     "--sites", "blocks.*.resid_post,nomatch*", "--out", out)
    assert rc == 2
    one_error(err, "'nomatch*'", "matches no site")
    assert not out.exists()
    rc, _, err = run(capsys, "trace", tiny_checkpoints["gpt2"], "--tokens", "1 2 3",
                     "--sites", "blocks.*.resid_post", "--out", out)
    assert rc == 0 and out.exists(), err


def test_golden_check_with_a_checkpoint_but_no_file_is_refused(tiny_checkpoints, capsys):
    rc, _, err = run(capsys, "golden", "check", "--checkpoint", tiny_checkpoints["gpt2"])
    assert rc == 2
    one_error(err, "--checkpoint", "--file")


def test_trace_takes_the_gates_variant_grammar_for_transformers(tiny_checkpoints, tmp_path,
                                                                capsys):
    """`--impl hf --variant hf` (transformers' default attention) is accepted by trace as by
    the gate."""
    pytest.importorskip("transformers", reason="the hf subject needs the [hf] extra")
    out = tmp_path / "t.safetensors"
    rc, _, err = run(capsys, "trace", tiny_checkpoints["gpt2"], "--impl", "hf", "--variant",
                     "hf", "--dtype", "float32", "--tokens", "1 2 3", "--out", out)
    assert rc == 0 and out.exists(), err


def test_integral_figures_read_as_integers():
    from parity.reports.analysis import _num

    assert (_num(1000.0), _num(65504), _num(0.000123456), _num(2.5)) == (
        "1000", "65504", "0.000123", "2.5")


def test_divergence_csv_keeps_full_precision_and_float_columns():
    """6 significant digits turned a cosine of 0.9999996 into 1, and an all-integral float
    column loaded back as int64."""
    import io

    import pandas as pd

    from parity.engine.compare import COLUMNS
    from parity.reports.render import render_csv

    row = {c: "x" for c in COLUMNS} | dict(cosine=0.9999996, rel_l2=1.234567891234e-4,
                                           floor_ratio=1.0, top1=float("nan"), layer=pd.NA,
                                           nonfinite=0)
    df = pd.DataFrame([row, row | {"floor_ratio": 2.0}], columns=COLUMNS)
    back = pd.read_csv(io.BytesIO(render_csv(df)))
    assert back["cosine"].tolist() == [0.9999996] * 2
    assert back["rel_l2"].tolist() == [1.234567891234e-4] * 2
    assert back["floor_ratio"].dtype == "float64" and back["floor_ratio"].tolist() == [1.0, 2.0]


@pytest.mark.parametrize("value,needles", [
    (None, ["rotary_dim is null",
            "supported: an even rotary_dim from 2 to the head dim (here 16)"]),
    (64, ["rotary_dim 64 is not supported", "at most the head dim 16 (hidden 64 / 4 heads)"]),
])
def test_gptj_rotary_dim_says_what_the_config_says_and_what_is_supported(
        value, needles, tiny_checkpoints, tmp_path, capsys):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(tiny_checkpoints["gptj"], ck)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["rotary_dim"] = value
    (ck / "config.json").write_text(json.dumps(cfg))
    rc, out, err = run(capsys, "gate", ck, "--device", "cpu", "--report", tmp_path / "rep")
    assert rc == 2 and "PASS" not in out
    one_error(err, "config.json", *needles)


@pytest.mark.parametrize("where,needle", [("blocker/gate.xml", "folder of the --junit file"),
                                          ("adir", "names a folder")])
def test_an_unusable_junit_path_is_refused_before_the_work(where, needle, tiny_checkpoints,
                                                           tmp_path, capsys):
    (tmp_path / "blocker").write_text("a file, not a folder")
    (tmp_path / "adir").mkdir()
    rc, out, err = run(capsys, "gate", tiny_checkpoints["gpt2"], "--device", "cpu",
                       "--report", tmp_path / "rep", "--junit", tmp_path / where)
    assert rc == 2 and "PASS" not in out
    one_error(err, needle)
    assert not (tmp_path / "rep" / "run.json").exists()  # refused before any check ran


# ----------------------------------------------------------------------------- run folders
def test_publish_folder_swaps_a_whole_run_in_and_keeps_a_users_files(tmp_path):
    from parity.files import publish_folder

    target = tmp_path / "rep"
    publish_folder(target, {"a.txt": b"1", "b.txt": b"1"})
    publish_folder(target, {"a.txt": b"2", "b.txt": b"2"})
    assert {p.name: p.read_text() for p in target.iterdir()} == {"a.txt": "2", "b.txt": "2"}
    assert [p.name for p in tmp_path.iterdir()] == ["rep"]  # no temporary folder left
    (target / "notes.txt").write_text("mine")
    publish_folder(target, {"a.txt": b"3", "b.txt": b"3"})
    assert {p.name: p.read_text() for p in target.iterdir()} == {
        "a.txt": "3", "b.txt": "3", "notes.txt": "mine"}
    assert oct(target.joinpath("a.txt").stat().st_mode & 0o777) == "0o644"


def test_concurrent_runs_into_one_folder_leave_one_whole_run(tmp_path):
    """Two runs publishing into the same explicit folder: the folder ends as one run's, never
    a mix of files from both."""
    import threading

    from parity.files import publish_folder

    target = tmp_path / "rep"
    names = [f"f{i}.txt" for i in range(8)]

    def one(run_id):
        for _ in range(20):
            publish_folder(target, {n: run_id.encode() for n in names})

    threads = [threading.Thread(target=one, args=(r,)) for r in ("A", "B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    contents = {p.read_text() for p in target.iterdir()}
    assert len(contents) == 1 and sorted(p.name for p in target.iterdir()) == names
    assert [p.name for p in tmp_path.iterdir()] == ["rep"]


def test_a_report_whose_writing_fails_midway_leaves_the_earlier_folder_as_it_was(
        tmp_path, monkeypatch):
    """The third file's write fails (a full disk): the folder still holds the earlier run,
    not two new files beside two old ones."""
    import os

    from parity.errors import ParityError
    from parity.reports import render

    target = tmp_path / "rep"
    target.mkdir()
    for name in render.FILES:
        (target / name).write_text("earlier run")
    calls = []
    real = os.fsync

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    from parity.engine.compare import to_frame

    with pytest.raises(ParityError, match="No space left"):
        render.write_report(target, to_frame([]), None, {}, "t",
                            checks=[{"check": "x", "verdict": "pass", "detail": ""}])
    assert len(calls) == 3
    assert {p.name: p.read_text() for p in target.iterdir()} == {
        n: "earlier run" for n in render.FILES}
    assert [p.name for p in tmp_path.iterdir()] == ["rep"]


def test_report_and_gate_default_folders_are_unique_and_named_alike(tiny_checkpoints, tmp_path,
                                                                    monkeypatch, capsys):
    import re

    from parity.files import run_folder_name

    assert len({run_folder_name("report") for _ in range(50)}) == 50  # same second, 50 names
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        rc, _, err = run(capsys, "gate", tiny_checkpoints["gpt2"], "--device", "cpu")
        assert rc == 0, err
    rc, _, err = run(capsys, "report", "--families", "gpt2", "--variants", "hf", "--dtypes",
                     "fp16", "--no-attribution")
    assert rc == 0, err
    folders = sorted(p.name for p in (tmp_path / "reports").iterdir())
    assert len(folders) == 3, folders
    for f in folders:
        assert re.fullmatch(r"(gate|report)-\d{8}T\d{6}Z-[0-9a-f]{6}", f), f
        assert sorted(p.name for p in (tmp_path / "reports" / f).iterdir()) == [
            "divergence.csv", "index.html", "run.json", "summary.md"]


# ----------------------------------------------------------------------------- prompts files
def test_prompt_kinds_are_explicit(tmp_path):
    from parity.checkpoints.inputs import read_prompts

    p = tmp_path / "p.txt"
    p.write_text("ids: 464 3290 318\nids:1,2, 3\ntext: 1984\ntext: ids: not a prefix here\n"
                 "Plain text, with 2 numbers\n\n", encoding="utf-8")
    assert read_prompts(p) == [[464, 3290, 318], [1, 2, 3], "1984", "ids: not a prefix here",
                               "Plain text, with 2 numbers"]


@pytest.mark.parametrize("line,needles", [
    ("1984", ["line 2", "'1984' is only numbers", "`ids: 1984`", "`text: 1984`"]),
    ("1 2 3; 4 5 6", ["line 2", "only numbers"]),
    ("ids: 1 two 3", ["line 2", "`ids:` takes token ids", "'1 two 3'"]),
    ("ids: -1", ["line 2", "`ids:` takes token ids"]),
])
def test_an_ambiguous_or_malformed_prompt_line_is_refused(line, needles, tiny_checkpoints,
                                                          tmp_path, capsys):
    p = tmp_path / "prompts.txt"
    p.write_text("text: hello\n" + line + "\n", encoding="utf-8")
    rc, out, err = run(capsys, "gate", tiny_checkpoints["gpt2"], "--device", "cpu",
                       "--prompts", p, "--report", tmp_path / "rep")
    assert rc == 2 and "PASS" not in out
    one_error(err, str(p), *needles)


def test_the_gate_summary_run_table_reads_as_facts_not_a_python_dict(tiny_checkpoints, tmp_path,
                                                                     capsys):
    rep = tmp_path / "rep"
    rc, _, err = run(capsys, "gate", tiny_checkpoints["gpt2"], "--device", "cpu", "--report", rep)
    assert rc == 0, err
    md = (rep / "summary.md").read_text()
    run_section = md[md.index("## Run"):]
    assert "{'" not in md and "{\"" not in md, run_section
    assert "| subject.dtype | float16 |" in run_section
    html = (rep / "index.html").read_text()
    assert "{&#x27;" not in html and "{'" not in html


# ----------------------------------------------------------------------------- goldens
def test_a_golden_of_a_deeper_model_names_the_sites_it_could_not_compare(tiny_checkpoints,
                                                                         tmp_path, capsys):
    """A golden traced on a 4-layer checkpoint, checked against a 2-layer one: the sites of
    blocks 2 and 3 are named as not compared, in `golden check --file` and in the gate row."""
    ck2 = tmp_path / "ck2"
    assert run(capsys, "checkpoint", "make", "--family", "gpt2", "--layers", "2", "--out",
               ck2)[0] == 0
    g = tmp_path / "g.safetensors"
    rc, _, err = run(capsys, "trace", tiny_checkpoints["gpt2"], "--tokens", "1 2 3", "--sites",
                     "blocks.*.resid_post", "--out", g)
    assert rc == 0, err
    rc, out, _ = run(capsys, "golden", "check", "--file", g, "--checkpoint", ck2)
    last = out.strip().splitlines()[-1]
    assert rc == 1  # the logits of a deeper model differ
    assert "2 stored sites not compared: blocks.2.resid_post, blocks.3.resid_post" in last
    assert "beyond this checkpoint's 2 layers" in last
    rep = tmp_path / "rep"
    rc, out, _ = run(capsys, "gate", ck2, "--golden", g, "--device", "cpu", "--report", rep)
    golden = [c for c in json.loads((rep / "run.json").read_text())["checks"]
              if c["check"].startswith("golden:")][0]
    assert "blocks.2.resid_post, blocks.3.resid_post" in golden["detail"]


def test_golden_check_of_a_file_with_no_comparable_site_fails(tiny_checkpoints, tmp_path,
                                                              capsys):
    """Only sites the checkpoint lacks (and logits of another model would fail anyway): here
    a golden whose every stored site is beyond the checkpoint is never a pass."""
    import numpy as np
    from safetensors.numpy import save_file

    g = tmp_path / "g.safetensors"
    save_file({"input_ids": np.array([[1, 2, 3]], np.int64),
               "blocks.7.resid_post": np.zeros((1, 3, 64), np.float32)}, str(g),
              metadata={"format": "parity-golden/1", "family": "gpt2", "dtype": "float32"})
    rc, out, err = run(capsys, "golden", "check", "--file", g, "--checkpoint",
                       tiny_checkpoints["gpt2"])
    assert rc != 0 and "PASS" not in out.replace("SKIP", ""), (out, err)


# ----------------------------------------------------------------------------- the HTML report
@pytest.fixture(scope="module")
def neo_report():
    from parity.reports.run import run_report

    div, attr, run_ = run_report(families=["gpt_neo"], variants=["hf", "meg"],
                                 dtypes=["float16"], attribution=False)
    return div, attr, run_


def test_the_html_report_leads_with_a_worst_floor_ratio_overview(neo_report):
    import re

    from parity.reports.render import render_html

    div, attr, run_ = neo_report
    page = render_html(div, attr, run_, "t")
    h2 = re.findall(r"<h2>([^<]+)</h2>", page)
    assert h2[0] == "Overview: worst floor ratio", h2
    table = page.split("Overview: worst floor ratio", 1)[1].split("</table>", 1)[0]
    cells = {}
    for row in re.findall(r"<tr>(.*?)</tr>", table, re.S)[1:]:
        tds = re.findall(r"<td([^>]*)>([^<]*)</td>", row)
        cells[tds[0][1]] = tds[1:]
    heads = re.findall(r"<th>([^<]*)</th>", table)[1:]
    assert set(cells) == {"gpt_neo / tiny", "gpt_neo / stress"}
    # independently: the worst floor ratio per subject from the frame
    for ckpt in ("tiny", "stress"):
        for col, (attrs, text) in zip(heads, cells[f"gpt_neo / {ckpt}"]):
            variant, dtype = col.split()
            g = div[(div["checkpoint"] == ckpt) & (div["variant"] == variant)]
            if (g["verdict"] == "overflow").any():
                assert text == "OVERFLOW" and 'class="overflow"' in attrs
            else:
                assert float(text) == pytest.approx(g["floor_ratio"].max(), rel=5e-3)
                assert "hsl(" in attrs
    assert [t for _, t in cells["gpt_neo / stress"]].count("OVERFLOW") == 1  # meg fp16


def test_long_html_sections_fold_and_the_per_layer_plots_show_failing_site_kinds(neo_report):
    from parity.reports import plots
    from parity.reports.render import render_html

    div, attr, run_ = neo_report
    page = render_html(div, attr, run_, "t")
    assert "<details open><summary><h2>Why</h2></summary>" in page
    assert "<details><summary><h2>Run</h2></summary>" in page
    assert page.count("<details") == page.count("</details>") >= 6
    g = div[div["checkpoint"] == "stress"].copy()
    probs = g["kind"] == "attn.probs"
    assert "attn.probs" not in plots._plot_kinds("gpt_neo", g.assign(
        verdict=g["verdict"].where(~probs, "pass")))
    g.loc[probs & (g["layer"] == 1), "verdict"] = "fail"
    assert "attn.probs" in plots._plot_kinds("gpt_neo", g)

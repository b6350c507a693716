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

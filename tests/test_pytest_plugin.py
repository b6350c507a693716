"""The pytest plugin as a user meets it: installed by entry point, cheap to load, and working in
a fresh folder with no conftest (pytest in a subprocess: these runs cost seconds each, so they
are few and share their work).

- a user's test file calling assert_parity, plus the README's "Use it in your own tests"
  example, in one fresh folder, run with --parity-update-golden (the example's golden made,
  the reason stored; checking a golden is tests/test_testing.py's);
- `pytest --parity-checkpoint DIR --junitxml` in an empty folder: one item per gate check,
  exit 0 on a clean tiny checkpoint, 1 with a NaN weight; bad input a usage error with the
  gate's one-line message (in process).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from importlib.metadata import entry_points
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from parity import cli, pytest_plugin
from parity.checkpoints.checkpoint import load_checkpoint
from parity.checkpoints.inputs import Inputs
from parity.goldens.io import read_golden, write_golden
from parity import subjects

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "numpy", "pandas", "matplotlib", "transformers", "safetensors", "rich")


def pytest_run(cwd: Path, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                          cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def junit_cases(path: Path) -> dict[str, ET.Element]:
    return {c.get("name"): c for c in ET.parse(path).getroot().iter("testcase")}


def heavy_modules_after(statement: str) -> list[str]:
    code = (f"import sys, json; {statement}; "
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


# ----------------------------------------------------------------------------- loading
def test_the_plugin_is_registered_by_entry_point(pytestconfig):
    eps = {e.name: e.value for e in entry_points(group="pytest11")}
    assert eps.get("parity") == "parity.pytest_plugin"
    assert pytestconfig.pluginmanager.get_plugin("parity") is pytest_plugin


def test_loading_the_plugin_imports_nothing_heavy():
    """pytest loads the plugin in every run of the environment: no torch, NumPy, pandas,
    matplotlib or transformers until a fixture or option is used. (The detector sees a heavy
    import: parity.testing brings NumPy.)"""
    assert heavy_modules_after("import parity.pytest_plugin") == []
    assert "numpy" in heavy_modules_after("import parity.testing")


def test_the_gate_options_mirror_parity_gate():
    """Each `parity gate` option has a --parity-<name> twin with the same default (--report and
    --junit aside: pytest's --junitxml writes the per-check results). A gate option added
    later fails here until the plugin passes it on."""
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command").choices["gate"]
    gate = {a.dest: a.default for a in sub._actions
            if a.dest not in ("help", "debug", "report", "junit")}
    plugin = {n: kw["default"] for n, kw in pytest_plugin.GATE_OPTIONS.items()}
    assert set(plugin) == set(gate), f"mirror in parity/pytest_plugin.py GATE_OPTIONS: " \
        f"missing {sorted(set(gate) - set(plugin))}, extra {sorted(set(plugin) - set(gate))}"
    assert plugin == {**gate, "checkpoint": None}


# ----------------------------------------------------------------------------- a user's folder
USER_TESTS = '''
import numpy as np
import pytest
import torch

from parity.testing import assert_parity

R = torch.from_numpy(np.random.default_rng(0).standard_normal((4, 8, 30)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rounded_once(dtype):
    assert_parity(R.to(dtype), R, dtype=dtype)


def test_one_percent_error():
    assert_parity((R * 1.01).half(), R, dtype="fp16")
'''


def readme_example() -> str:
    section = (ROOT / "README.md").read_text().split("## Use it in your own tests", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_a_fresh_folder_uses_assert_parity_and_the_readme_example(tmp_path, tiny_checkpoints):
    (tmp_path / "test_user.py").write_text(USER_TESTS)
    (tmp_path / "test_my_model.py").write_text(readme_example())
    shutil.copytree(tiny_checkpoints["gpt2"], tmp_path / "tiny-gpt2")
    assert not list(tmp_path.rglob("conftest.py"))

    run = pytest_run(tmp_path, "--parity-update-golden=first fp16 golden",
                     "--junitxml", "out.xml")
    assert run.returncode == 1, run.stdout + run.stderr  # test_one_percent_error fails
    cases = junit_cases(tmp_path / "out.xml")
    assert {"test_rounded_once[dtype0]", "test_rounded_once[dtype1]",
            "test_fp16_logits_sit_at_the_rounding_floor"} == {
        n for n, c in cases.items() if not len(c.findall("failure"))
        and not len(c.findall("error")) and not len(c.findall("skipped"))}, run.stdout
    text = cases["test_one_percent_error"].find("failure").text
    assert re.search(r"Mismatched elements: \d+ / 960 \(", text), text
    assert re.search(r"Worst at index \(\d+, \d+, \d+\): actual ", text), text
    # the example's golden, made by the option with its reason (checking one is test_testing's)
    assert "parity: wrote golden" in run.stdout
    golden = tmp_path / ("goldens/test_my_model/"
                         "test_fp16_logits_sit_at_the_rounding_floor.hf-fp16.safetensors")
    assert read_golden(golden).meta["update_reason"] == "first fp16 golden"


# ----------------------------------------------------------------------------- gate items
def test_every_gate_check_is_a_test_item_and_a_clean_checkpoint_passes(tmp_path,
                                                                       tiny_checkpoints):
    ck = tiny_checkpoints["gpt2"]
    inp = Inputs(np.array([[1, 2, 3, 4, 5, 6]]))
    trace = subjects.run("reference", load_checkpoint(ck), inp)
    trace.explicit_positions = False  # default positions: none stored
    golden = write_golden(tmp_path / "from-training.safetensors", trace,
                          {"family": "gpt2", "dtype": "float64", "producer": "test"})
    empty = tmp_path / "empty"
    empty.mkdir()
    run = pytest_run(empty, "--parity-checkpoint", str(ck), "--parity-golden", str(golden),
                     "--parity-device", "cpu", "--junitxml", "out.xml", "-rs")
    assert run.returncode == 0, run.stdout + run.stderr
    cases = junit_cases(empty / "out.xml")
    # generic over the gate's rows: these at least, each with its verdict as a property
    assert {"structure", "tokenizer", "golden:from-training.safetensors", "subject",
            "determinism"} <= set(cases), list(cases)
    for name, c in cases.items():
        props = {p.get("name"): p.get("value") for p in c.iter("property")}
        assert c.get("classname") == "parity-gate"
        assert (props["verdict"] == "skip") == bool(c.findall("skipped")), name
        assert not c.findall("failure") and not c.findall("error"), name
    assert {p.get("name") for p in cases["subject"].iter("property")} >= {
        "logits_floor_ratio", "worst_floor_ratio", "top1", "kl"}
    assert "no tokenizer files" in cases["tokenizer"].find("skipped").get("message")
    assert "verdict: PASS - tokenizer not checked" in run.stdout


def test_a_nan_weight_fails_the_structure_item(tmp_path, tiny_checkpoints):
    ck = shutil.copytree(tiny_checkpoints["gpt2"], tmp_path / "nan")
    w = load_file(str(ck / "model.safetensors"))
    w["transformer.h.1.mlp.c_fc.weight"][3, 5] = float("nan")
    save_file(w, str(ck / "model.safetensors"), metadata={"format": "pt"})
    empty = tmp_path / "empty"
    empty.mkdir()
    run = pytest_run(empty, "--parity-checkpoint", str(ck), "--parity-device", "cpu",
                     "--junitxml", "out.xml")
    assert run.returncode == 1, run.stdout + run.stderr
    cases = junit_cases(empty / "out.xml")
    text = cases["structure"].find("failure").text
    assert "non-finite weights: h.1.mlp.c_fc.weight (1 non-finite)" in text
    assert "family: gpt2" in text  # the figures are in the failure text
    assert cases["subject"].findall("skipped") and cases["determinism"].findall("skipped")


def test_bad_gate_input_is_a_usage_error_with_the_gates_message(tmp_path):
    """In process: pytest turns a UsageError into exit 4 and prints `ERROR: <message>`."""
    opts = {f"parity_{n}": kw["default"] for n, kw in pytest_plugin.GATE_OPTIONS.items()}
    opts.update(parity_checkpoint=str(tmp_path / "nope"), parity_device="cpu")
    config = SimpleNamespace(getoption=opts.__getitem__, _parity_gate=None)
    with pytest.raises(pytest.UsageError) as e:
        pytest_plugin.run_gate_once(config)
    assert str(e.value) == f"parity gate: error: {tmp_path / 'nope'}: not a checkpoint directory"
    assert config._parity_gate is None

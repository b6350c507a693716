"""Compiled subjects (`--compile inductor`), run in-process through parity.cli.main.

What a user relies on: a clean checkpoint compiled with Inductor passes the gate in bf16, on the
fast path and under transformers' sdpa attention; the compiled subject really ran compiled (its
logits differ bitwise from the same subject run eagerly) and is as accurate as a healthy half run;
its trace metadata says so; each graph is compiled once (a block's graph serves every layer, the
determinism rerun recompiles nothing); sites it does not expose are listed as `not_exposed`, the
required ones (logits, block outputs) are there; and a compile request that cannot be honoured is
one `error: ...` line, exit 2, never a PASS.

Compiling costs seconds per graph on a 2-core CPU: each compiled gate runs once per session
(session fixtures), on the tiny checkpoints, GPT-2 (the fast path and transformers) and GPT-J
(rotary; transformers under `slow`).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import reference
from reference.sites import block_output_site
from parity import cli
from parity.checkpoints.checkpoint import load_checkpoint
from parity.engine import budgets as B
from parity.engine import metrics as M
from parity.engine.compare import token_rows
from parity.goldens.io import read_golden
from parity.subjects import compiled as C

TOKENS = "5 17 44 3 9 100 7 2; 11 12 13 14 15 16 17 18"
GATES = {  # name -> (family, gate arguments)
    "fast-gpt2": ("gpt2", ["--compile", "inductor", "--dtype", "bfloat16"]),
    "fast-gptj": ("gptj", ["--compile", "inductor", "--dtype", "bfloat16"]),
    "hf-sdpa-gpt2": ("gpt2", ["--impl", "hf", "--variant", "sdpa", "--compile", "inductor",
                              "--dtype", "bfloat16"]),
    "hf-sdpa-gptj": ("gptj", ["--impl", "hf", "--variant", "sdpa", "--compile", "inductor",
                              "--dtype", "bfloat16"]),
}
SLOW = {"hf-sdpa-gptj": "a second whole-model transformers compile (~40 s on 2 cores)"}


def _run_gate(ckpt: Path, args: list[str], report: Path) -> dict:
    """One gate, counting torch.compile wrappers made and graphs dynamo compiled by the subject
    and determinism checks. The cache, batch and generation rows are left out here (skipped):
    they decode new sequence lengths, each a graph of its own under static shapes
    (tests/test_generation.py runs a compiled subject through them)."""
    import torch._dynamo.utils as du

    from parity.commands import gate as G
    from parity.engine.generation import skipped

    made = []
    real = C.compile_fn
    rows = G.consistency_rows, G.generation_row

    def counting(fn, spec):
        made.append(getattr(fn, "__name__", str(fn)))
        return real(fn, spec)

    graphs0 = du.counters["stats"]["unique_graphs"]
    C.compile_fn = counting
    G.consistency_rows = lambda *a, **k: []
    G.generation_row = lambda *a, **k: (skipped("left out of the compile-count gates"), None)
    try:
        rc = cli.main(["gate", str(ckpt), "--device", "cpu", "--report", str(report), *args])
    finally:
        C.compile_fn = real
        G.consistency_rows, G.generation_row = rows
    return {"rc": rc, "report": report, "wrappers": made,
            "graphs": du.counters["stats"]["unique_graphs"] - graphs0}


@pytest.fixture(scope="session")
def gates(tiny_checkpoints, tmp_path_factory):
    """Each gate of GATES run at most once per session, on first use."""
    done: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in done:
            family, args = GATES[name]
            done[name] = _run_gate(tiny_checkpoints[family], args,
                                   tmp_path_factory.mktemp(name) / "report")
        return done[name]
    return get


def _params():
    return [pytest.param(n, marks=pytest.mark.slow(reason=SLOW[n])) if n in SLOW else n
            for n in GATES]


def _run_json(report: Path) -> dict:
    return json.loads((report / "run.json").read_text())


@pytest.mark.parametrize("name", _params())
def test_compiled_gate_passes_a_clean_checkpoint(name, gates, tiny_checkpoints):
    g = gates(name)
    run = _run_json(g["report"])
    assert g["rc"] == 0, run["verdict_line"]
    checks = {c["check"]: c for c in run["checks"]}
    assert checks["subject"]["verdict"] == "pass", checks["subject"]["detail"]
    assert checks["determinism"]["verdict"] == "pass", checks["determinism"]["detail"]
    meta = run["subject"]
    assert meta["compile"] == "inductor" and meta["compile_backend"] == "inductor"
    assert meta["compile_codegen"] == "cpp" and meta["inductor.emulate_precision_casts"] == "False"
    if meta["impl"] == "fast":
        assert meta["emulate"] == "off"  # Inductor's kernels in the real dtype


@pytest.mark.parametrize("name", _params())
def test_compiled_gate_lists_every_site(name, gates, tiny_checkpoints):
    """Every site of the family appears per mode: exposed and judged, or `not_exposed`; the
    policy's required sites (logits, every block output) are exposed and pass."""
    family = GATES[name][0]
    g = gates(name)
    df = pd.read_csv(g["report"] / "divergence.csv")
    cfg = load_checkpoint(tiny_checkpoints[family]).config
    names = reference.site_names(family, cfg.n_layer, cfg.block)
    out = block_output_site(family)
    for mode, rows in df.groupby("mode"):
        assert list(rows["site"]) == names, mode
        required = rows[rows["site"].str.endswith("." + out) | (rows["site"] == "logits")]
        assert len(required) == cfg.n_layer + 1
        assert (required["verdict"] == "pass").all(), required[["site", "verdict", "reason"]]
    hidden = df[df["verdict"] == "not_exposed"]
    assert len(hidden) and (hidden["reason"] == "not exposed by the subject").all()
    assert f"blocks.0.mlp.fc_in" in set(hidden["site"])  # capturing it would change fusion


def test_fast_gate_compiles_one_block_graph_for_every_layer(gates):
    """4 layers, both modes and the determinism rerun: one graph for the block, one for the
    head, nothing recompiled."""
    g = gates("fast-gpt2")
    assert g["rc"] == 0
    assert sorted(g["wrappers"]) == ["_graph_block", "_graph_head"]
    assert g["graphs"] == 2


def test_hf_gate_compiles_the_model_once(gates):
    g = gates("hf-sdpa-gpt2")
    assert g["rc"] == 0
    assert g["wrappers"] == ["_forward", "_forward_plain"] and g["graphs"] == 2


@pytest.fixture(scope="session")
def traces(tiny_checkpoints, tmp_path_factory):
    """`parity trace --impl fast --dtype bfloat16` of GPT-2, compiled and eager (native)."""
    root = tmp_path_factory.mktemp("compiled-trace")
    ckpt = tiny_checkpoints["gpt2"]
    out = {}
    for name, extra in (("inductor", ["--compile", "inductor"]), ("eager", ["--emulate", "off"])):
        path = root / f"{name}.safetensors"
        assert cli.main(["trace", str(ckpt), "--impl", "fast", "--dtype", "bfloat16",
                         "--tokens", TOKENS, "--out", str(path), *extra]) == 0
        out[name] = read_golden(path)
    return ckpt, out


def test_trace_says_inductor_and_differs_from_eager(traces):
    ckpt, t = traces
    comp, eager = t["inductor"], t["eager"]
    assert comp.meta["compile"] == "inductor" and comp.meta["emulate"] == "off"
    assert "compile" not in eager.meta
    assert comp.meta["inductor.emulate_precision_casts"] == "False"
    assert comp.logits.shape == eager.logits.shape
    assert not np.array_equal(comp.logits, eager.logits)


def test_compiled_trace_is_as_accurate_as_a_healthy_half_run(traces):
    """The compiled logits against float64, in units of the bf16 rounding floor's error."""
    ckpt_dir, t = traces
    ckpt = load_checkpoint(ckpt_dir)
    comp = t["inductor"]
    ids = comp.input_ids
    ref = reference.forward(ckpt.config, ckpt.weights(), ids).sites["logits"]
    floor = reference.forward(ckpt.config, ckpt.weights(), ids, floor="bfloat16").sites["logits"]
    valid = M.valid_mask("logits", ref, None)
    ratio = M.floor_ratio(M.rel_l2(comp.logits.astype(np.float64), ref, valid),
                          M.rel_l2(floor, ref, valid))
    budget = B.budget_for(B.load_policy(), dtype="bfloat16", family="gpt2", site="logits")
    assert ratio <= budget.floor_ratio_warn, ratio


@pytest.mark.parametrize("args, words", [
    (["--impl", "fast", "--compile", "inductor", "--emulate", "on"], "--emulate on"),
    (["--impl", "reference", "--compile", "inductor"], "--compile applies to"),
    (["--impl", "fast", "--compile", "tensorrt"], "--compile"),
])
def test_trace_refuses_a_compile_it_cannot_honour(args, words, tiny_checkpoints, tmp_path,
                                                 capsys):
    out = tmp_path / "t.safetensors"
    rc = cli.main(["trace", str(tiny_checkpoints["gpt2"]), "--tokens", "1 2 3", "--out",
                   str(out), *args])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err


def test_gate_refuses_compile_with_emulation(tiny_checkpoints, tmp_path, capsys):
    report = tmp_path / "r"
    rc = cli.main(["gate", str(tiny_checkpoints["gpt2"]), "--device", "cpu", "--report",
                   str(report), "--compile", "inductor", "--emulate", "on"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "--emulate on" in err, err
    assert not (report / "run.json").exists()


def test_cli_choices_are_the_compile_specs():
    assert cli.COMPILE_CHOICES == C.SPECS
    assert C.split_label(C.variant_label("meg+gelu=tanh", "inductor")) == ("meg+gelu=tanh",
                                                                          "inductor")
    assert C.split_label("hf") == ("hf", "off")


@pytest.mark.slow(reason="compiles three subjects per dtype (compiled, eager, emulated casts)")
def test_report_shows_compiled_subjects_next_to_eager(tmp_path, capsys):
    out = tmp_path / "rep"
    rc = cli.main(["report", "--families", "gpt2", "--variants", "hf", "--dtypes", "bf16",
                   "--compile", "inductor", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    df = pd.read_csv(out / "divergence.csv")
    assert set(df["variant"]) == {"hf", "hf+compile=inductor"}
    assert set(df.loc[df["variant"] == "hf+compile=inductor", "checkpoint"]) == {"tiny", "stress"}
    text = (out / "summary.md").read_text()
    assert "What compiling changes" in text and "compile=inductor->off" in text


def test_compile_knob_attribution(tiny_checkpoints):
    """The compile row measures the compiled subject against its eager twin: compiling moves the
    logit error (before != after), and emulate_precision_casts is measured beside it."""
    from parity.checkpoints.inputs import default_batch
    from parity.engine.attribution import knob_attribution

    ckpt = load_checkpoint(tiny_checkpoints["gpt2"])
    inputs = default_batch(ckpt.config, 16, seed=0)
    df = knob_attribution(ckpt, inputs, "hf+compile=inductor", "bfloat16")
    assert list(df["knob"]) == ["compile", C.EPC]
    comp = df.iloc[0]
    assert comp["variant"] == "hf+compile=inductor" and comp["to_value"] == "off"
    assert np.isfinite(comp["error_before"]) and comp["error_before"] != comp["error_after"]
    assert comp["error_before"] == df.iloc[1]["error_before"]
    rows = token_rows(inputs)
    assert rows is not None  # the default batch is padded: only real tokens count


@pytest.mark.cpu_kernels  # bitwise expectations about torch's CPU kernels
def test_sdpa_backend_knob_chooses_the_kernel(tiny_checkpoints):
    """On a CPU torch runs the flash kernel by default; `sdpa_backend=math` runs the math one,
    which rounds differently. Under the CPU emulation the knob does not apply."""
    from parity.checkpoints.inputs import default_batch
    from parity.subjects.fast import FastModel

    ckpt = load_checkpoint(tiny_checkpoints["gpt2"])
    inputs = default_batch(ckpt.config, 16, seed=0)

    def logits(backend, **kw):
        return FastModel(ckpt, f"sdpa+sdpa_backend={backend}", dtype="bfloat16",
                         **kw).forward(inputs, sites="logits").sites["logits"]

    native = {b: logits(b, emulate=False) for b in ("default", "math", "flash")}
    assert np.array_equal(native["default"], native["flash"])
    assert not np.array_equal(native["math"], native["flash"])
    assert np.array_equal(logits("math"), logits("flash"))  # emulated: one fp32 computation


def test_sdpa_backend_without_a_cpu_kernel_is_refused(tiny_checkpoints, tmp_path, capsys):
    out = tmp_path / "t.safetensors"
    rc = cli.main(["trace", str(tiny_checkpoints["gpt2"]), "--impl", "fast", "--variant",
                   "sdpa+sdpa_backend=cudnn", "--tokens", "1 2 3", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "sdpa_backend=cudnn" in err and not out.exists(), err


def test_flex_attention_is_a_transformers_variant_of_gptj(tiny_checkpoints):
    """GPT-J under transformers' flex_attention: no scores or probabilities, the rest within
    budget of the float64 reference, and not bitwise the sdpa run."""
    from parity.checkpoints.inputs import default_batch
    from parity.subjects import run

    ckpt = load_checkpoint(tiny_checkpoints["gptj"])
    inputs = default_batch(ckpt.config, 16, seed=0)
    flex = run("hf", ckpt, inputs, variant="flex_attention", dtype="bfloat16")
    sdpa = run("hf", ckpt, inputs, variant="sdpa", dtype="bfloat16")
    assert flex.meta["attn_implementation"] == "flex_attention"
    assert not any(s.endswith(("attn.scores", "attn.probs")) for s in flex.sites)
    ref = reference.forward(ckpt.config, ckpt.weights(), inputs.input_ids,
                            inputs.attention_mask, inputs.position_ids).sites["logits"]
    floor = reference.forward(ckpt.config, ckpt.weights(), inputs.input_ids,
                              inputs.attention_mask, inputs.position_ids,
                              floor="bfloat16").sites["logits"]
    valid = M.valid_mask("logits", ref, token_rows(inputs))
    ratio = M.floor_ratio(M.rel_l2(flex.sites["logits"], ref, valid), M.rel_l2(floor, ref, valid))
    budget = B.budget_for(B.load_policy(), dtype="bfloat16", family="gptj", site="logits")
    assert ratio <= budget.floor_ratio_warn, ratio
    assert not np.array_equal(flex.sites["logits"], sdpa.sites["logits"])


def test_flex_attention_that_cannot_compile_whole_is_an_error(tiny_checkpoints, tmp_path, capsys):
    """transformers' flex mask code branches on data: no single graph. That is exit 2 with the
    reason, never a silently partial compile."""
    report = tmp_path / "r"
    rc = cli.main(["gate", str(tiny_checkpoints["gptj"]), "--device", "cpu", "--report",
                   str(report), "--impl", "hf", "--variant", "flex_attention", "--compile",
                   "inductor", "--dtype", "bfloat16"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "cannot be compiled as one graph" in err
    assert err.count("\n") == 1 and not (report / "run.json").exists()


def test_compiled_gate_fails_where_the_compiled_model_overflows(tmp_path, capsys):
    """The stress GPT-2 in fp16 under the `hf` preset: the raw q.k^T overflows in eager and in
    the compiled model alike. The compiled gate must fail (exit 1), naming a block output (the
    first site it exposes after the overflow), never pass."""
    from parity.checkpoints.recipes import make_checkpoint

    ckpt = make_checkpoint("gpt2", tmp_path / "stress", preset="stress", seed=0)
    g = _run_gate(ckpt, ["--compile", "inductor", "--dtype", "float16"], tmp_path / "report")
    capsys.readouterr()
    assert g["rc"] == 1
    checks = {c["check"]: c for c in _run_json(g["report"])["checks"]}
    assert checks["subject"]["verdict"] == "fail"
    assert "non-finite" in checks["subject"]["detail"]
    assert "resid_post" in checks["subject"]["detail"] or "logits" in checks["subject"]["detail"]

"""Golden activation files (parity/goldens/): update, check, manifest, foreign goldens.

What a user relies on: the committed goldens reproduce here (the regression test of the suite);
a change of the reference or of the fast path fails the check with a message naming the file,
the site and the size of the change; a corrupted, tampered, unlisted or unknown-format golden
is an error (exit 2), never a pass; an update that fails half-way leaves the old goldens as they
were; a golden written by hand from another framework is checked against the reference with a
tolerance that follows from its dtype.

Every test but the committed-golden ones works on a copy in a temporary folder: nothing here
writes to golden/ unless pytest runs with --update-golden.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

import reference
import reference.ops as ops
from parity import cli
from parity.subjects import fast
from parity.goldens import check as gcheck, foreign, spec, store
from parity.engine.budgets import tolerance
from parity.checkpoints.checkpoint import load_checkpoint
from parity.errors import ParityError

FAMILIES = ["gpt2", "gptmeg"]  # a Conv1D family and its Megatron twin: enough for the flows


def patch_everywhere(monkeypatch, name: str, value) -> None:
    """Replace `name` in every golden module that holds it (they import each other's names)."""
    hit = [m for m in (spec, store, gcheck, foreign) if hasattr(m, name)]
    assert hit, name
    for m in hit:
        monkeypatch.setattr(m, name, value)


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("golden-made")
    store.update(d, families=FAMILIES, reason="test", log=lambda *_: None)
    return d


@pytest.fixture
def gdir(made, tmp_path) -> Path:
    """A private copy of the freshly made goldens."""
    d = tmp_path / "golden"
    shutil.copytree(made, d)
    return d


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes()
            for p in sorted(d.rglob("*")) if p.is_file()}


def manifest(d: Path) -> dict:
    return json.loads((d / spec.MANIFEST).read_text())


def write_manifest(d: Path, m: dict) -> None:
    (d / spec.MANIFEST).write_text(json.dumps(m, indent=1))


def rewrite(d: Path, rel: str, tensors_fn=None, meta_fn=None, reseal=True) -> None:
    """Edit a golden by hand (what `check` must catch); `reseal` also fixes its sha256 in the
    manifest, as someone covering their tracks would."""
    p = d / rel
    with safe_open(str(p), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if tensors_fn:
        tensors_fn(tensors)
    if meta_fn:
        meta_fn(meta)
    p.write_bytes(store.serialize(tensors, meta))
    if reseal:
        m = manifest(d)
        m["files"][rel]["sha256"] = store._sha(p)
        write_manifest(d, m)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main(["golden", *(str(a) for a in argv)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_one_error_line(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


REF = "gptmeg/reference-float64.safetensors"


# ------------------------------------------------------------------------------ update, then check
def test_update_then_check_passes_and_the_manifest_describes_every_file(gdir, capsys):
    rc, out, _ = run_cli(capsys, "check", "--dir", gdir)
    assert rc == 0, out
    planned = {s.path for s in spec.plan(FAMILIES)}
    m = manifest(gdir)
    assert set(m["files"]) == planned == {
        p.relative_to(gdir).as_posix() for p in gdir.rglob("*.safetensors")}
    for rel, e in m["files"].items():
        assert e["sha256"] == store._sha(gdir / rel) and e["bytes"] == (gdir / rel).stat().st_size
        assert e["generator_version"] == spec.GENERATOR_VERSION
        assert {"torch", "numpy", "device"} <= set(e["environment"])
        assert e["checkpoint"]["family"] == e["family"]
        assert {"preset", "seed", "config_sha256", "weights_sha256"} <= set(e["checkpoint"])
        assert {"step1", "step2"} == set(e["inputs"])
        assert spec.Spec.from_entry(rel, e).path == rel
    assert m["history"][-1]["reason"] == "test"
    assert out.count("PASS ") == len(planned) and "0 fail" in out.splitlines()[-1]


def test_update_without_changes_rewrites_nothing(gdir):
    before = snapshot(gdir)
    assert store.update(gdir, families=FAMILIES, reason="again", log=lambda *_: None) == []
    assert snapshot(gdir) == before  # same bytes: safetensors headers are written sorted


def test_golden_holds_padding_and_a_cache_step_equal_to_the_full_forward(gdir, tiny_checkpoints):
    """Step 2 (past = step 1's cache) of the reference golden equals one forward over the
    concatenated tokens; the padded row has explicit positions starting at its first token."""
    g = {}
    with safe_open(str(gdir / "gpt2/reference-float64.safetensors"), framework="np") as f:
        g = {k: f.get_tensor(k) for k in f.keys()}
    mask1, mask2 = g["attention_mask"], g["step2/attention_mask"]
    assert (mask1[1] == 0).any() and (mask1[0] == 1).all()  # row 1 left-padded
    assert g["position_ids"][1][mask1[1] == 1][0] == 0
    assert mask2.shape[1] == mask1.shape[1] + g["step2/input_ids"].shape[1]
    ckpt = load_checkpoint(tiny_checkpoints["gpt2"])
    ids = np.concatenate([g["input_ids"], g["step2/input_ids"]], axis=1)
    pos = np.concatenate([g["position_ids"], g["step2/position_ids"]], axis=1)
    full = reference.forward(ckpt.config, ckpt.weights(), ids, mask2, pos)
    t2 = g["step2/input_ids"].shape[1]
    r, y = full.logits[:, -t2:], g["step2/logits"]
    assert np.abs(y - r).max() <= tolerance("float64_exact") * np.abs(r).max()


def test_fast_goldens_store_sites_in_the_dtype_that_made_them(gdir):
    with safe_open(str(gdir / "gpt2/fast-hf-bfloat16-cpu-emulated.safetensors"), "pt") as f:
        assert f.get_tensor("logits").dtype == torch.bfloat16
        assert f.get_tensor("step2/blocks.0.resid_post").dtype == torch.bfloat16
        assert f.get_tensor("input_ids").dtype == torch.int64
        assert f.metadata()["device_class"] == "cpu-emulated"


# ------------------------------------------------------------------------------ divergences
def test_changed_reference_fails_naming_the_file_site_and_size(gdir, monkeypatch, capsys,
                                                               tiny_checkpoints):
    """GPTMeg's truncated gelu constant replaced by the exact one: a 2.6e-10 change."""
    monkeypatch.setattr(ops, "MEGATRON_SQRT_2_OVER_PI", ops.SQRT_2_OVER_PI)
    rc, out, _ = run_cli(capsys, "check", "--dir", gdir, "--families", "gptmeg")
    assert rc == 1
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 1 and fails[0].startswith(f"FAIL {REF}: site blocks.0.resid_post ")
    # the size reported is the size of the change, recomputed here independently
    with safe_open(str(gdir / REF), framework="np") as f:
        old = f.get_tensor("blocks.0.resid_post")
        ids, mask, pos = (f.get_tensor(k) for k in ("input_ids", "attention_mask", "position_ids"))
    ckpt = load_checkpoint(tiny_checkpoints["gptmeg"])
    new = reference.forward(ckpt.config, ckpt.weights(), ids, mask, pos)["blocks.0.resid_post"]
    rel = np.abs(new - old).max() / np.abs(old).max()
    assert rel > tolerance("golden_float64")
    assert f"max rel change {rel:.3g}" in fails[0] and "golden_float64" in fails[0]


def test_changed_fast_path_fails_only_the_goldens_it_touches(gdir, monkeypatch):
    """pow(x, 3) rounded once instead of CUDA's twice: only the emulated eager gelu_new moves."""
    monkeypatch.setattr(fast.Numerics, "pow3", lambda self, x: self.r(torch.pow(x, 3.0)))
    results = gcheck.check(gdir, ["gpt2"])
    failed = {r.name for r in results if r.verdict == "fail"}
    assert failed == {"gpt2/fast-hf-float16-cpu-emulated.safetensors",
                      "gpt2/fast-hf-bfloat16-cpu-emulated.safetensors"}
    for r in results:
        if r.verdict == "fail":
            # the first site the changed gelu reaches, in execution order
            assert r.detail.startswith(f"FAIL {r.name}: site blocks.0.resid_post max rel ")
            assert "ULP of" in r.detail
            assert "golden_fast_ulp" in r.detail


def test_update_records_a_change_and_check_then_passes(gdir, monkeypatch):
    monkeypatch.setattr(ops, "MEGATRON_SQRT_2_OVER_PI", ops.SQRT_2_OVER_PI)
    changed = store.update(gdir, families=["gptmeg"], reason="exact constant",
                             log=lambda *_: None)
    assert changed == [REF]
    assert manifest(gdir)["history"][-1]["changed"] == [REF]
    assert all(r.verdict == "pass" for r in gcheck.check(gdir, ["gptmeg"]))


def test_update_says_by_how_much_each_file_changed(gdir, monkeypatch, tiny_checkpoints):
    """'1 of 1 files changed' alone does not say whether numbers moved by 1e-14 or by 1%: the
    log and the manifest history give the largest change, its site and size, recomputed here
    independently."""
    with safe_open(str(gdir / REF), framework="np") as f:
        old = {k: f.get_tensor(k) for k in f.keys()}
    monkeypatch.setattr(ops, "MEGATRON_SQRT_2_OVER_PI", ops.SQRT_2_OVER_PI)
    lines = []
    store.update(gdir, families=["gptmeg"], reason="exact constant", log=lines.append)
    with safe_open(str(gdir / REF), framework="np") as f:
        new = {k: f.get_tensor(k) for k in f.keys()}
    def rel_change(a, b):
        fin = np.isfinite(a) & np.isfinite(b)  # masked scores hold -inf in both
        return np.abs(b[fin] - a[fin]).max() / np.abs(a[fin]).max()

    rel = {k: rel_change(old[k], new[k]) for k in new
           if new[k].dtype.kind == "f" and not np.array_equal(new[k], old[k], equal_nan=True)}
    site = max(rel, key=rel.get)
    want = f"max rel change {rel[site]:.3g} at {site} ("
    assert want in lines[-1] and "1 of" in lines[-1], lines
    assert any(ln.strip().startswith(f"{REF}: {want}") for ln in lines), lines
    assert want in manifest(gdir)["history"][-1]["changes"][REF]


def test_ulp_figures_near_zero_read_as_the_size_of_the_change():
    """Two float64 values +-1e-17 beside values of ~1 are 9e18 representable steps apart; the
    golden figure counts ULPs of the site's largest value, so it reads 0.09."""
    from parity.engine.metrics import ulp_distance

    old = np.array([1.0, 0.5, 1e-17])
    new = np.array([1.0, 0.5, -1e-17])
    assert ulp_distance(new, old, "float64").max() > 1e18  # the figure it replaces
    d = gcheck.diff_arrays("x", old, new, "float64")
    assert d.max_ulp == pytest.approx(2e-17 / 2.0**-52)
    assert "ULP of the site's largest float64 value" in d.describe()
    one = gcheck.diff_arrays("x", old, np.array([1.0 + 2.0**-52, 0.5, 1e-17]), "float64")
    assert one.max_ulp == 1.0


def test_hand_edited_value_with_resealed_manifest_fails_at_that_site(gdir, capsys):
    def bump(t):
        t["step2/ln_f"][1, 0, 5] *= 1 + 1e-9

    rewrite(gdir, REF, bump)
    rc, out, _ = run_cli(capsys, "check", "--dir", gdir, "--families", "gptmeg")
    assert rc == 1 and f"FAIL {REF}: site step2/ln_f " in out


# ------------------------------------------------------------------------------ integrity errors
def test_flipped_byte_is_reported_as_a_checksum_error(gdir, capsys):
    p = gdir / REF
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x01
    p.write_bytes(bytes(b))
    rc, out, err = run_cli(capsys, "check", "--dir", gdir)
    assert rc == 2 and "PASS" not in out
    assert_one_error_line(err, str(p), "sha256", "corrupted")


def test_update_repairs_a_corrupted_golden(gdir):
    p = gdir / REF
    b = bytearray(p.read_bytes())
    b[-1] ^= 0x01
    p.write_bytes(bytes(b))
    assert store.update(gdir, families=["gptmeg"], reason="repair", log=lambda *_: None) == [REF]
    assert all(r.verdict == "pass" for r in gcheck.check(gdir))


@pytest.mark.parametrize("stale", ["missing file", "extra file", "sha256 edited", "no manifest",
                                   "entry relabelled"])
def test_stale_manifest_is_an_error(gdir, capsys, stale):
    rel = "gpt2/fast-meg-float16-cpu-emulated.safetensors"
    if stale == "missing file":
        (gdir / rel).unlink()
        needles = (rel, "listed in MANIFEST.json but missing")
    elif stale == "extra file":
        shutil.copy(gdir / rel, gdir / "gpt2/extra.safetensors")
        needles = ("gpt2/extra.safetensors", "not listed in MANIFEST.json")
    elif stale == "sha256 edited":
        m = manifest(gdir)
        m["files"][rel]["sha256"] = "0" * 64
        write_manifest(gdir, m)
        needles = (rel, "does not match MANIFEST.json")
    elif stale == "no manifest":
        (gdir / spec.MANIFEST).unlink()
        needles = ("MANIFEST.json", "no golden manifest")
    else:
        m = manifest(gdir)
        m["files"][rel]["dtype"] = "bfloat16"
        write_manifest(gdir, m)
        needles = (rel, "tampered")
    rc, out, err = run_cli(capsys, "check", "--dir", gdir)
    assert rc == 2 and "PASS" not in out
    assert_one_error_line(err, *needles)


def test_tampered_metadata_is_an_error(gdir, capsys):
    rel = "gpt2/fast-hf-float16-cpu-native.safetensors"
    rewrite(gdir, rel, meta_fn=lambda m: m.update(device_class="cpu-emulated"))
    rc, _, err = run_cli(capsys, "check", "--dir", gdir)
    assert rc == 2
    assert_one_error_line(err, rel, "device_class", "tampered")


@pytest.mark.parametrize("tag", ["parity-golden/2", "something-else"])
def test_unknown_format_is_an_error(gdir, capsys, tag):
    rewrite(gdir, REF, meta_fn=lambda m: m.update(format=tag))
    rc, _, err = run_cli(capsys, "check", "--dir", gdir)
    assert rc == 2
    assert_one_error_line(err, REF, "format", tag)


def test_unknown_manifest_generator_is_an_error(gdir, capsys):
    m = manifest(gdir)
    m["generator"]["version"] = spec.GENERATOR_VERSION + 1
    write_manifest(gdir, m)
    rc, _, err = run_cli(capsys, "check", "--dir", gdir)
    assert rc == 2
    assert_one_error_line(err, "MANIFEST.json", "generator version")


# ------------------------------------------------------------------------------ interrupted update
def test_generator_failing_midway_leaves_the_old_goldens(gdir, monkeypatch):
    monkeypatch.setattr(ops, "MEGATRON_SQRT_2_OVER_PI", ops.SQRT_2_OVER_PI)  # something to write
    before = snapshot(gdir)
    real, calls = store.generate, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("generator died")
        return real(*a, **k)

    patch_everywhere(monkeypatch, "generate", failing)
    with pytest.raises(RuntimeError, match="generator died"):
        store.update(gdir, families=FAMILIES, reason="interrupted", log=lambda *_: None)
    assert snapshot(gdir) == before


def test_failure_while_renaming_puts_the_old_goldens_back(gdir, monkeypatch):
    monkeypatch.setattr(ops, "MEGATRON_SQRT_2_OVER_PI", ops.SQRT_2_OVER_PI)
    monkeypatch.setattr(fast.Numerics, "pow3", lambda self, x: self.r(torch.pow(x, 3.0)))
    before = snapshot(gdir)
    real, calls = store._install, []

    def failing(tmp, target):
        calls.append(target)
        if len(calls) == 3:  # two goldens already replaced, the manifest not yet
            raise OSError("disk full")
        real(tmp, target)

    patch_everywhere(monkeypatch, "_install", failing)
    with pytest.raises(OSError, match="disk full"):
        store.update(gdir, families=FAMILIES, reason="interrupted", log=lambda *_: None)
    assert len(calls) == 3 and snapshot(gdir) == before
    monkeypatch.undo()
    assert all(r.verdict == "pass" for r in gcheck.check(gdir))


# ------------------------------------------------------------------------------ device classes
@pytest.mark.cpu_kernels
def test_goldens_of_other_device_classes_are_skipped_with_the_device_they_need(gdir, monkeypatch):
    src = "gpt2/fast-hf-float16-cpu-emulated.safetensors"
    rel = "gpt2/fast-hf-float16-cuda-sm90.safetensors"
    shutil.copy(gdir / src, gdir / rel)
    m = manifest(gdir)
    m["files"][rel] = dict(m["files"][src], device_class="cuda-sm90")
    write_manifest(gdir, m)
    rewrite(gdir, rel, meta_fn=lambda md: md.update(device_class="cuda-sm90"))
    patch_everywhere(monkeypatch, "cuda_class", lambda: None)
    patch_everywhere(monkeypatch, "cpu_fingerprint", lambda: "x86_64 SOMEOTHERCPU")
    by = {r.name: r for r in gcheck.check(gdir, ["gpt2"])}
    assert by[rel].verdict == "skip" and "cuda-sm90" in by[rel].detail
    assert "compute capability 9.0" in by[rel].detail
    for path, r in by.items():
        if path.endswith("cpu-native.safetensors"):  # native CPU kernels differ by CPU kind
            assert r.verdict == "skip" and "needs a CPU like the one that made it" in r.detail
        if path.endswith("cpu-emulated.safetensors"):  # checked, to a budget for another CPU
            assert r.verdict == "pass" and "golden_cpu_emulated_other_cpu" in r.detail
    assert by["gpt2/reference-float64.safetensors"].verdict == "pass"


def test_update_refuses_a_device_class_this_machine_lacks(gdir, monkeypatch):
    patch_everywhere(monkeypatch, "cuda_class", lambda: None)
    with pytest.raises(ParityError, match="cuda-sm90.*no CUDA device"):
        store.update(gdir, classes=["cuda-sm90"], reason="x")


@pytest.mark.parametrize("lib, impl", [("torch", "fast"), ("numpy", "reference")])
def test_an_upgrade_shows_the_drift_per_site(gdir, monkeypatch, capsys, lib, impl):
    patch_everywhere(monkeypatch, f"{lib}_version", lambda: "9.9.9")
    rc, out, _ = run_cli(capsys, "check", "--dir", gdir, "--families", "gpt2")
    assert rc == 0
    n = sum(s.impl == impl for s in spec.plan(["gpt2"]))
    assert out.count(f"  {lib} 9.9.9 (golden made with {lib} ") == n
    assert out.count("max ULP@max 0 ") == n * len(spec.golden_sites("gpt2", 4)) * 2


def test_update_needs_a_reason(gdir, capsys):
    rc, _, err = run_cli(capsys, "update", "--dir", gdir)
    assert rc == 2
    assert_one_error_line(err, "--reason")


# ------------------------------------------------------------------------------ committed goldens
@pytest.mark.golden
@pytest.mark.cpu_kernels
def test_committed_goldens_reproduce(request):
    """The regression test: golden/ as committed reproduces on this machine (goldens of other
    device classes are skipped with their reason). `pytest --update-golden` regenerates them
    first, through `parity golden update`'s code path."""
    if request.config.getoption("--update-golden"):
        store.update(spec.DEFAULT_DIR, reason="pytest --update-golden")
    results = gcheck.check(spec.DEFAULT_DIR)
    failed = [r.detail for r in results if r.verdict == "fail"]
    assert not failed, "\n".join(failed)
    refs = [r for r in results if r.spec.impl == "reference"]
    assert {r.spec.family for r in refs} == set(reference.FAMILIES)
    assert all(r.verdict == "pass" for r in refs)
    assert any(r.verdict == "pass" and r.spec.device_class == "cpu-emulated" for r in results)


@pytest.mark.golden
def test_committed_goldens_cover_every_family_within_the_size_budget():
    files = manifest(spec.DEFAULT_DIR)["files"]
    cpu = {s.path for s in spec.plan(classes=["any", *spec.CPU_CLASSES])}
    assert cpu <= set(files)
    total = sum(p.stat().st_size for p in spec.DEFAULT_DIR.rglob("*") if p.is_file())
    assert total <= spec.SIZE_BUDGET_BYTES


# ------------------------------------------------------------------------------ foreign goldens
def foreign_golden(path: Path, ckpt_dir: Path, plant: float = 0.0) -> Path:
    """What another framework would write with nothing but safetensors: float32 logits (here the
    reference's, cast) and one site; `plant` adds plant * max|logits| to one logit."""
    ckpt = load_checkpoint(ckpt_dir)
    ids = np.array([[0, 17, 300, 5, 44, 2], [0, 0, 8, 9, 511, 3]], dtype=np.int64)
    mask = (np.arange(6)[None, :] >= np.array([[0], [2]])).astype(np.int64)
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    tr = reference.forward(ckpt.config, ckpt.weights(), ids, mask, pos)
    logits = tr.logits.astype(np.float32)
    logits[1, -1, 7] += np.float32(plant * np.abs(tr.logits).max())
    save_file({"input_ids": ids, "attention_mask": mask, "position_ids": pos, "logits": logits,
               "blocks.1.resid_post": tr["blocks.1.resid_post"].astype(np.float32)},
              str(path), metadata={"format": "parity-golden/1", "family": "gpt2",
                                   "producer": "another framework 1.0", "dtype": "float32"})
    return path


def test_foreign_float32_golden_passes_and_a_planted_change_fails(tiny_checkpoints, tmp_path,
                                                                  capsys):
    ck = tiny_checkpoints["gpt2"]
    good = foreign_golden(tmp_path / "good.safetensors", ck)
    rows = foreign.check_foreign_golden(good, ck)
    assert [r["site"] for r in rows] == ["blocks.1.resid_post", "logits"]
    assert all(r["status"] == "pass" and r["tolerance_name"] == "golden_float32" for r in rows)
    assert all(0 < r["rel"] <= tolerance("golden_float32") for r in rows)
    bad = foreign_golden(tmp_path / "bad.safetensors", ck, plant=1e-4)
    rows = {r["site"]: r for r in foreign.check_foreign_golden(bad, ck)}
    assert rows["blocks.1.resid_post"]["status"] == "pass"
    assert rows["logits"]["status"] == "fail"
    assert rows["logits"]["rel"] > tolerance("golden_float32")
    verdict = foreign.summarize_foreign(list(rows.values()))
    assert verdict.verdict == "fail" and verdict.detail.startswith("logits: max rel error")
    assert verdict.figures["worst_site"] == "logits" and verdict.figures["sites_failed"] == 1
    assert foreign.summarize_foreign(foreign.check_foreign_golden(good, ck)).verdict == "pass"
    assert run_cli(capsys, "check", "--file", good, "--checkpoint", ck)[0] == 0
    rc, out, _ = run_cli(capsys, "check", "--file", bad, "--checkpoint", ck)
    assert rc == 1 and "FAIL" in out and "logits" in out


def test_our_goldens_pass_as_foreign_goldens_cache_step_included(gdir, tiny_checkpoints):
    ck = tiny_checkpoints["gpt2"]
    for rel, dtype in [("gpt2/reference-float64.safetensors", "float64"),
                       ("gpt2/fast-meg-bfloat16-cpu-emulated.safetensors", "bfloat16")]:
        rows = foreign.check_foreign_golden(gdir / rel, ck)
        assert {r["step"] for r in rows} == {1, 2}
        assert all(r["status"] == "pass" and r["tolerance_name"] == f"golden_{dtype}"
                   for r in rows), [r for r in rows if r["status"] != "pass"]


def test_foreign_golden_of_another_family_is_an_error(tiny_checkpoints, tmp_path):
    p = foreign_golden(tmp_path / "g.safetensors", tiny_checkpoints["gpt2"])
    with pytest.raises(ParityError, match="family 'gpt2'.*'gptj'"):
        foreign.check_foreign_golden(p, tiny_checkpoints["gptj"])


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_golden_tolerance_follows_the_dtype(dtype):
    assert foreign.golden_tolerance(dtype) == (f"golden_{dtype}", tolerance(f"golden_{dtype}"))


def test_golden_tolerance_of_an_unknown_dtype_is_an_error():
    with pytest.raises(ParityError, match="int8"):
        foreign.golden_tolerance("int8")

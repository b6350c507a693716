"""The committed golden store: generation, manifest and update (`parity golden update`).

Goldens catch what a parity run alone cannot: a change of numerics over time (a torch or CUDA
upgrade, a refactor of the reference, a converted checkpoint that no longer matches what its
training framework produced). What this module keeps in `golden/`:

- one `parity-golden/1` file per (family, implementation, dtype, device class):
  `<family>/reference-float64.safetensors` (the float64 reference, checked on any machine) and
  `<family>/fast-<preset>-<dtype>-<device class>.safetensors` (the fast path, checked bitwise on
  the device class that made it). Device classes: `cpu-emulated` (CUDA's half semantics emulated
  in fp32), `cpu-native` (torch's own CPU half kernels), `cuda-sm<XY>` (a CUDA GPU of compute
  capability X.Y, made by the same command on such a machine).
- fixed inputs: the seeded tiny checkpoint of each family (regenerated from its recipe, never
  committed), a batch of two rows of 8 tokens, the second left-padded by 3 with explicit
  position ids, then a cache step: 3 more tokens per row with past = the first call's cache.
  The second step lives in the same file under the `step2/` prefix (`step2/input_ids`,
  `step2/attention_mask` over past + new tokens, `step2/position_ids`, `step2/<site>`).
- a subset of sites, each stored in the dtype that produced it (see `golden_sites`).
- CPU goldens record the CPU they were made on (`cpu_fingerprint`: architecture, torch's kernel
  level, half-precision instruction flags). `cpu-native` goldens are checked only on a CPU with
  the same fingerprint (torch's native half kernels differ by instruction set) and skipped with
  that reason elsewhere; `cpu-emulated` goldens are checked everywhere: bitwise on the same
  fingerprint, within `golden_cpu_emulated_other_cpu` (a few eps of the dtype) on another.
- generation and check run torch on one thread (a reduction may split differently otherwise).
- `MANIFEST.json`: sha256, size, generator version, environment, checkpoint recipe, inputs and
  identity of every file; written last by `update`.

`check` regenerates every golden in memory from the inputs stored in the file and compares;
integrity problems (corrupted, tampered, unlisted, missing or unknown-format files) are errors
(exit 2), a divergence beyond tolerance is a failure (exit 1), never a silent pass.
`check_foreign_golden` checks any parity-golden/1 file (e.g. one written by hand from another
framework) against the float64 reference on a checkpoint, with a tolerance that follows from the
file's `dtype` (`golden_tolerance`).
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import platform
import tempfile
from pathlib import Path

import numpy as np


from parity.errors import ParityError
from parity.files import temp_beside
from parity.goldens.io import FORMAT, INPUT_KEYS, read_golden
from parity.goldens.spec import (CPU_CLASSES, DEFAULT_DIR, DRIFT_LIB, GENERATOR,
                                 GENERATOR_VERSION, LIB_VERSION, MANIFEST, MANIFEST_FORMAT,
                                 RECIPE, SIZE_BUDGET_BYTES, STEP1, STEP2, STEP2_PREFIX, Spec,
                                 cpu_fingerprint, cpu_name, device_args, golden_sites,
                                 local_classes, plan, torch_version, unavailable)


# ----------------------------------------------------------------------------- checkpoints
class Checkpoints(contextlib.AbstractContextManager):
    """The tiny checkpoints of the recipes, written once per run into a temporary folder."""

    def __init__(self):
        self._tmp = tempfile.TemporaryDirectory(prefix="parity-golden-")
        self._made: dict[tuple, tuple] = {}

    def get(self, family: str, preset: str, seed: int):
        """(Checkpoint, sha256 of its weights file)."""
        from parity.checkpoints.checkpoint import load_checkpoint
        from parity.checkpoints.recipes import make_checkpoint

        key = (family, preset, seed)
        if key not in self._made:
            d = make_checkpoint(family, Path(self._tmp.name) / f"{family}-{preset}-{seed}",
                                preset=preset, seed=seed)
            sha = hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
            self._made[key] = (load_checkpoint(d), sha)
        return self._made[key]

    def __exit__(self, *exc):
        self._tmp.cleanup()


# ----------------------------------------------------------------------------- generation
def recipe_inputs(cfg):
    """Step 1: `default_batch` (two rows, the second left-padded, explicit positions);
    step 2: STEP2 new tokens per row, mask over past + new, positions continuing each row."""
    from parity.checkpoints.inputs import Inputs, default_batch

    s1 = default_batch(cfg, **STEP1)
    rng = np.random.default_rng([STEP2["seed"], STEP2["tokens"], cfg.vocab_size])
    b, n = s1.input_ids.shape[0], STEP2["tokens"]
    ids = rng.integers(0, cfg.vocab_size, size=(b, n), dtype=np.int64)
    mask = np.concatenate([s1.attention_mask, np.ones((b, n), np.int64)], axis=1)
    pos = s1.position_ids[:, -1:] + 1 + np.arange(n)[None, :]
    return s1, Inputs(ids, mask, pos)


def inputs_description(cfg) -> dict:
    s1, s2 = recipe_inputs(cfg)
    return {
        "step1": {"recipe": "parity.checkpoints.inputs.default_batch", **STEP1,
                  "shape": list(s1.input_ids.shape),
                  "note": "row 1 left-padded (mask 0, id 0), explicit position ids"},
        "step2": {"prefix": STEP2_PREFIX, **STEP2, "shape": list(s2.input_ids.shape),
                  "note": "past = step 1's cache; attention_mask covers past + new tokens"},
    }


@contextlib.contextmanager
def one_thread():
    """One torch thread: CPU kernels may split a reduction differently with more threads."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def run_step(spec: Spec, ckpt, inputs, sites, past=None):
    from parity import subjects

    if spec.impl == "reference":
        return subjects.run("reference", ckpt, inputs, dtype=spec.dtype, sites=sites, past=past)
    device, emulate = device_args(spec.device_class)
    return subjects.run("fast", ckpt, inputs, variant=spec.variant, dtype=spec.dtype,
                        device=device, emulate=emulate, sites=sites, past=past)


def generate(spec: Spec, ckpt, step1, step2, sites) -> tuple[dict, dict]:
    """Run step 1 and (unless `step2` is None) the cache step; the tensors of the golden file
    (inputs as int64, sites in the dtype that produced them) and the trace's meta."""
    with one_thread():
        steps = [("", step1, run_step(spec, ckpt, step1, sites))]
        if step2 is not None:
            steps.append((STEP2_PREFIX, step2,
                          run_step(spec, ckpt, step2, sites, past=steps[0][2].cache)))
    tensors = {}
    for prefix, inp, tr in steps:
        tensors.update(_input_tensors(inp, prefix))
        tensors.update(_site_tensors(tr, prefix, spec.path))
    return tensors, dict(steps[0][2].meta)


def _input_tensors(inp, prefix: str) -> dict:
    import torch

    out = {}
    for k in INPUT_KEYS:
        a = getattr(inp, k)
        if a is not None:
            out[prefix + k] = torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
    return out


def _site_tensors(trace, prefix: str, where: str) -> dict:
    """Each site in the dtype that produced it (a float64 carrier of half values is exact)."""
    import torch

    from parity.subjects.fast import TORCH_DTYPES

    out = {}
    default = trace.meta.get("dtype", "float64")
    for name, a in trace.sites.items():
        dt = TORCH_DTYPES[trace.dtypes.get(name, default)]
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).to(dt)
        back = t.to(torch.float64).numpy()
        if not np.array_equal(back, a, equal_nan=True):
            raise RuntimeError(f"{where}: site {name} does not hold {dt} values")
        out[prefix + name] = t.contiguous()
    return out


def file_metadata(spec: Spec, meta: dict, cfg, recipe: dict) -> dict[str, str]:
    md = {
        "format": FORMAT, "family": spec.family, "dtype": spec.dtype,
        "producer": meta.get("producer", f"gpt-parity {spec.impl}"),
        "device": meta.get("device", "cpu"), "device_class": spec.device_class,
        "impl": spec.impl, "config_sha256": cfg.sha256(), "recipe": json.dumps(recipe),
        "generator": f"{GENERATOR} {GENERATOR_VERSION}", "steps": "2",
        "step2_prefix": STEP2_PREFIX,
    }
    # the library whose upgrade may move the numbers (and nothing else, so that an upgrade of
    # the other leaves the file's bytes alone)
    md[DRIFT_LIB[spec.impl]] = LIB_VERSION[DRIFT_LIB[spec.impl]]()
    if spec.impl == "fast":
        md.update(variant=spec.variant, knobs=meta.get("knobs", ""),
                  emulate=meta.get("emulate", ""), jit_fused=meta.get("jit_fused", ""))
    if spec.device_class in CPU_CLASSES:
        md["cpu"] = cpu_fingerprint()
    return md


def serialize(tensors: dict, metadata: dict[str, str]) -> bytes:
    """safetensors bytes with the header's keys sorted, so the same content always gives the
    same bytes (safetensors itself writes its metadata in hash order)."""
    from safetensors.torch import save

    b = save(tensors, metadata=metadata)
    n = int.from_bytes(b[:8], "little")
    header = json.dumps(json.loads(b[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    assert len(header) <= n
    return b[:8] + header + b" " * (n - len(header)) + b[8 + n:]


def environment(spec: Spec) -> dict:
    import torch

    env = {"torch": torch.__version__, "numpy": np.__version__,
           "python": platform.python_version(), "platform": platform.platform()}
    if spec.device_class.startswith("cuda"):
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = f"cpu ({cpu_name()})"
        env["cpu"] = cpu_fingerprint()
    return env


def build(spec: Spec, ckpts: Checkpoints, reason: str, now: str) -> tuple[bytes, dict]:
    """One golden file from its recipe: (bytes, manifest entry)."""
    recipe = {"family": spec.family, **RECIPE}
    ckpt, wsha = ckpts.get(spec.family, RECIPE["preset"], RECIPE["seed"])
    cfg = ckpt.config
    step1, step2 = recipe_inputs(cfg)
    sites = golden_sites(spec.family, cfg.n_layer)
    tensors, meta = generate(spec, ckpt, step1, step2, sites)
    data = serialize(tensors, file_metadata(spec, meta, cfg, recipe))
    entry = {
        "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), **spec.fields(),
        "checkpoint": {**recipe, "config_sha256": cfg.sha256(), "weights_sha256": wsha},
        "inputs": inputs_description(cfg), "sites": sites,
        "generator_version": GENERATOR_VERSION, "environment": environment(spec),
        "created": now, "reason": reason,
    }
    return data, entry


# ----------------------------------------------------------------------------- manifest
def read_manifest(golden_dir: Path, missing_ok: bool = False) -> dict:
    p = golden_dir / MANIFEST
    if not p.is_file():
        if missing_ok:
            return {"format": MANIFEST_FORMAT, "files": {}, "history": []}
        raise ParityError(f"{p}: no golden manifest (make the goldens with `parity golden update`)")
    try:
        m = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ParityError(f"{p}: not a readable JSON manifest ({e})") from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        fmt = m.get("format") if isinstance(m, dict) else None
        raise ParityError(f"{p}: format is {fmt!r}, expected {MANIFEST_FORMAT!r}")
    gen = m.get("generator")
    v = gen.get("version") if isinstance(gen, dict) else None
    if not isinstance(v, int) or v > GENERATOR_VERSION:
        raise ParityError(f"{p}: made by generator version {v!r}; this gpt-parity knows "
                          f"versions up to {GENERATOR_VERSION}")
    if not isinstance(m.get("files"), dict):
        raise ParityError(f"{p}: has no 'files' table")
    return m


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def verify_integrity(golden_dir: Path, manifest: dict) -> None:
    """Every file listed, present, with its sha256, readable as parity-golden/1 and saying what
    the manifest says it is; nothing unlisted. The first problem is a ParityError (exit 2)."""
    listed = manifest["files"]
    on_disk = {p.relative_to(golden_dir).as_posix() for p in golden_dir.rglob("*.safetensors")}
    extra, missing = sorted(on_disk - set(listed)), sorted(set(listed) - on_disk)
    if extra:
        raise ParityError(f"{golden_dir / extra[0]}: not listed in {MANIFEST} (stale manifest: a "
                          "file added by hand, or an update that did not finish); rerun "
                          "`parity golden update` or remove the file")
    if missing:
        raise ParityError(f"{golden_dir / missing[0]}: listed in {MANIFEST} but missing (stale "
                          "manifest)")
    for rel in sorted(listed):
        e = listed[rel]
        spec = Spec.from_entry(rel, e)
        p = golden_dir / rel
        got = _sha(p)
        if got != e.get("sha256"):
            raise ParityError(f"{p}: sha256 {got[:16]}... does not match {MANIFEST} "
                              f"({str(e.get('sha256'))[:16]}...): the file is corrupted or was "
                              "edited by hand; goldens are only written by `parity golden update`")
        g = read_golden(p)
        for k, want in (("family", spec.family), ("dtype", spec.dtype), ("impl", spec.impl),
                        ("device_class", spec.device_class), ("variant", spec.variant)):
            if want is not None and g.meta.get(k) != want:
                raise ParityError(f"{p}: metadata {k}={g.meta.get(k)!r} but {MANIFEST} says "
                                  f"{want!r} (tampered golden)")
        gen = g.meta.get("generator", "")
        if not gen.startswith(GENERATOR + " ") or not gen.split()[-1].isdigit() or \
                int(gen.split()[-1]) > GENERATOR_VERSION:
            raise ParityError(f"{p}: generator {gen!r} is not one this gpt-parity can regenerate "
                              f"({GENERATOR} up to {GENERATOR_VERSION})")


# ----------------------------------------------------------------------------- update
def update(golden_dir: Path | str = DEFAULT_DIR, families=None, classes=None,
           reason: str = "", log=print) -> list[str]:
    """Regenerate the goldens of `families` x `classes` (default: all, on every class this
    machine has). All files are made in memory first, then written to temporary files, then
    renamed into place, the manifest last; a failure at any point leaves the old goldens and
    manifest as they were. Files whose bytes do not change are not touched. Returns the paths
    (relative to the golden folder) that changed."""
    golden_dir = Path(golden_dir)
    here = local_classes()
    bad = [c for c in (classes or []) if c not in here]
    if bad:
        from reference.families import FAMILIES

        s = Spec(family=FAMILIES[0], impl="fast", dtype="float16", variant="hf",
                 device_class=bad[0])  # any family: the class decides
        raise ParityError(f"cannot generate device class {bad[0]!r} here: "
                          f"{unavailable(s, None) or 'not a device class of this machine'}")
    specs = plan(families, classes)
    old = read_manifest(golden_dir, missing_ok=True)
    now = _now()
    made: dict[str, tuple[bytes, dict]] = {}
    with Checkpoints() as ckpts:
        for spec in specs:  # phase 1: everything in memory
            made[spec.path] = build(spec, ckpts, reason, now)
    # changed: new bytes, or a file on disk that is missing or not what its entry says
    changed = [p for p, (_, e) in made.items()
               if (old["files"].get(p) or {}).get("sha256") != e["sha256"]
               or not (golden_dir / p).is_file() or _sha(golden_dir / p) != e["sha256"]]
    if not changed:
        log(f"golden update: {len(made)} files regenerated, none changed")
        return []
    files = dict(old["files"])
    files.update({p: made[p][1] for p in changed})
    manifest = {
        "format": MANIFEST_FORMAT,
        "generator": {"name": GENERATOR, "version": GENERATOR_VERSION},
        "note": "generated by `parity golden update`; never edit by hand",
        "files": dict(sorted(files.items())),
        "history": [*old.get("history", []),
                    {"date": now, "reason": reason, "torch": torch_version(),
                     "changed": sorted(changed)}],
    }
    changes = {p: change_of(golden_dir / p, made[p][0]) for p in sorted(changed)}
    manifest["history"][-1]["changes"] = {p: c["text"] for p, c in changes.items()}
    blobs = {p: made[p][0] for p in changed}
    blobs[MANIFEST] = (json.dumps(manifest, indent=1, sort_keys=False) + "\n").encode()
    total = sum(e["bytes"] for e in files.values()) + len(blobs[MANIFEST])
    if total > SIZE_BUDGET_BYTES:
        raise ParityError(f"{golden_dir}: goldens would take {total} bytes, over the "
                          f"{SIZE_BUDGET_BYTES}-byte budget")
    _write_all(golden_dir, blobs)
    for p, c in changes.items():
        log(f"  {p}: {c['text']}")
    worst = max(changes.values(), key=lambda c: c["rel"])
    log(f"golden update: {len(changed)} of {len(made)} files changed (largest change: "
        f"{worst['text']}), total {total} bytes in {golden_dir}")
    return sorted(changed)


def change_of(old_path: Path, new: bytes) -> dict:
    """How a regenerated golden differs from the file it replaces: the largest change over its
    tensors (max |new - old| / max |old| per site, and in ULPs of the site's largest value),
    naming the site; or that it is new, or that only the metadata or the set of sites
    changed. -> {"rel": float, "text": str}."""
    from safetensors.torch import load

    from parity.goldens.diff import diff_arrays
    from parity.goldens.io import dtype_of

    if not old_path.is_file():
        return {"rel": math.inf, "text": "new file"}
    try:
        old_t = load(old_path.read_bytes())
    except Exception as e:  # noqa: BLE001 - an unreadable old file is replaced, and said so
        return {"rel": math.inf, "text": f"replaces an unreadable file ({type(e).__name__})"}
    new_t = load(new)
    if set(old_t) != set(new_t):
        gone, came = sorted(set(old_t) - set(new_t)), sorted(set(new_t) - set(old_t))
        return {"rel": math.inf, "text": "sites changed" + (f"; removed {', '.join(gone[:3])}"
                                                           if gone else "")
                + (f"; added {', '.join(came[:3])}" if came else "")}
    worst = None
    for k in sorted(new_t):
        a, b = old_t[k], new_t[k]
        if dtype_of(a) != dtype_of(b):
            return {"rel": math.inf, "text": f"{k}: dtype {dtype_of(a)} -> {dtype_of(b)}"}
        if not a.is_floating_point():
            if not (a.shape == b.shape and bool((a == b).all())):
                return {"rel": math.inf, "text": f"{k}: stored inputs changed"}
            continue
        d = diff_arrays(k, a.double().numpy(), b.double().numpy(), dtype_of(a))
        if d.changed and (worst is None or d.rel > worst.rel):
            worst = d
    if worst is None:
        return {"rel": 0.0, "text": "values identical; metadata changed"}
    return {"rel": worst.rel, "text": f"max rel change {worst.rel:.3g} at {worst.site} "
            f"({worst.max_ulp:.3g} ULP of its largest {worst.dtype} value, {worst.changed} of "
            f"{worst.total} values)"}


def _install(tmp: str, target: Path) -> None:
    """Move a finished temporary file into place (one rename; a seam for failure tests)."""
    os.replace(tmp, target)


def _write_all(golden_dir: Path, blobs: dict[str, bytes]) -> None:
    """Phase 2: temporary files next to their targets; phase 3: rename them in order (the
    manifest is last). Any failure removes the temporaries and puts back what was replaced."""
    temps: dict[str, str] = {}
    order = [p for p in blobs if p != MANIFEST] + [MANIFEST]
    try:
        for rel in order:
            target = golden_dir / rel
            tmp = temps[rel] = temp_beside(target)
            with open(tmp, "wb") as f:
                f.write(blobs[rel])
                f.flush()
                os.fsync(f.fileno())
        done: list[tuple[Path, str | None]] = []
        try:
            for rel in order:
                target = golden_dir / rel
                backup = None
                if target.exists():
                    backup = temps[rel] + ".old"
                    os.replace(target, backup)
                done.append((target, backup))
                _install(temps[rel], target)
                del temps[rel]
        except BaseException:
            for target, backup in reversed(done):
                if backup is not None:
                    os.replace(backup, target)
                elif target.exists():
                    target.unlink()
            raise
        for _, backup in done:
            if backup is not None:
                os.unlink(backup)
    finally:
        for tmp in temps.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)



def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

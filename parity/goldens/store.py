"""Golden activation files: generation, manifest, check and update (`parity golden ...`).

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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from reference.dtypes import DTYPES

from parity.engine import budgets
from parity.engine.verdicts import Result
from parity.errors import ParityError
from parity.files import temp_beside
from parity.goldens.io import FORMAT, GOLDEN_DTYPES, INPUT_KEYS, read_golden

GENERATOR = "gpt-parity goldens"
GENERATOR_VERSION = 1
MANIFEST = "MANIFEST.json"
MANIFEST_FORMAT = "parity-golden-manifest/1"
DEFAULT_DIR = Path(__file__).resolve().parents[2] / "golden"
SIZE_BUDGET_BYTES = 5_000_000  # golden/ at most 5 MB in all: light to clone

FAST_PRESETS = ("hf", "meg")
HALF_DTYPES = ("float16", "bfloat16")
CPU_CLASSES = ("cpu-emulated", "cpu-native")
RECIPE = {"preset": "tiny", "seed": 0}
STEP1 = {"length": 8, "seed": 0, "pad": 3}  # parity.checkpoints.inputs.default_batch arguments
STEP2 = {"tokens": 3, "seed": 1}
STEP2_PREFIX = "step2/"
DETAIL_LAYER = 1  # the layer whose attention scores are kept (GPT-Neo: a local layer)
HALF_CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16",
                  "amx_fp16")


# ----------------------------------------------------------------------------- what a golden is
@dataclass(frozen=True, kw_only=True)
class Spec:
    """The identity of one golden file."""

    family: str
    impl: str  # reference | fast
    dtype: str
    variant: str | None = None  # fast-path preset
    device_class: str = "any"

    @property
    def path(self) -> str:
        if self.impl == "reference":
            return f"{self.family}/reference-{self.dtype}.safetensors"
        return f"{self.family}/fast-{self.variant}-{self.dtype}-{self.device_class}.safetensors"

    def fields(self) -> dict:
        return {"family": self.family, "impl": self.impl, "variant": self.variant,
                "dtype": self.dtype, "device_class": self.device_class}

    @classmethod
    def from_entry(cls, path: str, e: dict) -> "Spec":
        try:
            s = cls(family=e["family"], impl=e["impl"], dtype=e["dtype"],
                    variant=e.get("variant"), device_class=e["device_class"])
        except (KeyError, TypeError):
            raise ParityError(f"{MANIFEST}: entry {path!r} lacks family/impl/dtype/device_class")
        if s.path != path:
            raise ParityError(f"{MANIFEST}: entry {path!r} describes {s.path!r} "
                              "(tampered manifest)")
        return s


def plan(families=None, classes=None) -> list[Spec]:
    """Every golden of the given families and device classes (default: all families and every
    class this machine can produce)."""
    import reference

    families = list(families or reference.FAMILIES)
    unknown = [f for f in families if f not in reference.FAMILIES]
    if unknown:
        raise ParityError(f"unknown family {unknown[0]!r} (choose from "
                          f"{', '.join(reference.FAMILIES)})")
    classes = list(classes or local_classes())
    specs = []
    for fam in families:
        if "any" in classes:
            specs.append(Spec(family=fam, impl="reference", dtype="float64"))
        for cls in classes:
            if cls != "any":
                specs += [Spec(family=fam, impl="fast", dtype=dt, variant=p, device_class=cls)
                          for p in FAST_PRESETS for dt in HALF_DTYPES]
    return specs


def golden_sites(family: str, n_layer: int) -> list[str]:
    """The sites kept: the embedding, every block's output, the attention scores of one layer,
    the final LayerNorm and the logits: enough to say in which block a change enters, within the
    size budget (a layer's mlp.fc_in/act alone would cost as much as four block outputs)."""
    from reference.families import family as family_facts

    fam = family_facts(family)
    out = fam.block_output
    d = min(DETAIL_LAYER, n_layer - 1)
    names = ["embed"]
    for i in range(n_layer):
        if i == d:
            names.append(f"blocks.{i}.attn.scores")
        names.append(f"blocks.{i}.{out}")
    return names + (["ln_f"] if fam.ln_f else []) + ["logits"]


# ----------------------------------------------------------------------------- device classes
def cuda_class() -> str | None:
    """`cuda-sm90` on an H100, None without a CUDA device."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"cuda-sm{major}{minor}"


def local_classes() -> list[str]:
    cls = ["any", *CPU_CLASSES]
    c = cuda_class()
    return cls + ([c] if c else [])


def cpu_fingerprint() -> str:
    """What decides the bits of torch's CPU kernels: the architecture, the kernel level torch
    dispatches (DEFAULT / AVX2 / AVX512 ...) and the half-precision instructions present."""
    import torch

    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    have = [f for f in HALF_CPU_FLAGS if f in flags]
    return " ".join([platform.machine(), torch.backends.cpu.get_cpu_capability(), *have])


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_args(device_class: str) -> tuple[str, bool | None]:
    """(device, emulate) of the fast path for a device class."""
    if device_class == "cpu-emulated":
        return "cpu", True
    if device_class == "cpu-native":
        return "cpu", False
    if device_class.startswith("cuda-sm"):
        return "cuda", False
    raise ParityError(f"unknown device class {device_class!r}")


def unavailable(spec: Spec, golden_cpu: str | None) -> str | None:
    """Why this machine cannot check a golden (None when it can)."""
    c = spec.device_class
    if c in ("any", "cpu-emulated"):
        return None
    if c == "cpu-native":
        here = cpu_fingerprint()
        if golden_cpu and golden_cpu != here:
            return (f"needs a CPU like the one that made it ({golden_cpu}): torch's native half "
                    f"kernels differ by instruction set; this CPU is {here}")
        return None
    if c.startswith("cuda-sm"):
        here = cuda_class()
        if here != c:
            cc = c.removeprefix("cuda-sm")
            need = f"a CUDA GPU of compute capability {cc[:-1]}.{cc[-1]} ({c})"
            return f"needs {need}; this machine has {here or 'no CUDA device'}"
        return None
    return f"unknown device class {c!r}"


def torch_version() -> str:
    import torch

    return torch.__version__


def numpy_version() -> str:
    return np.__version__


DRIFT_LIB = {"reference": "numpy", "fast": "torch"}  # what computes each implementation
LIB_VERSION = {"numpy": lambda: numpy_version(), "torch": lambda: torch_version()}


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
    blobs = {p: made[p][0] for p in changed}
    blobs[MANIFEST] = (json.dumps(manifest, indent=1, sort_keys=False) + "\n").encode()
    total = sum(e["bytes"] for e in files.values()) + len(blobs[MANIFEST])
    if total > SIZE_BUDGET_BYTES:
        raise ParityError(f"{golden_dir}: goldens would take {total} bytes, over the "
                          f"{SIZE_BUDGET_BYTES}-byte budget")
    _write_all(golden_dir, blobs)
    log(f"golden update: {len(changed)} of {len(made)} files changed, total {total} bytes "
        f"in {golden_dir}")
    return sorted(changed)


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


# ----------------------------------------------------------------------------- comparison
@dataclass
class SiteDiff:
    """How one stored tensor compares with its regeneration (or with the reference)."""

    site: str
    dtype: str
    shape: tuple
    max_abs: float = 0.0
    rel: float = 0.0  # max |new - old| / max |old|
    max_ulp: float = 0.0  # in units of `dtype`
    changed: int = 0
    total: int = 0
    note: str = ""

    def describe(self) -> str:
        s = (f"max rel change {self.rel:.3g} (max abs {self.max_abs:.3g}, {self.max_ulp:g} ULP "
             f"of {self.dtype}, {self.changed} of {self.total} values changed)")
        return f"{s}; {self.note}" if self.note else s


def diff_arrays(site: str, old: np.ndarray, new: np.ndarray, dtype: str) -> SiteDiff:
    """Compare every element: finite values by size, non-finite ones (masked scores) by
    position and sign."""
    from parity.engine.metrics import ulp_distance

    d = SiteDiff(site, dtype, tuple(old.shape), total=int(old.size))
    if old.shape != new.shape:
        d.rel = d.max_abs = d.max_ulp = math.inf
        d.changed = int(old.size)
        d.note = f"shape changed from {list(old.shape)} to {list(new.shape)}"
        return d
    same = (old == new) | (np.isnan(old) & np.isnan(new))
    d.changed = int((~same).sum())
    fin_o, fin_n = np.isfinite(old), np.isfinite(new)
    if ((fin_o != fin_n) | (~fin_o & ~same)).any():
        d.rel = d.max_abs = d.max_ulp = math.inf
        d.note = "non-finite values appeared, vanished or moved"
        return d
    if not fin_o.any():
        return d
    o, n = old[fin_o], new[fin_o]
    d.max_abs = float(np.abs(n - o).max())
    scale = float(np.abs(o).max())
    d.rel = 0.0 if d.max_abs == 0 else (d.max_abs / scale if scale > 0 else math.inf)
    d.max_ulp = float(ulp_distance(n, o, dtype).max())
    return d


def dtype_of(t) -> str:
    return str(t.dtype).removeprefix("torch.")


@dataclass(kw_only=True)
class FileResult(Result):
    """A committed golden file's check: `name` is its path in the golden folder, `verdict`
    pass | fail | skip, `detail` the line `parity golden check` prints."""

    spec: Spec | None = None
    sites: list[SiteDiff] = field(default_factory=list)
    drift: str = ""  # the library that computes it differs from the golden's: say which


EPS = {name: d.eps for name, d in DTYPES.items() if name != "float64"}


@dataclass(frozen=True)
class Limit:
    """What a regenerated golden is held to: `rel` (max |new - old| / max |old| per site) or
    `ulp` (max ULP moved, in the stored dtype)."""

    name: str  # the budgets.toml tolerance
    unit: str  # rel | ulp
    value: float
    note: str = ""

    def exceeded(self, d: SiteDiff) -> bool:
        return (d.rel if self.unit == "rel" else d.max_ulp) > self.value

    def __str__(self) -> str:
        return (f"{self.value:g} {'relative' if self.unit == 'rel' else 'ULP'} ({self.name}"
                f"{', ' + self.note if self.note else ''})")


def limit_for(spec: Spec, golden_cpu: str | None) -> Limit:
    if spec.impl == "reference":
        return Limit("golden_float64", "rel", budgets.tolerance("golden_float64"))
    here = cpu_fingerprint()
    if spec.device_class == "cpu-emulated" and golden_cpu and golden_cpu != here:
        name = "golden_cpu_emulated_other_cpu"
        k = budgets.tolerance(name)
        return Limit(name, "rel", k * EPS[spec.dtype],
                     f"{k:g} eps of {spec.dtype}: made on {golden_cpu}, this CPU is {here}")
    return Limit("golden_fast_ulp", "ulp", budgets.tolerance("golden_fast_ulp"))


def check_file(golden_dir: Path, rel: str, entry: dict, ckpts: Checkpoints) -> FileResult:
    """Regenerate one golden in memory from the inputs stored in it and compare."""
    import torch
    from safetensors import safe_open

    from parity.checkpoints.inputs import Inputs

    spec = Spec.from_entry(rel, entry)
    path = golden_dir / rel
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        stored = {k: f.get_tensor(k) for k in f.keys()}
    why = unavailable(spec, meta.get("cpu"))
    if why:
        return FileResult(name=rel, verdict="skip", detail=f"SKIP {rel}: {why}", spec=spec)
    try:
        recipe = json.loads(meta.get("recipe") or "{}")
        ckpt, wsha = ckpts.get(recipe["family"], recipe["preset"], int(recipe["seed"]))
    except (KeyError, TypeError, ValueError):
        raise ParityError(f"{path}: no usable checkpoint recipe in its metadata") from None
    notes = []
    if wsha != entry.get("checkpoint", {}).get("weights_sha256"):
        notes.append("the checkpoint recipe now makes other weights than when this golden was "
                     "made (parity/checkpoints/recipes.py changed?)")

    def inputs(prefix):
        get = lambda k: stored[prefix + k].to(torch.int64).numpy() if prefix + k in stored else None
        return Inputs(get("input_ids"), get("attention_mask"), get("position_ids"))

    keys = [k for k in stored if k.split("/")[-1] not in INPUT_KEYS]
    sites = sorted({k.removeprefix(STEP2_PREFIX) for k in keys})
    try:
        step2 = inputs(STEP2_PREFIX) if STEP2_PREFIX + "input_ids" in stored else None
        new, new_meta = generate(spec, ckpt, inputs(""), step2, sites)
    except ParityError as e:
        raise ParityError(f"{path}: cannot regenerate ({e})") from None
    if spec.impl == "fast" and new_meta.get("jit_fused", "") != meta.get("jit_fused", ""):
        notes.append(f"jit fusion was {meta.get('jit_fused')!r}, now {new_meta.get('jit_fused')!r}")
    from parity.goldens.io import site_order

    order = site_order(spec.family, [k for k in keys if not k.startswith(STEP2_PREFIX)])
    order += [STEP2_PREFIX + k for k in site_order(
        spec.family, [k.removeprefix(STEP2_PREFIX) for k in keys if k.startswith(STEP2_PREFIX)])]
    diffs = []
    for k in order:
        old = stored[k]
        if k not in new:
            d = SiteDiff(k, dtype_of(old), tuple(old.shape), rel=math.inf, max_ulp=math.inf,
                         note="no longer produced")
        else:
            d = diff_arrays(k, old.to(torch.float64).numpy(), new[k].to(torch.float64).numpy(),
                            dtype_of(old))
            if dtype_of(new[k]) != dtype_of(old):
                d.rel = d.max_ulp = math.inf
                d.note = f"stored as {dtype_of(old)}, now produced as {dtype_of(new[k])}"
        diffs.append(d)
    bound = limit_for(spec, meta.get("cpu"))
    bad = [d for d in diffs if bound.exceeded(d)]
    lib = DRIFT_LIB[spec.impl]
    was, now = meta.get(lib, ""), LIB_VERSION[lib]()
    drift = f"{lib} {now} (golden made with {lib} {was or '?'})" if was != now else ""
    res = FileResult(name=rel, verdict="pass", spec=spec, sites=diffs, drift=drift)
    if bad:
        first = bad[0]
        more = f"; {len(bad) - 1} more site(s) diverge: " + ", ".join(
            d.site for d in bad[1:6]) + (" ..." if len(bad) > 6 else "") if len(bad) > 1 else ""
        res.verdict = "fail"
        res.detail = (f"FAIL {rel}: site {first.site} {first.describe()} > {bound}{more}"
                       + "".join(f"; {n}" for n in notes))
    else:
        worst = max((d.rel for d in diffs), default=0.0)
        what = "bitwise" if all(d.changed == 0 for d in diffs) else f"max rel change {worst:.3g}"
        res.detail = (f"PASS {rel}: {len(diffs)} sites, {what} (limit {bound})"
                       + "".join(f"; note: {n}" for n in notes))
    return res


def check(golden_dir: Path | str = DEFAULT_DIR, families=None) -> list[FileResult]:
    """Integrity of the whole folder first (errors raise), then every golden of `families`
    regenerated and compared; goldens of device classes this machine lacks are skipped."""
    import reference

    golden_dir = Path(golden_dir)
    if not golden_dir.is_dir():
        raise ParityError(f"{golden_dir}: no golden folder")
    manifest = read_manifest(golden_dir)
    verify_integrity(golden_dir, manifest)
    if families:
        unknown = [f for f in families if f not in reference.FAMILIES]
        if unknown:
            raise ParityError(f"unknown family {unknown[0]!r} (choose from "
                              f"{', '.join(reference.FAMILIES)})")
    entries = {p: e for p, e in manifest["files"].items()
               if not families or e.get("family") in families}
    if not entries:
        raise ParityError(f"{golden_dir / MANIFEST}: no goldens"
                          + (f" for {', '.join(families)}" if families else ""))
    with Checkpoints() as ckpts:
        return [check_file(golden_dir, p, e, ckpts) for p, e in sorted(entries.items())]


# ----------------------------------------------------------------------------- foreign goldens
def golden_tolerance(dtype: str) -> tuple[str, float]:
    """(name, value) of the relative tolerance a golden computed in `dtype` is held to against
    the float64 reference: max |golden - reference| / max |reference| per site, over the values
    that count (real tokens, visible keys). Values are in budgets.toml (`golden_<dtype>`)."""
    if dtype not in GOLDEN_DTYPES:
        raise ParityError(f"no golden tolerance for dtype {dtype!r} "
                          f"(one of {', '.join(GOLDEN_DTYPES)})")
    name = f"golden_{dtype}"
    return name, budgets.tolerance(name)


def check_foreign_golden(golden_path, ckpt) -> list[dict]:
    """Compare any parity-golden/1 file with the float64 reference on a checkpoint (a
    Checkpoint or its directory). One row per stored site (and per `step2/` site when the file
    has a cache step): file, step, site, dtype, shape, max_abs, rel, rel_l2, max_ulp,
    tolerance_name, tolerance, status (pass | fail | skip), reason. Unusable files, a family
    mismatch or inputs the checkpoint cannot take raise ParityError."""
    import torch
    from safetensors import safe_open

    import reference

    from parity.checkpoints.checkpoint import Checkpoint, load_checkpoint
    from parity.engine.compare import token_rows
    from parity.checkpoints.inputs import Inputs, validate_inputs
    from parity.engine.metrics import rel_l2, ulp_distance, valid_mask

    path = Path(golden_path)
    g = read_golden(path)  # format checks
    with safe_open(str(path), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    if not isinstance(ckpt, Checkpoint):
        ckpt = load_checkpoint(ckpt)
    cfg = ckpt.config
    fam = g.meta.get("family")
    if fam and fam != cfg.family:
        raise ParityError(f"{path}: a golden of family {fam!r}, the checkpoint {ckpt.path} is "
                          f"{cfg.family!r}")
    tol_name, tol = golden_tolerance(g.dtype)
    weights = ckpt.weights()

    def inputs(prefix):
        get = lambda k: stored[prefix + k].to(torch.int64).numpy() if prefix + k in stored else None
        return Inputs(get("input_ids"), get("attention_mask"), get("position_ids"))

    steps = [("", inputs(""))]
    if STEP2_PREFIX + "input_ids" in stored:
        steps.append((STEP2_PREFIX, inputs(STEP2_PREFIX)))
    rows, past = [], None
    for n, (prefix, inp) in enumerate(steps, start=1):
        plen = 0 if past is None else past[0][0].shape[2]
        validate_inputs(Inputs(inp.input_ids, None if inp.attention_mask is None else
                               inp.attention_mask[:, plen:], inp.position_ids), cfg,
                        f"{path} ({prefix or 'step 1 '}inputs)", past_len=plen)
        try:
            ref = reference.forward(cfg, weights, inp.input_ids, inp.attention_mask,
                                    inp.position_ids, past=past)
        except ValueError as e:
            raise ParityError(f"{path}: inputs of step {n} do not fit the model ({e})") from None
        past = ref.cache
        trows = token_rows(inp)
        names = [k.removeprefix(prefix) for k in stored
                 if k.startswith(prefix) and k.removeprefix(prefix) not in INPUT_KEYS
                 and (prefix or not k.startswith(STEP2_PREFIX))]
        for site in reference.site_names(cfg.family, cfg.n_layer) + sorted(
                set(names) - set(ref.sites)):
            if site not in names:
                continue
            t = stored[prefix + site]
            row = {"file": str(path), "step": n, "site": prefix + site, "dtype": dtype_of(t),
                   "shape": list(t.shape), "max_abs": math.nan, "rel": math.nan,
                   "rel_l2": math.nan, "max_ulp": math.nan, "tolerance_name": tol_name,
                   "tolerance": tol, "status": "pass", "reason": ""}
            rows.append(row)
            if site not in ref.sites:
                row.update(status="skip", reason=f"not a site of {cfg.family}")
                continue
            r = ref.sites[site]
            if not t.is_floating_point() or tuple(t.shape) != r.shape:
                row.update(status="fail", reason=f"expected float {list(r.shape)}",
                           misfit=f"float {list(r.shape)}")
                continue
            y = t.to(torch.float64).numpy()
            valid = valid_mask(site, r, trows)
            yv, rv = y[valid], r[valid]
            bad = int((~np.isfinite(yv)).sum())
            fin = np.isfinite(yv)
            dmax = float(np.abs(yv[fin] - rv[fin]).max()) if fin.any() else 0.0
            scale = float(np.abs(rv).max()) if rv.size else 0.0
            rel = 0.0 if dmax == 0 else (dmax / scale if scale > 0 else math.inf)
            ulp_dt = row["dtype"] if row["dtype"] in GOLDEN_DTYPES else g.dtype
            row.update(max_abs=dmax, rel=math.inf if bad else rel,
                       rel_l2=rel_l2(yv, rv) if not bad else math.inf,
                       max_ulp=float(ulp_distance(yv, rv, ulp_dt).max()) if yv.size else 0.0)
            if bad:
                row.update(status="fail", reason=f"{bad} non-finite values where the reference "
                                                 "is finite")
            elif row["rel"] > tol:
                row.update(status="fail", reason=f"max rel error {row['rel']:.3g} > {tol:g} "
                                                 f"({tol_name})")
    return rows


def summarize_foreign(rows: list[dict], name: str = "golden") -> Result:
    """One verdict for a foreign golden (what `parity gate --golden` reports): `fail` if any
    site fails (or none could be compared), else `pass`; `detail` names the worst site and its
    error; `figures` holds the numbers."""
    compared = [r for r in rows if r["status"] != "skip"]
    failed = [r for r in compared if r["status"] == "fail"]
    if not compared:
        return Result(name=name, verdict="fail", detail="no site of the golden could be compared",
                      figures={"sites": 0, "sites_skipped": len(rows)})
    worst = max(compared, key=lambda r: (r["rel"] if not math.isnan(r["rel"]) else math.inf))
    tol = f"{compared[0]['tolerance_name']} = {compared[0]['tolerance']:g}"
    logits = [r["rel"] for r in compared if r["site"] == "logits"]
    figures = {"sites": len(compared), "sites_failed": len(failed), "worst_rel": worst["rel"],
               "worst_site": worst["site"], "logits_rel": logits[0] if logits else math.nan,
               "tolerance_name": compared[0]["tolerance_name"],
               "tolerance": compared[0]["tolerance"], "sites_skipped": len(rows) - len(compared)}
    if failed:
        f = failed[0]
        more = f" (and {len(failed) - 1} more sites)" if len(failed) > 1 else ""
        detail = f"{f['site']}: {f['reason']}{more}"
    else:
        detail = (f"{len(compared)} sites within {tol} of the float64 reference; worst "
                  f"{worst['site']} max rel {worst['rel']:.3g}")
    return Result(name=name, verdict="fail" if failed else "pass", detail=detail, figures=figures)


# ----------------------------------------------------------------------------- command line
def cmd_golden(a) -> int:
    """0 pass / done, 1 a golden diverges, ParityError (exit 2) for anything unusable."""
    d = Path(a.dir) if getattr(a, "dir", None) else DEFAULT_DIR
    if a.golden_command == "update":
        if not a.reason:
            raise ParityError("parity golden update: give a --reason (kept in MANIFEST.json)")
        update(d, a.families, a.classes, a.reason)
        return 0
    if a.golden_command != "check":
        raise ParityError("parity golden: expected 'check' or 'update'")
    if a.file:
        if not a.checkpoint:
            raise ParityError("parity golden check --file: give --checkpoint DIR")
        return _print_foreign([r for f in a.file for r in check_foreign_golden(f, a.checkpoint)])
    results = check(d, a.families)
    for r in results:
        print(r.detail)
        if r.verdict != "skip" and (r.drift or a.show_drift):
            if r.drift:
                print(f"  {r.drift}: drift per site")
            for s in r.sites:
                print(f"  {s.site:32s} {s.dtype:9s} max ULP {s.max_ulp:<6g} max rel "
                      f"{s.rel:<10.3g} changed {s.changed}/{s.total}")
    n = {k: sum(r.verdict == k for r in results) for k in ("pass", "fail", "skip")}
    print(f"golden check: {len(results)} goldens in {d}: {n['pass']} pass, {n['fail']} fail, "
          f"{n['skip']} skipped (this machine: {', '.join(local_classes())})")
    return 1 if n["fail"] else 0


def _print_foreign(rows: list[dict]) -> int:
    for r in rows:
        print(f"{r['status'].upper():4s} {r['file']} {r['site']:32s} {r['dtype']:9s} "
              f"max rel {r['rel']:<10.3g} max abs {r['max_abs']:<10.3g} max ULP "
              f"{r['max_ulp']:<8g} {r['reason']}")
    fails = sum(r["status"] == "fail" for r in rows)
    print(f"golden check: {len(rows)} sites, {fails} fail (tolerance from the golden's dtype: "
          f"{rows[0]['tolerance_name']} = {rows[0]['tolerance']:g})" if rows else
          "golden check: no sites")
    return 1 if fails else 0


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


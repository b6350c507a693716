"""Worst-case search (`parity search`): let Hypothesis hunt for the inputs where a preset diverges
most from the float64 reference.

One example = a checkpoint recipe (family, preset, layers, a weight seed), optional power-of-two
scales of three weight groups (embeddings, q/k projections, MLP input: they push the stream, the
scores and the pre-activations toward the dtype's limits; a power of two is exact in any float
dtype, so scaling adds no rounding of its own) and a token batch (left padding, explicit
position ids, edge token ids). Each example runs `parity.engine.compare.compare` for the one subject and
reports two figures, both handed to `hypothesis.target()` so that its optimiser climbs them:

  floor_ratio   the worst rel_l2 / rel_l2(rounding floor) over the sites before the first one
                the dtype cannot hold (`overflow`: from there on the values inherit the
                overflow and say nothing about the subject), in either mode; inf = the subject
                is non-finite where the reference fits. Only sites whose floor is a measurement
                count (`measured`: the floor's rel_l2 at least FLOOR_MIN_U x the unit roundoff of
                the site's dtype); a site with a floor ~0 (a saturated softmax: probabilities 0
                and 1, held exactly) is "not measured" and reported apart (`unmeasured_*`: how
                many, the worst subject rel_l2 there); no measured site at all gives NaN, shown
                as "not measured (floor ~0)" and handed to target() as 0;
  -headroom     headroom = dtype max / max |reference| at the tightest site: small = close to
                overflow.

Sharding (`--shard i/n`, 1-based): shard i draws weight seeds s with s % n == i - 1 only, and
its Hypothesis runs are seeded from (family, variant, dtype, preset, i, n), so n machines or CI
jobs split one search without overlap and every shard is reproducible. Within a shard the
examples run as fixed chunks of CHUNK examples (each chunk its own derandomized seed) on a
process pool (`--jobs`, default every core): the results do not depend on the number of jobs.

Outputs (`--out DIR`, default reports/search/<family>-<variant>-<dtype>[-shard-i-of-n]):
  search.md      the report section: the worst cases, how to replay each
  search.csv     one row per example (recipe, scales, batch shape, figures, first divergent site)
  case-NN/       one reproducer per worst case (`choose`: the worst by floor ratio, the worst of
                 each failing verdict, the least headroom): recipe.json (strict JSON: recipe,
                 scales, seed, the figures with inf as "inf" and not measured as null, noted in
                 figures_notes; the commands), inputs.safetensors (for `parity trace --inputs`), and checkpoint/
                 (the scaled checkpoint, written when a scale is applied; an unscaled one is
                 remade by the `parity checkpoint make` command in recipe.json)

The strategies come from the project's one strategies module, tests/strategies.py (found beside
the package in a source checkout); the search needs the `test` extra (hypothesis).
"""
from __future__ import annotations

import importlib
import json
import math
import os
import sys
import tempfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import reference

from parity.errors import ParityError
from parity.engine.metrics import UNIT_ROUNDOFF

CHUNK = 50  # examples per Hypothesis run (one pool task)
TARGET_CAP = 1e6  # hypothesis.target() needs finite observations: inf is reported as this
# unit roundoff (half an ulp at 1) of a site's dtype, and the least floor, in units of it, that
# makes a floor ratio a measurement (`measured`)
FLOOR_MIN_U = 1e-2
NOT_MEASURED = "not measured (floor ~0)"
SCALE_GROUPS = ("embed", "qk", "mlp")


# ----------------------------------------------------------------------------- test modules
def tests_module(name: str):
    """tests/<name>.py of the source checkout this package lives in (the project's one
    strategies module, the mutant catalogue). Needs a source checkout, not a wheel."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "tests" / f"{name}.py").is_file():
        raise ParityError(f"{root / 'tests' / (name + '.py')}: not found (this command needs a "
                          "source checkout of gpt-parity with its tests/ folder)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        mod = importlib.import_module(f"tests.{name}")
    except ImportError as e:
        raise ParityError(f"cannot import tests/{name}.py ({e}); install the test extra: "
                          "pip install -e '.[test]'") from None
    if Path(mod.__file__).resolve() != root / "tests" / f"{name}.py":
        raise ParityError(f"tests.{name} resolves to {mod.__file__}, not this checkout's")
    return mod


# ----------------------------------------------------------------------------- scaled weights
def scale_tensor(family: str, name: str, t, scales: dict, d_model: int):
    """`t` (as stored) with its part of the scaled groups multiplied: `embed` the token and
    position embeddings, `qk` the query and key projections (weights and biases: scores grow by
    the square), `mlp` the first MLP projection (weight and bias)."""
    if not scales:
        return t
    fam = reference.family(family)
    leaf = name.split(".", 2)[-1] if name.startswith("h.") else name
    f_embed, f_qk, f_mlp = (float(scales.get(g, 1)) for g in SCALE_GROUPS)
    if name in fam.embeddings:
        return t * f_embed if f_embed != 1 else t
    if fam.fused_qkv:
        if f_qk != 1 and leaf in (fam.qkv[0] + ".weight", fam.qkv[0] + ".bias"):
            t = t.clone()
            t[..., :2 * d_model] *= f_qk  # Conv1D [d, 3d] columns / bias [3d]: q then k then v
            return t
    elif leaf in (fam.qkv[0] + ".weight", fam.qkv[1] + ".weight"):
        return t * f_qk if f_qk != 1 else t
    if leaf in (fam.fc_in + ".weight", fam.fc_in + ".bias"):
        return t * f_mlp if f_mlp != 1 else t
    return t


def is_scaled(scales: dict | None) -> bool:
    return bool(scales) and any(float(v) != 1 for v in scales.values())


def scaled_checkpoint(base, scales: dict | None):
    """`base` (a parity.checkpoints.checkpoint.Checkpoint) with `scales` applied, held in memory."""
    if not is_scaled(scales):
        return base
    from parity.checkpoints.checkpoint import Checkpoint

    class ScaledCheckpoint(Checkpoint):
        def tensor(self, name):
            cfg = self.config
            key = name
            fam = reference.family(cfg.family)
            if name == fam.lm_head + ".weight" and name not in self.entries \
                    and cfg.tie_word_embeddings:
                key = fam.tok + ".weight"  # a tied head is the (scaled) token embedding
            return scale_tensor(cfg.family, key, base.tensor(name), scales, cfg.d_model)

        def rows(self, name, index):
            return self.tensor(name)[np.asarray(index)]

    return ScaledCheckpoint(path=base.path, config=base.config, entries=dict(base.entries),
                            ignored=list(base.ignored), fmt=base.fmt)


def write_checkpoint(ckpt, out: Path, recipe: dict) -> Path:
    """Write `ckpt` (e.g. a scaled one) as an HF-layout directory: config.json (the base's, with
    the recipe and scales recorded) and model.safetensors (keys as the base stores them)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {e.key: ckpt.tensor(name).contiguous() for name, e in ckpt.entries.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    raw = dict(ckpt.config.raw, gpt_parity_recipe=recipe)
    (out / "config.json").write_text(json.dumps(json_safe(raw), indent=2, sort_keys=True,
                                                allow_nan=False) + "\n")
    return out


_BASES: dict = {}  # (family, preset, layers, seed) -> loaded checkpoint, most recent last
_KEEP = 8  # recipe checkpoints kept per process (a search draws a new seed almost every example)
_ROOT: list[Path] = []


def base_checkpoint(family: str, preset: str, layers: int | None, seed: int):
    """The recipe's checkpoint, made in a temporary folder of this process (removed at exit;
    the oldest of more than _KEEP are removed as new ones are made)."""
    import atexit
    import shutil

    from parity.checkpoints.checkpoint import load_checkpoint
    from parity.checkpoints.recipes import make_checkpoint

    key = (family, preset, layers, seed)
    if key in _BASES:
        _BASES[key] = _BASES.pop(key)  # most recently used
        return _BASES[key]
    if not _ROOT:
        _ROOT.append(Path(tempfile.mkdtemp(prefix="parity-search-")))
        atexit.register(shutil.rmtree, _ROOT[0], True)
    path = _ROOT[0] / f"{family}-{preset}-{layers}-{seed}"
    _BASES[key] = load_checkpoint(make_checkpoint(family, path, preset=preset, layers=layers,
                                                  seed=seed))
    while len(_BASES) > _KEEP:
        old = next(iter(_BASES))
        _BASES.pop(old)._handles.clear()
        shutil.rmtree(_ROOT[0] / "{}-{}-{}-{}".format(*old), ignore_errors=True)
    return _BASES[key]


def make_command(family: str, preset: str, layers: int | None, seed: int, out: str) -> str:
    lay = f" --layers {layers}" if layers else ""
    return (f"parity checkpoint make --family {family} --preset {preset}{lay} --seed {seed} "
            f"--out {out}")


# ----------------------------------------------------------------------------- one example
def measured(df) -> "np.ndarray":
    """Rows whose floor ratio is a measurement: the rounding floor's rel_l2 is at least
    FLOOR_MIN_U x the unit roundoff of the site's dtype, or the subject is non-finite where the
    reference is finite (floor ratio inf: the worst, whatever the floor).

    Rounding a site of generic values to a dtype costs a relative error of about u/3 to u
    (measured on 10,200 sites of `parity search`, gptj stress bf16: 98% of floors between 0.18u
    and 3u; wide fp32 sites more). A floor far below that means the dtype holds (nearly) every
    value of the site exactly, e.g. a saturated softmax whose probabilities are 0 and 1: the
    ratio then divides by the rounding of a handful of tiny elements and reads 1e10 .. 1e89 or
    inf for a subject error under a few u (those floors sat at 1e-4u and below, never between
    1e-4u and 1e-2u with a ratio over 8). Such a ratio is "not measured (floor ~0)": it is left
    out of the worst floor ratio and of the search's target; the subject's own rel_l2 there is
    reported beside it (`unmeasured_*`)."""
    u = df["site_dtype"].map(UNIT_ROUNDOFF).astype(float).fillna(0.0).to_numpy()
    floor = df["floor_rel_l2"].astype(float).to_numpy()
    fr = df["floor_ratio"].astype(float).to_numpy()
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(floor) & (floor >= FLOOR_MIN_U * u) & (floor > 0) & ~np.isnan(fr)
    return ok | (df["nonfinite"].astype(float).fillna(0.0).to_numpy() > 0)


def figures(df) -> dict:
    """The search's figures of one comparison frame (one subject, both modes). `floor_ratio`
    is NaN (not measured) when no held site has a measurable floor (`measured`)."""
    from parity.engine.compare import first_divergent, overall

    # parity is measured up to the first site the dtype cannot hold, in each mode: what follows
    # an overflow inherits it (inf, nan) and says nothing more about the subject
    parts = []
    for _, g in df.groupby("mode", sort=False):
        over = np.flatnonzero((g["verdict"] == "overflow").to_numpy())
        parts.append(g.iloc[:over[0]] if len(over) else g)
    held = df.loc[[i for p in parts for i in p.index]]
    ok = measured(held)
    fr = held["floor_ratio"].astype(float)[ok]
    fr = fr.where(held["nonfinite"].astype(float)[ok].fillna(0.0) == 0, math.inf)
    i = fr.idxmax() if len(fr) else None
    rest = held[~ok]  # floor ~0: the subject's error there, relative to the reference
    rl = rest["rel_l2"].astype(float).fillna(0.0)
    k = rl.idxmax() if len(rl) else None
    hr = df["headroom"].astype(float)
    j = hr.idxmin() if len(hr) else None
    first = first_divergent(df, "local")
    first_acc = first_divergent(df, "accumulated")
    return {
        "floor_ratio": float(fr[i]) if i is not None else math.nan,
        "floor_ratio_site": df.at[i, "site"] if i is not None else "",
        "floor_ratio_mode": df.at[i, "mode"] if i is not None else "",
        "unmeasured_sites": int(len(rest)),
        "unmeasured_site": f"{df.at[k, 'site']} ({df.at[k, 'mode']})" if k is not None else "",
        "unmeasured_rel_l2": float(rl[k]) if k is not None else 0.0,
        "headroom": float(hr[j]) if j is not None else math.inf,
        "headroom_site": df.at[j, "site"] if j is not None else "",
        "verdict": overall(df),
        "first_local": "" if first.empty else f"{first['site'].iloc[0]} "
                                               f"({first['verdict'].iloc[0]})",
        "first_accumulated": "" if first_acc.empty else f"{first_acc['site'].iloc[0]} "
                                                        f"({first_acc['verdict'].iloc[0]})",
        "overflow_sites": int((df["verdict"] == "overflow").sum()),
    }


def evaluate(ckpt, inputs, variant: str, dtype: str, device: str = "cpu") -> dict:
    from parity.engine.compare import Subject, compare

    df = compare(ckpt, inputs, [Subject(variant=variant, dtype=dtype, device=device)],
                 label="search")
    return figures(df)


# ----------------------------------------------------------------------------- the search
@dataclass(frozen=True)
class Task:
    """One Hypothesis run: CHUNK examples of one shard."""

    family: str
    variant: str
    dtype: str
    preset: str
    layers: int | None
    shard: int  # 1-based
    shards: int
    chunk: int
    examples: int
    max_log2_scale: int
    max_len: int
    device: str = "cpu"

    @property
    def hypothesis_seed(self) -> int:
        key = (f"{self.family}/{self.variant}/{self.dtype}/{self.preset}/{self.layers}/"
               f"{self.shard}/{self.shards}/{self.chunk}")
        return zlib.crc32(key.encode())


def run_task(task: Task) -> list[dict]:
    """Run one chunk; one record per example (figures, recipe, inputs as lists)."""
    import torch
    from hypothesis import HealthCheck, Phase, given, seed, settings, target
    from hypothesis import strategies as st

    from parity.checkpoints.inputs import Inputs

    torch.set_num_threads(1)
    S = tests_module("strategies")
    records: list[dict] = []
    seen: set = set()  # the target phase may replay an example: keep each once

    @settings(max_examples=task.examples, database=None, deadline=None, derandomize=False,
              phases=(Phase.generate, Phase.target), print_blob=False,
              suppress_health_check=list(HealthCheck))
    @seed(task.hypothesis_seed)
    @given(data=st.data())
    def explore(data):
        wseed = data.draw(S.recipe_seeds(task.shard - 1, task.shards), label="weight seed")
        scales = data.draw(S.scales(task.max_log2_scale), label="scales")
        base = base_checkpoint(task.family, task.preset, task.layers, wseed)
        ckpt = scaled_checkpoint(base, scales)
        # verdict-grade batches (>= 4 real tokens a row): a floor ratio over a few elements is
        # noise, and a search would otherwise "find" those flukes
        batch = data.draw(S.verdict_batches(ckpt.config, max_len=task.max_len), label="batch")
        inputs = Inputs(*batch)
        fig = evaluate(ckpt, inputs, task.variant, task.dtype, task.device)
        # a floor ratio that is not measured (NaN: every floor ~0) gives no evidence: 0
        fr = fig["floor_ratio"]
        target(0.0 if math.isnan(fr) else min(fr, TARGET_CAP), label="floor_ratio")
        target(-min(fig["headroom"], TARGET_CAP), label="-headroom")
        key = (wseed, tuple(sorted(scales.items())), *(None if a is None else a.tobytes() + bytes(
            str(a.shape), "ascii") for a in batch))
        if key in seen:
            return
        seen.add(key)
        records.append(dict(
            chunk=task.chunk, example=len(records), seed=wseed, scales=dict(scales),
            batch=list(batch.input_ids.shape),
            input_ids=batch.input_ids.tolist(),
            attention_mask=None if batch.attention_mask is None else batch.attention_mask.tolist(),
            position_ids=None if batch.position_ids is None else batch.position_ids.tolist(),
            **fig))

    explore()
    return records


def tasks(family, variant, dtype, preset="tiny", layers=None, max_examples=100, shard=1,
          shards=1, max_log2_scale=8, max_len=32, device="cpu", chunk=CHUNK) -> list[Task]:
    n_chunks = max(1, math.ceil(max_examples / chunk))
    out = []
    for c in range(n_chunks):
        k = min(chunk, max_examples - c * chunk)
        out.append(Task(family, variant, dtype, preset, layers, shard, shards, c, k,
                        max_log2_scale, max_len, device))
    return out


def run_search(task_list: list[Task], jobs: int = 1) -> list[dict]:
    """Every task, on a process pool of `jobs` workers (inline for one job); records in task
    order, whatever the pool did."""
    if jobs <= 1 or len(task_list) == 1:
        results = [run_task(t) for t in task_list]
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=min(jobs, len(task_list)),
                                 mp_context=mp.get_context("spawn")) as pool:
            results = list(pool.map(run_task, task_list))
    return [r for rs in results for r in rs]


def rank(records: list[dict]) -> list[dict]:
    """Worst first: floor ratio (inf first, not measured last), then least headroom; ties in
    example order (deterministic)."""
    return sorted(records, key=lambda r: (-_key(r["floor_ratio"]), r["headroom"], r["chunk"],
                                          r["example"]))


def _key(x: float) -> float:
    """A sortable floor ratio: inf above every finite one, NaN (not measured) below all."""
    if math.isnan(x):
        return -1.0
    return 1e300 if math.isinf(x) else x


def failing(records: list[dict]) -> list[dict]:
    """The examples whose overall verdict fails (fail, overflow, or any other failing verdict
    parity.engine.compare knows), worst first."""
    from parity.engine.verdicts import FAILING

    return [r for r in rank(records) if r["verdict"] in FAILING]


# ----------------------------------------------------------------------------- outputs
@dataclass
class Search:
    family: str
    variant: str
    dtype: str
    preset: str
    layers: int | None
    shard: int
    shards: int
    max_examples: int
    max_log2_scale: int
    max_len: int
    records: list = field(default_factory=list)

    def label(self) -> str:
        s = f"{self.family}-{self.variant}-{self.dtype}"
        return s if self.shards == 1 else f"{s}-shard-{self.shard}-of-{self.shards}"


def write_case(out: Path, rec: dict, s: Search, n: int, why: str = "worst") -> dict:
    """One reproducer folder; returns what the report says about it. recipe.json is strict
    JSON: a non-finite figure is written as a string ("inf", "-inf") or, for a floor ratio
    that is not measured, null, with a note in `figures_notes` (`json_safe`)."""
    from safetensors.numpy import save_file

    case = out / f"case-{n:02d}"
    case.mkdir(parents=True, exist_ok=True)
    arrays = {"input_ids": np.asarray(rec["input_ids"], np.int64)}
    for k in ("attention_mask", "position_ids"):
        if rec[k] is not None:
            arrays[k] = np.asarray(rec[k], np.int64)
    save_file(arrays, str(case / "inputs.safetensors"))
    recipe = {"family": s.family, "preset": s.preset, "layers": s.layers, "seed": rec["seed"],
              "scales": rec["scales"]}
    scaled = is_scaled(rec["scales"])
    ckpt_dir = case / "checkpoint"
    make = make_command(s.family, s.preset, s.layers, rec["seed"], str(ckpt_dir))
    if scaled:
        base = base_checkpoint(s.family, s.preset, s.layers, rec["seed"])
        write_checkpoint(scaled_checkpoint(base, rec["scales"]), ckpt_dir, recipe)
    inputs = case / "inputs.safetensors"
    replay = (f"parity trace {ckpt_dir} --impl fast --variant {s.variant} --dtype {s.dtype} "
              f"--inputs {inputs} --out {case / 'fast.safetensors'}")
    reference_cmd = (f"parity trace {ckpt_dir} --impl reference --inputs {inputs} "
                     f"--out {case / 'reference.safetensors'}")
    info = {
        "format": "parity-search-case/1",
        "subject": {"impl": "fast", "variant": s.variant, "dtype": s.dtype},
        "recipe": recipe,
        "checkpoint": str(ckpt_dir),
        "checkpoint_written": scaled,
        "checkpoint_make": make,
        "scaling": ("the tensors of `checkpoint_make`, multiplied per group by `recipe.scales` "
                    "(parity.commands.search.scale_tensor: embed = token/position embeddings, qk = query "
                    "and key projections, mlp = first MLP projection); written to `checkpoint`"
                    if scaled else "none"),
        "inputs": str(inputs),
        "replay": ([] if scaled else [make]) + [replay, reference_cmd],
        "search": {"shard": f"{s.shard}/{s.shards}", "chunk": rec["chunk"],
                   "example": rec["example"],
                   "hypothesis_seed": Task(s.family, s.variant, s.dtype, s.preset, s.layers,
                                           s.shard, s.shards, rec["chunk"], 0, 0, 0)
                   .hypothesis_seed},
        "chosen_as": why,
        "figures": {k: rec.get(k) for k in FIGURES},
    }
    notes = {}
    safe = json_safe(info, notes)
    if notes:
        safe["figures_notes"] = notes
    (case / "recipe.json").write_text(json.dumps(safe, indent=2, allow_nan=False) + "\n")
    return {"case": case.name, **info}


FIGURES = ("floor_ratio", "floor_ratio_site", "floor_ratio_mode", "unmeasured_sites",
           "unmeasured_site", "unmeasured_rel_l2", "headroom", "headroom_site", "verdict",
           "first_local", "first_accumulated", "overflow_sites")


def json_safe(x, notes: dict | None = None, path: str = ""):
    """`x` with every non-finite float replaced, so that json.dumps(allow_nan=False) takes it:
    inf / -inf as the strings "inf" / "-inf", NaN as null; `notes` (path -> what it means)
    records each. NaN here is always a figure that was not measured (a floor ratio whose floors
    are all ~0)."""
    if isinstance(x, dict):
        return {k: json_safe(v, notes, f"{path}.{k}" if path else str(k)) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v, notes, f"{path}[{i}]") for i, v in enumerate(x)]
    if isinstance(x, (float, np.floating)):
        x = float(x)
        if math.isnan(x):
            if notes is not None:
                notes[path] = (f"null: {NOT_MEASURED}" if path.endswith("floor_ratio")
                               else "null: not a number")
            return None
        if math.isinf(x):
            if notes is not None:
                notes[path] = ('"inf": the subject is non-finite where the reference is finite'
                               if path.endswith("floor_ratio") else
                               '"inf": the reference is 0 at every site (no limit near)'
                               if path.endswith("headroom") else
                               f'"{"inf" if x > 0 else "-inf"}": not finite')
            return "inf" if x > 0 else "-inf"
        return x
    if isinstance(x, np.integer):
        return int(x)
    return x


def choose(records: list[dict], top: int = 3) -> list[tuple[dict, str]]:
    """The examples written as reproducers, each with why: the worst `top` by floor ratio (one
    per checkpoint), then, unless already among them, the worst example of each failing verdict
    (so the worst failing example is always written) and the least-headroom one."""
    chosen: list[tuple[dict, str]] = []
    figs = set()
    for r in rank(records):  # one reproducer per checkpoint: the target phase climbs by
        # editing the batch, which leaves a trail of near-copies of the worst case
        fig = (r["seed"], tuple(sorted(r["scales"].items())))
        if fig not in figs and len(chosen) < top:
            figs.add(fig)
            chosen.append((r, "worst floor ratio" if not chosen else "next worst floor ratio "
                           "(another checkpoint)"))
    seen = set()
    for r in failing(records):  # worst first: the first of each verdict is its worst
        if r["verdict"] not in seen:
            seen.add(r["verdict"])
            if all(r is not c for c, _ in chosen):
                chosen.append((r, f"worst example with verdict {r['verdict']}"))
    tight = min(records, key=lambda r: (r["headroom"], r["chunk"], r["example"]), default=None)
    if tight is not None and all(tight is not c for c, _ in chosen):
        chosen.append((tight, "least headroom"))
    return chosen


def write_outputs(out: Path, s: Search, top: int = 3) -> dict:
    """search.csv, the reproducers of `choose` (the worst `top` cases, the worst failing one,
    the least-headroom one), search.md."""
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    cols = ["chunk", "example", "seed", "scales", "batch", "floor_ratio", "floor_ratio_note",
            "floor_ratio_site", "floor_ratio_mode", "unmeasured_sites", "unmeasured_site",
            "unmeasured_rel_l2", "headroom", "headroom_site", "verdict", "first_local",
            "first_accumulated", "overflow_sites"]

    def cell(r, c):
        if c in ("scales", "batch"):
            return json.dumps(r[c], sort_keys=True)
        if c == "floor_ratio_note":
            return NOT_MEASURED if math.isnan(r["floor_ratio"]) else ""
        return r.get(c)

    df = pd.DataFrame([{c: cell(r, c) for c in cols} for r in s.records], columns=cols)
    df.to_csv(out / "search.csv", index=False)
    cases = [write_case(out, r, s, n + 1, why) for n, (r, why) in
             enumerate(choose(s.records, top))]
    (out / "search.md").write_text(report_section(s, cases))
    return {"cases": cases, "csv": out / "search.csv", "md": out / "search.md"}


def _fmt(x) -> str:
    if isinstance(x, str):
        return x
    if x is None or math.isnan(x):
        return NOT_MEASURED
    if math.isinf(x):
        return "inf"
    return f"{x:.3g}"


def _floor0(f: dict) -> str:
    n = f.get("unmeasured_sites") or 0
    if not n:
        return "-"
    return f"{n} (worst rel_l2 {f['unmeasured_rel_l2']:.3g} at {f['unmeasured_site']})"


def worst_measured(records: list[dict]) -> dict | None:
    """The record with the worst measured floor ratio (None: none measured)."""
    r = rank(records)
    return r[0] if r and not math.isnan(r[0]["floor_ratio"]) else None


def report_section(s: Search, cases: list[dict]) -> str:
    n = len(s.records)
    verdicts = {}
    for r in s.records:
        verdicts[r["verdict"]] = verdicts.get(r["verdict"], 0) + 1
    lines = [
        f"## Worst-case search: {s.family} `{s.variant}` {s.dtype}",
        "",
        f"{n} examples (shard {s.shard}/{s.shards}, preset `{s.preset}`"
        f"{f', {s.layers} layers' if s.layers else ''}, weight scales up to 2^{s.max_log2_scale}"
        f" per group, up to {s.max_len} tokens); Hypothesis targeted the worst floor ratio and "
        "the least headroom. Verdicts: "
        + ", ".join(f"{k} {v}" for k, v in sorted(verdicts.items())) + ".",
        "",
        f"A floor ratio is a measurement where the rounding floor's rel_l2 is at least "
        f"{FLOOR_MIN_U:g} x the unit roundoff of the site's dtype; below that (e.g. a saturated "
        f"softmax, whose probabilities the dtype holds exactly) it is \"{NOT_MEASURED}\": left "
        "out of the worst floor ratio and of the search's target, and counted under `floor ~0 "
        "sites` with the subject's rel_l2 there. inf = the subject is non-finite where the "
        "reference is finite.",
        "",
        "| case | chosen as | floor ratio | at (mode) | floor ~0 sites | headroom | at | verdict "
        "| first divergent (local) | seed | scales | batch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        f, r = c["figures"], c["recipe"]
        sc = ", ".join(f"{k} x{v:g}" for k, v in r["scales"].items() if float(v) != 1) or "none"
        shape = "x".join(str(v) for v in _shape(c))
        at = f"{f['floor_ratio_site']} ({f['floor_ratio_mode']})" if f["floor_ratio_site"] else "-"
        lines.append(f"| {c['case']} | {c['chosen_as']} | {_fmt(f['floor_ratio'])} | {at} "
                     f"| {_floor0(f)} | {_fmt(f['headroom'])} | {f['headroom_site']} "
                     f"| {f['verdict']} | {f['first_local'] or '-'} | {r['seed']} | {sc} "
                     f"| {shape} |")
    lines += ["", "Replay a case (its folder holds recipe.json and inputs.safetensors):", ""]
    for c in cases:
        lines.append(f"- {c['case']}:")
        lines += [f"  `{cmd}`" for cmd in c["replay"]]
    return "\n".join(lines) + "\n"


def _shape(case: dict) -> list[int]:
    from safetensors.numpy import load_file

    return list(load_file(case["inputs"])["input_ids"].shape)


# ----------------------------------------------------------------------------- CLI
def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ParityError(f"--shard: expected i/n (e.g. 2/4), got {text!r}") from None
    if n < 1 or not 1 <= i <= n:
        raise ParityError(f"--shard: i/n needs 1 <= i <= n, got {text!r}")
    return i, n


def cmd_search(a) -> int:
    """0: done (the search reports; it does not judge). 2: bad arguments."""

    from parity.subjects.fast import dtype_name
    from parity.subjects.knobs import parse_variant
    from parity.checkpoints.recipes import PRESETS

    if a.family not in reference.FAMILIES:
        raise ParityError(f"unknown family {a.family!r} (choose from "
                          f"{', '.join(reference.FAMILIES)})")
    if a.preset not in PRESETS or a.preset == "full-width":
        raise ParityError(f"--preset: tiny or stress, got {a.preset!r}")
    dtype = dtype_name(a.dtype)
    if dtype == "float64":
        raise ParityError("--dtype float64 has no rounding floor to search against")
    parse_variant(a.variant, a.family)  # a bad variant fails here, before any work
    for name in ("max_examples", "top", "max_len"):
        if getattr(a, name) < 1:
            raise ParityError(f"--{name.replace('_', '-')} must be at least 1")
    if a.max_log2_scale < 0:
        raise ParityError("--max-log2-scale must not be negative")
    if a.layers is not None and a.layers < 1:
        raise ParityError("--layers must be at least 1")
    shard, shards = parse_shard(a.shard)
    jobs = a.jobs or os.cpu_count() or 1
    if jobs < 1:
        raise ParityError("--jobs must be at least 1")
    try:
        import hypothesis  # noqa: F401
    except ImportError:
        raise ParityError("parity search needs hypothesis: pip install -e '.[test]'") from None
    tests_module("strategies")
    s = Search(a.family, a.variant, dtype, a.preset, a.layers, shard, shards, a.max_examples,
               a.max_log2_scale, a.max_len)
    out = Path(a.out) if a.out else Path("reports") / "search" / s.label()
    s.records = run_search(tasks(a.family, a.variant, dtype, a.preset, a.layers,
                                 a.max_examples, shard, shards, a.max_log2_scale, a.max_len),
                           jobs)
    res = write_outputs(out, s, a.top)
    print(summary(s, res, out, jobs))
    return 0


def summary(s: Search, res: dict, out: Path, jobs: int) -> str:
    """The one line `parity search` prints: only measured figures, the failing examples and
    where their reproducers are."""
    worst = worst_measured(s.records)
    fr = (f"{_fmt(worst['floor_ratio'])} at {worst['floor_ratio_site']}" if worst
          else NOT_MEASURED)
    n0 = sum(1 for r in s.records if r.get("unmeasured_sites"))
    bad = failing(s.records)
    case_of = {(c["search"]["chunk"], c["search"]["example"]): c["case"] for c in res["cases"]}
    fails = (f"{len(bad)} failing (worst: {bad[0]['verdict']}, "
             f"{case_of.get((bad[0]['chunk'], bad[0]['example']), '?')})" if bad else "0 failing")
    return (f"searched {len(s.records)} examples ({s.label()}, {jobs} jobs): worst floor ratio "
            f"{fr}" + (f" ({n0} examples with sites not measured, floor ~0)" if n0 else "")
            + f", least headroom {_fmt(min(r['headroom'] for r in s.records))}, {fails}; "
            f"wrote {out}/ ({len(res['cases'])} reproducers, search.md, search.csv)")

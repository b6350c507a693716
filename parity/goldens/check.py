"""Checking goldens: the committed store regenerated in memory and compared (`parity golden
check`), with per-site diffs and the limit each file is held to; and the `parity golden`
command (check, update, and foreign files via `goldens.foreign`)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from reference.dtypes import DTYPES

from parity.engine import budgets
from parity.engine.verdicts import Result
from parity.errors import ParityError
from parity.goldens.diff import SiteDiff, _ulps, diff_arrays  # noqa: F401 (re-exported)
from parity.goldens.io import INPUT_KEYS, dtype_of
from parity.goldens.spec import (DEFAULT_DIR, DRIFT_LIB, LIB_VERSION, MANIFEST, STEP2_PREFIX,
                                 Spec, cpu_fingerprint, local_classes, unavailable)
from parity.goldens.store import Checkpoints, generate, read_manifest, update, verify_integrity
from parity.goldens.foreign import check_foreign_golden


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
    `ulp` (max change in ULPs of the site's largest value, in the stored dtype)."""

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
    if a.checkpoint and not a.file:
        raise ParityError("parity golden check --checkpoint: give the golden file(s) to check "
                          "against it with --file (without --file, check compares the committed "
                          "goldens with their own recipe checkpoints)")
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
                print(f"  {s.site:32s} {s.dtype:9s} max ULP@max {_ulps(s.max_ulp):<8s} max rel "
                      f"{s.rel:<10.3g} changed {s.changed}/{s.total}")
    n = {k: sum(r.verdict == k for r in results) for k in ("pass", "fail", "skip")}
    print(f"golden check: {len(results)} goldens in {d}: {n['pass']} pass, {n['fail']} fail, "
          f"{n['skip']} skipped (this machine: {', '.join(local_classes())})")
    return 1 if n["fail"] else 0


def _print_foreign(rows: list[dict]) -> int:
    from parity.goldens.foreign import skipped_text

    def fig(x: float, spec: str) -> str:
        return "-" if math.isnan(x) else format(x, spec)

    for r in rows:
        ulps = "-" if math.isnan(r["max_ulp"]) else _ulps(r["max_ulp"])
        print(f"{r['status'].upper():4s} {r['file']} {r['site']:32s} {r['dtype']:9s} "
              f"max rel {fig(r['rel'], '<10.3g'):<10s} max abs {fig(r['max_abs'], '<10.3g'):<10s} "
              f"max ULP@max {ulps:<8s} {r['reason']}")
    fails = sum(r["status"] == "fail" for r in rows)
    skipped = skipped_text(rows)
    n_pass = sum(r["status"] == "pass" for r in rows)
    print(f"golden check: {len(rows)} sites: {n_pass} pass, {fails} fail, "
          f"{len(rows) - n_pass - fails} not compared (tolerance from the golden's dtype: "
          f"{rows[0]['tolerance_name']} = {rows[0]['tolerance']:g})"
          + (f"; {skipped}" if skipped else "") if rows else "golden check: no sites")
    if not n_pass + fails:  # nothing compared is never a pass
        print("golden check: FAIL - no site of the golden could be compared")
        return 1
    return 1 if fails else 0

"""Golden files of a user's own tests: what the pytest plugin's `parity_golden` fixture stores
and checks.

    def test_my_model(parity_reference, parity_golden):
        ref = parity_reference(ckpt_dir, ids)                 # float64 reference.Trace
        out = my_model_trace(ckpt_dir, ids)                   # {"logits": fp16 tensor, ...}
        parity_golden.check(out, "fp16", reference=ref)

Where: `<test file's folder>/goldens/<test module>/<test name>.<name>.safetensors`, one
`parity-golden/1` file per `.check` (so `parity gate --golden FILE` takes it as it is).

What it holds: the inputs (`input_ids` and, when given, `attention_mask`, `position_ids`), every
array as produced (its own dtype: a stored dtype that changes fails), and in the metadata
`parity_fixture` (JSON) the error model measured when the golden was made, per site:

  producer_rel_l2   the producer's error against the float64 reference (real tokens only),
  floor_rel_l2      the rounding floor's error: the reference rounded once to the site's dtype
                    (for a float64 site: budgets.toml `golden_float64`, the op-order noise of
                    exact math),
  tolerance_rel_l2  = margin x max(producer_rel_l2, floor_rel_l2), margin = budgets.toml
                    `golden_fixture_margin` (a healthy rerun through other kernels or another
                    preset moves a site by at most 1.11x that error, measured on every family);

plus `update_reason`, the test's node id and the time. A later run passes when every site is
within its stored tolerance (rel_l2 against the golden), with the same input ids (and mask and
positions, where the run states them), sites, shapes, dtypes and non-finite values. A golden is made or remade only by `pytest
--parity-update-golden=REASON` (the reason is required and stored), and only for the `.check`
calls that run; a missing golden fails and says how to make it.
"""
from __future__ import annotations

import datetime
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from parity.errors import ParityError

META_KEY = "parity_fixture"
MARGIN = "golden_fixture_margin"  # budgets.toml tolerance: the error model's margin
NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
INPUTS = ("input_ids", "attention_mask", "position_ids")


def golden_path(test_file: Path, test_name: str, name: str) -> Path:
    """`<test dir>/goldens/<test module>/<test name>.<name>.safetensors`; a test in a class is
    `<Class>.<test>`, a parametrized test's id (`test_x[fp16-2]`) keeps its brackets' content,
    other characters made `_`."""
    if not NAME.match(name or ""):
        raise ParityError(f"golden name {name!r}: use letters, digits, '.', '_' or '-'")
    safe = re.sub(r"[^A-Za-z0-9_.\-\[\]]", "_", test_name)
    return Path(test_file).parent / "goldens" / Path(test_file).stem / f"{safe}.{name}.safetensors"


# ----------------------------------------------------------------------------- what is checked
@dataclass
class Arrays:
    """The inputs and the float sites of one `.check` call: values as float64 (to measure) and
    as produced (to store, in their own dtype)."""

    inputs: dict[str, np.ndarray]
    values: dict[str, np.ndarray] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)
    stored: dict = field(default_factory=dict)
    family: str | None = None
    producer: str = ""


def collect(trace_or_arrays, reference=None) -> Arrays:
    """A `reference.Trace` (its sites, with `trace.dtypes` naming the dtype that made each) or a
    mapping name -> torch tensor / NumPy array (its own dtype); inputs come from the mapping's
    `input_ids`/`attention_mask`/`position_ids` or the trace's, else from `reference`'s."""
    from parity.testing import to_float64

    src = trace_or_arrays
    is_trace = hasattr(src, "sites") and hasattr(src, "input_ids")
    items = dict(src.sites) if is_trace else dict(src)
    inputs = {}
    for k in INPUTS:
        v = items.pop(k, None)
        for owner in (src if is_trace else None, reference):
            if v is None and owner is not None and hasattr(owner, k):
                v = getattr(owner, k)
        if v is not None:
            inputs[k] = np.array(_numpy(v), np.int64)  # a copy: writable, not a view
    if "input_ids" not in inputs:
        raise ParityError("a golden needs the input_ids (in the arrays, the trace or the "
                          "reference)")
    if "logits" not in items:
        raise ParityError("a golden needs 'logits' among the arrays (parity-golden/1)")
    out = Arrays(inputs=inputs, family=getattr(src, "family", None)
                 or getattr(reference, "family", None),
                 producer=(getattr(src, "meta", {}) or {}).get("producer", ""))
    for name, v in items.items():
        vals, dt = to_float64(v, name)
        if is_trace:
            dt = src.dtypes.get(name, dt)
        if dt not in ("float64", "float32", "float16", "bfloat16"):
            raise ParityError(f"{name}: a golden site must be float (got {dt})")
        out.values[name], out.dtypes[name] = vals, dt
        out.stored[name] = _as_stored(v, vals, dt)
    return out


def _numpy(v):
    return v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)


def _as_stored(v, vals, dt):
    """The array in the dtype that produced it (a trace keeps float64 carriers of half values:
    stored back in that half dtype, exactly)."""
    import torch

    t = v.detach().cpu() if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(vals))
    return t.to(getattr(torch, dt)).contiguous()


def _valid(site: str, r: np.ndarray, inputs: dict) -> np.ndarray:
    """Elements that count: real-token rows where the site has the token layout (B, T, ...) or
    an attention layout (the project's site names), finite reference values."""
    from parity.engine.metrics import valid_mask

    mask = inputs.get("attention_mask")
    rows = None
    if mask is not None:
        t = inputs["input_ids"].shape[1]
        rows = np.asarray(mask)[:, -t:] != 0
    try:
        v = valid_mask(site, r, rows) if r.ndim >= 2 else np.ones(r.shape, bool)
    except (ValueError, IndexError):  # not a token layout: every element counts
        v = np.ones(r.shape, bool)
    return np.asarray(v) & np.isfinite(r)


# ----------------------------------------------------------------------------- the error model
def error_model(arrays: Arrays, reference) -> dict:
    """Per site: the producer's error against the float64 reference, the rounding floor's, and
    the tolerance a later run is held to (module docstring)."""
    from parity.engine import budgets
    from parity.engine.metrics import rel_l2
    from reference.ops import round_to

    if reference is None:
        raise ParityError("making a golden needs reference= (the float64 reference of the same "
                          "inputs, e.g. from the parity_reference fixture): its tolerance is "
                          "measured from the producer's error, never guessed")
    ref = dict(reference.sites) if hasattr(reference, "sites") else dict(reference)
    margin = budgets.tolerance(MARGIN)
    sites = {}
    for name, y in arrays.values.items():
        if name not in ref:
            raise ParityError(f"{name}: the reference has no such site, so its error cannot be "
                              f"measured (reference sites: {', '.join(list(ref)[:6])}, ...)")
        r, rdt = _reference_values(ref[name], name)
        if r.shape != y.shape:
            raise ParityError(f"{name}: shape {list(y.shape)}, the reference's {list(r.shape)}")
        valid = _valid(name, r, arrays.inputs)
        dt = arrays.dtypes[name]
        producer = rel_l2(y, r, valid)
        if dt == "float64":
            floor = budgets.tolerance("golden_float64")
        else:
            with np.errstate(over="ignore"):
                floor = rel_l2(round_to(r, dt), r, valid)
        if not (math.isfinite(producer) and math.isfinite(floor)):
            raise ParityError(f"{name}: the producer's error ({producer:.3g}) or the rounding "
                              f"floor's ({floor:.3g}) is not finite: no tolerance can be "
                              f"measured (non-finite values or a reference beyond {dt}'s range)")
        sites[name] = {"dtype": dt, "producer_rel_l2": producer, "floor_rel_l2": floor,
                       "producer_floor_ratio": producer / floor if floor else None,
                       "tolerance_rel_l2": margin * max(producer, floor)}
    return {"margin": margin, "margin_source": f"budgets.toml tolerances.{MARGIN}",
            "sites": sites}


def _reference_values(v, name):
    from parity.testing import to_float64

    r, rdt = to_float64(v, f"reference {name}")
    if rdt != "float64":
        raise ParityError(f"reference {name}: float64 expected, got {rdt}")
    return r, rdt


# ----------------------------------------------------------------------------- write and check
def write(path: Path, arrays: Arrays, reference, *, reason: str, test_id: str) -> Path:
    """Make (or remake) the golden at `path` with its measured error model and the reason."""
    from types import SimpleNamespace

    from parity.goldens.io import write_golden

    if not reason or not reason.strip():
        raise ParityError("--parity-update-golden needs a reason (--parity-update-golden='why')")
    model = error_model(arrays, reference)
    trace = SimpleNamespace(input_ids=arrays.inputs["input_ids"],
                            attention_mask=arrays.inputs.get("attention_mask"),
                            position_ids=arrays.inputs.get("position_ids"),
                            sites=arrays.stored)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    meta = {"dtype": arrays.dtypes["logits"], "producer": arrays.producer or f"pytest {test_id}",
            "created": now, "update_reason": reason.strip(), "test": test_id,
            META_KEY: json.dumps(model, sort_keys=True)}
    if arrays.family:
        meta["family"] = arrays.family
    return write_golden(path, trace, meta)


def check(path: Path, arrays: Arrays, *, test_id: str) -> list[str]:
    """Problems of `arrays` against the golden at `path` (empty: it passes)."""
    from parity.engine.metrics import over_limit, rel_l2
    from parity.goldens.io import read_golden

    if not path.is_file():
        return [f"no golden file {path}: make it with pytest '{test_id}' "
                f"--parity-update-golden='why it is made' (the reason is stored in the file)"]
    g = read_golden(path)
    try:
        model = json.loads(g.meta[META_KEY])
        sites = model["sites"]
    except (KeyError, ValueError, TypeError):
        raise ParityError(f"{path}: no '{META_KEY}' error model in its metadata (not made by "
                          f"the parity_golden fixture): remake it with "
                          f"--parity-update-golden='why'") from None
    problems = []
    stored_inputs = {"input_ids": g.input_ids, "attention_mask": g.attention_mask,
                     "position_ids": g.position_ids}
    for k in INPUTS:  # the ids always; a mask or positions where this run states them
        a, b = stored_inputs[k], arrays.inputs.get(k)
        if b is None and k != "input_ids":
            continue
        if a is None or b is None or not np.array_equal(a, b):
            problems.append(f"{k} differ from the golden's (a golden holds for its own inputs)")
    if problems:
        return problems
    missing = [s for s in sites if s not in arrays.values]
    extra = [s for s in arrays.values if s not in sites]
    if missing:
        problems.append(f"sites in the golden but not in this run: {', '.join(missing)}")
    if extra:
        problems.append(f"sites in this run but not in the golden: {', '.join(extra)}")
    for name, e in sites.items():
        if name not in arrays.values:
            continue
        y, gv = arrays.values[name], g.sites[name]
        if arrays.dtypes[name] != e["dtype"]:
            problems.append(f"{name}: dtype {arrays.dtypes[name]}, the golden's is {e['dtype']} "
                            f"(a changed dtype is a changed computation)")
            continue
        if y.shape != gv.shape:
            problems.append(f"{name}: shape {list(y.shape)}, the golden's {list(gv.shape)}")
            continue
        valid = _valid(name, gv, arrays.inputs)
        fin = np.isfinite(gv)
        odd = int((~fin & ~((y == gv) | (np.isnan(y) & np.isnan(gv)))).sum())
        err = rel_l2(y, gv, valid)
        tol = float(e["tolerance_rel_l2"])
        if odd:
            problems.append(f"{name}: {odd} elements differ where the golden is not finite")
        if not err <= tol:
            rms = float(np.sqrt(np.mean(gv[valid] ** 2))) if valid.any() else 0.0
            loc = over_limit(y, gv, valid, tol * rms)
            share = 100.0 * loc["over"] / loc["total"] if loc["total"] else 0.0
            problems.append(
                f"{name}: rel_l2 {err:.3g} against the golden > tolerance {tol:.3g} "
                f"(measured when made: {model.get('margin', math.nan):g} x max(the producer's "
                f"error {e['producer_rel_l2']:.3g}, the floor's {e['floor_rel_l2']:.3g})); "
                f"{loc['over']} / {loc['total']} elements ({share:.2g}%) over {tol:.3g} x the "
                f"golden's rms; worst at {tuple(loc['index'])}: actual {loc['subject']:.6g}, "
                f"golden {loc['reference']:.6g}")
    return problems


# ----------------------------------------------------------------------------- the fixture
class GoldenChecker:
    """The `parity_golden` fixture's object: `.check(trace_or_arrays, name, reference=None)`."""

    def __init__(self, *, test_file, test_name: str, test_id: str, update_reason: str | None,
                 written: list):
        self.test_file, self.test_name, self.test_id = Path(test_file), test_name, test_id
        self.update_reason = update_reason
        self.written = written
        self._names: set[str] = set()

    def path(self, name: str) -> Path:
        return golden_path(self.test_file, self.test_name, name)

    def check(self, trace_or_arrays, name: str, *, reference=None) -> Path:
        """Compare with the golden `name` of this test (or, under --parity-update-golden=REASON,
        make it, with the error model measured against `reference`). AssertionError names
        every site out of tolerance; a missing golden fails."""
        __tracebackhide__ = True  # pytest: the failure points at the test's line
        if name in self._names:
            raise ParityError(f"golden name {name!r} used twice in {self.test_id}")
        self._names.add(name)
        p = self.path(name)
        arrays = collect(trace_or_arrays, reference)
        if self.update_reason is not None:
            write(p, arrays, reference, reason=self.update_reason, test_id=self.test_id)
            self.written.append((str(p), self.update_reason))
            return p
        problems = check(p, arrays, test_id=self.test_id)
        if problems:
            raise AssertionError(f"golden {p.name} ({p}):\n" + "\n".join(problems))
        return p

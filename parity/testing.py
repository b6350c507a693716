"""`assert_parity`: torch.testing.assert_close for half precision, judged against the rounding
floor instead of a fixed rtol/atol.

    from parity.testing import assert_parity
    assert_parity(y_fp16, y_float64, dtype="fp16")          # y_fp16: torch or NumPy, any dtype

The floor is what the best implementation storing in `dtype` achieves: by default the reference
rounded once to `dtype` (pass `floor=` for another, e.g. the reference's rounding-floor trace,
which rounds at every op). `actual` passes when its error against the float64 reference is within
the policy's `floor_ratio_fail` times the floor's (DESIGN.md "Metrics": floor_ratio = rel_l2 of
`actual` / rel_l2 of the floor), the same verdict the gate and the reports give a site
(`parity.engine.compare.verdict`): non-finite values where the reference is finite fail, a
reference beyond the dtype's range fails as `overflow`, a floor that cannot be measured fails,
and for `name="logits"` (the site name: last axis = vocabulary) top-1 agreement and KL are
judged too. A `warn` verdict passes with a `ParityWarning`. Budgets come from the policy file
(default `parity/engine/budgets.toml`), looked up with `name` as the site, never from literals.

A failure is an AssertionError that reads like torch's: how many elements are over the limit,
where the worst one is, and what was allowed.
"""
from __future__ import annotations

import math
import warnings

import numpy as np

from parity.errors import ParityError


class ParityWarning(UserWarning):
    """A comparison within the fail budget but over the warn budget."""


def to_float64(x, what: str) -> tuple[np.ndarray, str]:
    """(float64 NumPy copy, dtype name) of a torch tensor or array-like of any float dtype
    (bfloat16 included). NumPy inputs never import torch."""
    if type(x).__module__.split(".")[0] == "torch":
        import torch

        if not isinstance(x, torch.Tensor):
            raise ParityError(f"{what}: expected a tensor or array, got {type(x).__name__}")
        name = str(x.dtype).removeprefix("torch.")
        return x.detach().to(device="cpu", dtype=torch.float64).numpy(), name
    a = np.asarray(x)
    if a.dtype.kind not in "fiu":
        raise ParityError(f"{what}: expected numbers, got dtype {a.dtype}")
    return a.astype(np.float64), str(a.dtype)


def _dtype_name(dtype) -> str:
    from reference import dtypes

    name = dtypes.canonical(str(dtype).removeprefix("torch."))
    if name not in dtypes.DTYPES:
        raise ParityError(f"dtype={dtype!r}: not a float dtype gpt-parity knows "
                          f"({', '.join(dtypes.DTYPES)} or fp16, bf16, ...)")
    return name


def assert_parity(actual, reference, *, dtype, floor=None, policy=None, name=None) -> dict:
    """Raise AssertionError unless `actual` is as close to the float64 `reference` as an
    implementation storing in `dtype` can be (within the policy's budget); return the figures
    (floor_ratio, rel_l2, floor_rel_l2, verdict, ...).

    `actual`: torch tensor or array, any dtype and device, same shape as `reference`.
    `reference`: float64 (torch or NumPy); a reference in another dtype is refused (its own
    rounding would be counted as the error). `dtype`: the precision `actual` was computed in
    ("float16"/"fp16", "bfloat16"/"bf16", "float32", "float64" or a torch dtype). `floor`: the
    best achievable result in `dtype` (default: `reference` rounded once to `dtype`). `policy`:
    a budgets TOML path or loaded policy (default budgets.toml). `name`: the site, used for the
    message, for the policy's per-site overrides, and `logits` adds top-1 and KL."""
    __tracebackhide__ = True  # pytest: the failure points at the caller's line
    from parity.engine import budgets as B
    from parity.engine import compare as C
    from parity.engine import metrics as M
    from reference.ops import round_to

    dt = _dtype_name(dtype)
    site = name or ""
    y, ydt = to_float64(actual, "actual")
    r, rdt = to_float64(reference, "reference")
    if rdt != "float64":
        raise ParityError(f"reference must be float64, got {rdt}: its own rounding would be "
                          f"counted as error")
    if y.shape != r.shape:
        raise AssertionError(f"{_label(site)}shapes differ: actual {list(y.shape)}, "
                             f"reference {list(r.shape)}")
    if dt == "float64":
        f = None
    elif floor is None:
        with np.errstate(over="ignore"):
            f = round_to(r, dt)
    else:
        f, _ = to_float64(floor, "floor")
        if f.shape != r.shape:
            raise ParityError(f"floor has shape {list(f.shape)}, reference {list(r.shape)}")
    pol = policy if isinstance(policy, dict) else B.load_policy(policy)
    budget = B.budget_for(pol, dtype=dt, site=site)
    valid = np.ones(r.shape, bool)
    m = C.site_row(site, y, r, f, None, dt, dt,
                   margin_factor=C.DECISIVE_MARGIN * budget.floor_ratio_fail, valid=valid)
    if f is not None:
        m["floor_rms"] = M.floor_rms(f, r, valid)
    verdict, why = C.verdict(m, budget, site, dt, dt)
    # where the reference itself is not finite (masked scores: -inf), actual must hold the same
    fin = np.isfinite(r)
    odd = int((~fin & ~((y == r) | (np.isnan(y) & np.isnan(r)))).sum())
    if odd and verdict not in ("fail", "overflow", "unmeasured"):
        verdict, why = "fail", (f"{odd} elements differ where the reference is not finite "
                                f"(inf or NaN must be matched exactly)")
    figures = {"verdict": verdict, "floor_ratio": m["floor_ratio"], "rel_l2": m["rel_l2"],
               "floor_rel_l2": m["floor_rel_l2"], "max_abs": m["max_abs"],
               "nonfinite": m["nonfinite"], "budget_fail": budget.floor_ratio_fail,
               "budget_warn": budget.floor_ratio_warn, "actual_dtype": ydt}
    if site == "logits":
        figures.update(top1=m["top1"], kl=m["kl"])
    if verdict == "warn":
        warnings.warn(ParityWarning(f"{_label(site)}{why} (within the fail budget "
                                    f"{budget.floor_ratio_fail:g})"), stacklevel=2)
    if verdict in ("pass", "warn"):
        return figures
    raise AssertionError(_message(site, dt, y, r, m, budget, verdict, why, odd))


def _label(site: str) -> str:
    return f"{site}: " if site else ""


def _message(site, dt, y, r, m, budget, verdict, why, odd) -> str:
    """The torch.testing-shaped failure text: headline, mismatched count, worst element, the
    figures behind the verdict."""
    from parity.engine import metrics as M

    fail = budget.floor_ratio_fail
    what = f"'{site}' is" if site else "Tensor-likes are"
    lines = [f"{what} not at parity with the float64 reference in {dt} ({verdict}): {why}"
             if why else f"{what} not at parity with the float64 reference in {dt} ({verdict})"]
    if dt == "float64":
        scale, limit = budget.rel_l2_max * m["ref_max_abs"], (
            f"{budget.rel_l2_max:g} x max |reference|")
    else:
        scale = fail * m.get("floor_rms", math.nan)
        limit = (f"floor_ratio {fail:g} (|error| > {fail:g} x the rounding floor's rms error "
                 f"{m.get('floor_rms', math.nan):.3g})")
    loc = M.over_limit(y, r, np.ones(r.shape, bool), scale if math.isfinite(scale) else math.inf)
    share = 100.0 * loc["over"] / loc["total"] if loc["total"] else 0.0
    lines.append(f"Mismatched elements: {loc['over']} / {loc['total']} ({share:.2g}%) over {limit}")
    if loc["index"] or r.ndim == 0:
        err = abs(loc["subject"] - loc["reference"])
        rms = m.get("floor_rms", math.nan)
        times = (f" = {err / rms:.3g} x the floor's rms error" if rms and math.isfinite(rms)
                 and math.isfinite(err) else "")
        size = f"|error| {err:.3g}{times}" if math.isfinite(err) else "not finite"
        lines.append(f"Worst at index {tuple(loc['index'])}: actual {loc['subject']:.6g}, "
                     f"reference {loc['reference']:.6g} ({size})")
    if odd:
        lines.append(f"{odd} elements differ where the reference is not finite")
    if dt == "float64":
        lines.append(f"rel_l2 {m['rel_l2']:.3g} (allowed {budget.rel_l2_max:g} in float64)")
    else:
        a, b = M.fmt_pair(m["floor_ratio"], fail)
        lines.append(f"floor_ratio {a} (allowed {b}): rel_l2 {m['rel_l2']:.3g} against the "
                     f"rounding floor's {m['floor_rel_l2']:.3g}")
    if site == "logits":
        lines.append(f"top-1 {m['top1']:.4g} (min {budget.top1_min:g}), KL {m['kl']:.3g}")
    return "\n".join(lines)


def reference_trace(checkpoint, input_ids, attention_mask=None, position_ids=None, *,
                    sites=None, floor=None):
    """The float64 reference trace (`reference.Trace`) of a checkpoint directory for the given
    token ids ([B, T] or [T]; torch or NumPy), optionally its attention mask and position ids;
    `sites`: globs of the sites to keep; `floor="float16"`/"bfloat16": the rounding floor
    instead (the same math with every op rounded once to that dtype: the best an
    implementation in that dtype can do, a `floor=` for assert_parity). Inputs are checked
    against the model (ids in the vocabulary, lengths within its positions)."""
    import reference as ref_models

    from parity.checkpoints.checkpoint import load_checkpoint
    from parity.checkpoints.inputs import Inputs, validate_inputs

    ckpt = load_checkpoint(checkpoint)

    def ints(x):
        return None if x is None else np.atleast_2d(np.asarray(
            x.detach().cpu().numpy() if hasattr(x, "detach") else x, np.int64))

    inp = Inputs(ints(input_ids), ints(attention_mask), ints(position_ids))
    validate_inputs(inp, ckpt.config, "input_ids")
    fl = None if floor is None else _dtype_name(floor)
    t = ref_models.forward(ckpt.config, ckpt.weights(), inp.input_ids, inp.attention_mask,
                           inp.position_ids, sites=sites,
                           floor=None if fl == "float64" else fl)
    t.meta.update(producer=f"gpt-parity reference ({fl or 'float64'})",
                  dtype=fl or "float64", checkpoint=str(ckpt.path))
    return t

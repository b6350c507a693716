"""Attribution: which numerics choice causes a divergence.

1. first divergent site — `compare.first_divergent` (execution order, per mode);
2. per knob — how much of a subject's final-logit error disappears when that knob alone is set to
   another value: its precise choice (target = the reference), or the value another variant uses
   (target = that variant: "62% of the fp16 logit difference of meg vs hf comes from
   attn_scores=baddbmm");
3. subject vs subject per layer — `pair_divergence`: where two numerics recipes part ways.

A compiled subject (`hf+compile=inductor`) gets two rows of its own instead of the knob flips
(those are measured on its eager twin): `compile` inductor -> off (the same variant run eagerly in
the same real dtype: the share of the error that compiling changes) and
`emulate_precision_casts` off -> on (Inductor told to keep the half roundings between fused
ops). Both run with every site captured, as the judged subject does.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd

import reference

from parity.engine import metrics as M
from parity.checkpoints.checkpoint import Checkpoint
from parity.engine.compare import token_rows
from parity.checkpoints.inputs import Inputs
from parity.subjects import compiled as C
from parity.subjects.knobs import Knobs, parse_variant

# The choice of each knob that rounds least (fp32 where there is a choice, one rounding where
# there are several). Knobs not listed here are not attributed (they move no precision:
# mask_fill only changes values that get zero weight; scale_op is a power of two for hd=4^k).
PRECISE = {
    "attn_scores": "sdpa",
    "attn_upcast": True,
    "softmax": "fp32",
    "gelu": "jit",
    "layernorm": "fp32",
    "rotary": "fp32",
}
ATTR_COLUMNS = ["family", "checkpoint", "variant", "dtype", "target", "site", "knob",
                "from_value", "to_value", "error_before", "error_after", "share", "note"]


def _run(ckpt: Checkpoint, inputs: Inputs, knobs: Knobs, dtype: str, device: str,
         emulate, sites=None, streams=None, compile: str = "off") -> reference.Trace:
    """The subject's trace: on its own stream, or (streams given: local mode) each block fed
    the reference's input to that block. A compiled subject captures every site, as when it
    was judged (what a graph returns can change what Inductor fuses)."""
    from parity.subjects import fast
    from parity.engine.compare import forward_local

    model = fast.FastModel(ckpt, knobs, dtype=dtype, device=device, emulate=emulate,
                           compile=compile)
    if compile != "off":
        sites = None
    if streams is not None:
        return forward_local(model, inputs, streams)
    return model.forward(inputs, sites=sites)


def _err(y: np.ndarray, r: np.ndarray, rows, site: str = "logits") -> float:
    valid = M.valid_mask(site, r, rows)
    if not np.isfinite(np.asarray(y)[np.broadcast_to(valid, r.shape)]).all():
        return math.inf
    return M.rel_l2(y, r, valid)


def _share(before: float, after: float) -> tuple[float, str]:
    if math.isinf(before) and not math.isinf(after):
        return 1.0, "removes the non-finite values"
    if math.isinf(before):
        return 0.0, "still non-finite"
    if math.isinf(after):
        return math.nan, "introduces non-finite values"
    if before == 0.0:
        return 0.0, "no error to explain"
    return (before - after) / before, ""


def knob_attribution(ckpt: Checkpoint, inputs: Inputs, variant: str, dtype: str, *,
                     target: str = "reference", device: str = "cpu", emulate=None,
                     label: str = "", ref_trace: reference.Trace | None = None,
                     site: str = "logits", mode: str = "accumulated",
                     compile: str = "off") -> pd.DataFrame:
    """One row per knob the subject could change: flip it alone (to PRECISE, or to the target
    variant's value) and measure the error at `site` (default the logits) against the target
    again. Measuring at the first divergent site explains a verdict the logits do not show;
    with mode="local" every block is fed the reference's input, so a flip is credited only with
    what it changes in the layer that makes the divergence. `ref_trace`: the reference's full
    trace on these inputs, when the caller already has it (computed here otherwise)."""
    from parity.engine.compare import block_inputs

    cfg = ckpt.config
    if C.parse(compile) == "off":  # 'hf+compile=inductor' (a report's variant column)
        variant, compile = C.split_label(variant)
    knobs = parse_variant(variant, cfg.family, cfg)
    rows = token_rows(inputs)
    sites = [site]
    if ref_trace is None:
        ref_trace = reference.forward(cfg, ckpt.weights(), inputs.input_ids,
                                      inputs.attention_mask, inputs.position_ids)
    streams = block_inputs(ref_trace, cfg) if mode == "local" else None

    def at(trace):
        return trace.sites[site]

    if C.parse(compile) != "off":
        return _compile_rows(ckpt, inputs, knobs, dtype, device, at(ref_trace), rows, site,
                             streams, compile,
                             dict(family=cfg.family, checkpoint=label,
                                  variant=C.variant_label(variant, compile), dtype=dtype,
                                  target="reference", site=site))
    if target == "reference":
        goal = at(ref_trace)
        flips = {k: v for k, v in PRECISE.items() if getattr(knobs, k) != v}
    else:
        other = parse_variant(target, cfg.family, cfg)
        goal = at(_run(ckpt, inputs, other, dtype, device, emulate, sites=sites, streams=streams))
        flips = {k: getattr(other, k) for k in PRECISE if getattr(knobs, k) != getattr(other, k)}
    before = _err(at(_run(ckpt, inputs, knobs, dtype, device, emulate, sites=sites,
                          streams=streams)), goal, rows, site)
    out = []
    for knob, value in flips.items():
        flipped = dataclasses.replace(knobs, **{knob: value})
        after = _err(at(_run(ckpt, inputs, flipped, dtype, device, emulate, sites=sites,
                             streams=streams)), goal, rows, site)
        share, note = _share(before, after)
        out.append(dict(family=cfg.family, checkpoint=label, variant=variant, dtype=dtype,
                        target=target, site=site, knob=knob, from_value=_show(getattr(knobs, knob)),
                        to_value=_show(value), error_before=before, error_after=after,
                        share=share, note=note))
    return pd.DataFrame.from_records(out, columns=ATTR_COLUMNS)


def _compile_rows(ckpt, inputs, knobs, dtype, device, goal, rows, site, streams, compile,
                  common) -> pd.DataFrame:
    """The `compile` and `emulate_precision_casts` rows of a compiled subject (module doc)."""
    def err(spec, emulate):
        t = _run(ckpt, inputs, knobs, dtype, device, emulate, streams=streams, compile=spec)
        y = t.sites.get(site)
        return y, (math.nan if y is None else _err(y, goal, rows, site))

    y, before = err(compile, False)
    if y is None:  # a site the compiled subject does not expose: nothing to attribute
        return pd.DataFrame(columns=ATTR_COLUMNS)
    out = []
    e, after = err("off", False)  # the same subject, eager, in the same real dtype
    share, note = _share(before, after)
    out.append(dict(common, knob="compile", from_value=compile, to_value="off",
                    error_before=before, error_after=after, share=share,
                    note=note or "eager in the same dtype"))
    if not compile.endswith(C.EPC):
        z, after = err(f"{compile}+{C.EPC}", False)
        share, note = _share(before, after)
        valid = M.valid_mask(site, goal, rows)
        finite = all(np.isfinite(np.asarray(w)[np.broadcast_to(valid, goal.shape)]).all()
                     for w in (y, z, e))
        if finite and np.array_equal(y, z):
            note = (f"bitwise identical to {compile}: the code generator on {device} does not "
                    f"emulate the half roundings")
        elif finite:  # how far the emulated casts bring the compiled subject back to eager
            gap, rest = M.rel_l2(y, e, valid), M.rel_l2(z, e, valid)
            if gap > 0:
                note = (f"the emulated casts take the logits {1 - rest / gap:.0%} of the way "
                        f"back to eager (rel_l2 to eager {gap:.3g} -> {rest:.3g})")
        out.append(dict(common, knob=C.EPC, from_value="off", to_value="on",
                        error_before=before, error_after=after, share=share, note=note))
    return pd.DataFrame.from_records(out, columns=ATTR_COLUMNS)


def pair_divergence(ckpt: Checkpoint, inputs: Inputs, variant_a: str, variant_b: str,
                    dtype: str, *, device: str = "cpu", emulate=None) -> pd.DataFrame:
    """Subject vs subject per site: rel_l2 and max ULP of a against b, in execution order."""
    cfg = ckpt.config
    a = _run(ckpt, inputs, parse_variant(variant_a, cfg.family, cfg), dtype, device, emulate)
    b = _run(ckpt, inputs, parse_variant(variant_b, cfg.family, cfg), dtype, device, emulate)
    ref = reference.forward(cfg, ckpt.weights(), inputs.input_ids, inputs.attention_mask,
                            inputs.position_ids)
    rows = token_rows(inputs)
    recs = []
    for site in a.sites:
        if site not in b.sites or site not in ref.sites:
            continue
        valid = np.broadcast_to(M.valid_mask(site, ref.sites[site], rows), ref.sites[site].shape)
        sdt = a.dtypes.get(site, dtype)
        recs.append(dict(family=cfg.family, a=variant_a, b=variant_b, dtype=dtype, site=site,
                         rel_l2=M.rel_l2(a.sites[site], b.sites[site], valid),
                         max_ulp=float(M.ulp_distance(a.sites[site][valid],
                                                      b.sites[site][valid], sdt).max())
                         if valid.any() else 0.0,
                         identical=bool(np.array_equal(a.sites[site][valid],
                                                       b.sites[site][valid]))))
    return pd.DataFrame.from_records(recs)


def _show(v) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    return str(v)

"""Attribution: which numerics choice causes a divergence (issue 4).

1. first divergent site — `compare.first_divergent` (execution order, per mode);
2. per knob — how much of a subject's final-logit error disappears when that knob alone is set to
   another value: its precise choice (target = the reference), or the value another variant uses
   (target = that variant: "62% of the fp16 logit difference of meg vs hf comes from
   attn_scores=baddbmm");
3. subject vs subject per layer — `pair_divergence`: where two numerics recipes part ways.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd

import reference

from . import metrics as M
from .checkpoint import Checkpoint
from .compare import token_rows
from .inputs import Inputs
from .knobs import Knobs, parse_variant

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
ATTR_COLUMNS = ["family", "checkpoint", "variant", "dtype", "target", "knob", "from_value",
                "to_value", "error_before", "error_after", "share", "note"]


def _run(ckpt: Checkpoint, inputs: Inputs, knobs: Knobs, dtype: str, device: str,
         emulate, sites=None) -> reference.Trace:
    from . import fast

    return fast.FastModel(ckpt, knobs, dtype=dtype, device=device, emulate=emulate).forward(
        inputs, sites=sites)


def _err(y: np.ndarray, r: np.ndarray, rows) -> float:
    valid = M.valid_mask("logits", r, rows)
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
                     label: str = "", ref_logits: np.ndarray | None = None) -> pd.DataFrame:
    """One row per knob the subject could change: flip it alone (to PRECISE, or to the target
    variant's value) and measure the logit error against the target again."""
    cfg = ckpt.config
    knobs = parse_variant(variant, cfg.family, cfg)
    rows = token_rows(inputs)
    if target == "reference":
        if ref_logits is None:
            ref_logits = reference.forward(cfg, ckpt.weights(), inputs.input_ids,
                                           inputs.attention_mask, inputs.position_ids,
                                           sites=["logits"]).logits
        goal = ref_logits
        flips = {k: v for k, v in PRECISE.items() if getattr(knobs, k) != v}
    else:
        other = parse_variant(target, cfg.family, cfg)
        goal = _run(ckpt, inputs, other, dtype, device, emulate, sites=["logits"]).logits
        flips = {k: getattr(other, k) for k in PRECISE if getattr(knobs, k) != getattr(other, k)}
    before = _err(_run(ckpt, inputs, knobs, dtype, device, emulate, sites=["logits"]).logits,
                  goal, rows)
    out = []
    for knob, value in flips.items():
        flipped = dataclasses.replace(knobs, **{knob: value})
        after = _err(_run(ckpt, inputs, flipped, dtype, device, emulate, sites=["logits"]).logits,
                     goal, rows)
        share, note = _share(before, after)
        out.append(dict(family=cfg.family, checkpoint=label, variant=variant, dtype=dtype,
                        target=target, knob=knob, from_value=_show(getattr(knobs, knob)),
                        to_value=_show(value), error_before=before, error_after=after,
                        share=share, note=note))
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

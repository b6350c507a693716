"""Foreign goldens: any parity-golden/1 file (from another framework, a previous release)
against the float64 reference on a checkpoint, at the tolerance its `dtype` implies; the gate's
`golden:FILE` row is `summarize_foreign` of it."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np


from parity.engine import budgets
from parity.engine.verdicts import Result
from parity.errors import ParityError
from parity.goldens.io import GOLDEN_DTYPES, INPUT_KEYS, dtype_of, read_golden
from parity.goldens.spec import STEP2_PREFIX


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
    from parity.engine.metrics import rel_l2, ulps_of_max, valid_mask

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
                row.update(status="skip", reason=_not_a_site(site, cfg))
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
                       max_ulp=float(ulps_of_max(yv, rv, ulp_dt).max()) if yv.size else 0.0)
            if bad:
                row.update(status="fail", reason=f"{bad} non-finite values where the reference "
                                                 "is finite")
            elif row["rel"] > tol:
                row.update(status="fail", reason=f"max rel error {row['rel']:.3g} > {tol:g} "
                                                 f"({tol_name})")
    return rows


def _not_a_site(site: str, cfg) -> str:
    """Why a stored site has no counterpart: a block beyond this checkpoint's depth (a golden
    of a deeper model), or a name the family does not have."""
    import re

    m = re.match(r"blocks\.(\d+)\.", site)
    if m and int(m.group(1)) >= cfg.n_layer:
        return (f"a block beyond this checkpoint's {cfg.n_layer} layers (a golden of a deeper "
                "model?)")
    return f"not a site of {cfg.family}"


def skipped_text(rows: list[dict], limit: int = 6) -> str:
    """'2 sites skipped: blocks.2.resid_post, blocks.3.resid_post (block 2 is beyond ...)', or
    '' when every stored site was compared."""
    skipped = [r for r in rows if r["status"] == "skip"]
    if not skipped:
        return ""
    names = ", ".join(r["site"] for r in skipped[:limit])
    more = f" and {len(skipped) - limit} more" if len(skipped) > limit else ""
    why = sorted({r["reason"] for r in skipped})
    return (f"{len(skipped)} stored site{'s' if len(skipped) > 1 else ''} not compared: "
            f"{names}{more} ({'; '.join(why)})")


def summarize_foreign(rows: list[dict], name: str = "golden") -> Result:
    """One verdict for a foreign golden (what `parity gate --golden` reports): `fail` if any
    site fails (or none could be compared), else `pass`; `detail` names the worst site and its
    error; `figures` holds the numbers."""
    compared = [r for r in rows if r["status"] != "skip"]
    failed = [r for r in compared if r["status"] == "fail"]
    skipped = skipped_text(rows)
    if not compared:
        return Result(name=name, verdict="fail",
                      detail="no site of the golden could be compared"
                      + (f": {skipped}" if skipped else ""),
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
    if skipped:
        detail = f"{detail}; {skipped}"
    return Result(name=name, verdict="fail" if failed else "pass", detail=detail, figures=figures)

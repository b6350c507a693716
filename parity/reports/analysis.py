"""What a comparison frame says: the headline verdict (the healthy checkpoints decide it; stress
findings are findings), one row per subject (worst verdict, first divergent sites, logit figures)
and the sentences that explain a verdict by the knob attribution."""
from __future__ import annotations

import math

import pandas as pd


from parity.errors import ParityError
from parity.engine.verdicts import FAILING, NOT_DIVERGENT, VERDICTS, worst


SUBJECT = ("family", "checkpoint", "variant", "dtype", "device", "emulate")
DASH = "–"                # shown where a figure does not exist (NaN: no logits, no floor)



# ============================================================================ analysis
def overall_verdict(divergence: pd.DataFrame) -> str:
    """The worst verdict of any row, upper-case: PASS, WARN, OVERFLOW or FAIL. An empty frame
    is an error, never a pass."""
    if divergence.empty:
        raise ParityError("the divergence frame is empty: nothing was compared")
    return _worst(divergence["verdict"].unique()).upper()


# Checkpoint labels whose verdicts are findings, not the run's verdict: `parity report`'s stress
# checkpoints put outlier magnitudes where knobs are meant to matter. Every other checkpoint
# (`tiny`: healthy magnitudes, where every healthy path must sit at the floor) decides the
# headline verdict and `parity report`'s exit code (`run_report.exit_code`).
FINDINGS_CHECKPOINTS = ("stress",)


def deciding_rows(divergence: pd.DataFrame) -> pd.DataFrame:
    """The rows whose verdicts decide the run: those not on a FINDINGS_CHECKPOINTS label."""
    return divergence[~divergence["checkpoint"].isin(FINDINGS_CHECKPOINTS)]


def decides_failure(divergence: pd.DataFrame) -> bool:
    """Whether the run fails: a deciding row leaves its budget (fail) or cannot be held
    (overflow: healthy magnitudes must fit the dtype). A warn does not fail the run."""
    return bool(deciding_rows(divergence)["verdict"].isin(FAILING).any())


def _headline_blocks(div: pd.DataFrame, subj: pd.DataFrame) -> list:
    """The verdict that decides the exit code first; stress findings after it, as findings.
    A frame without findings checkpoints keeps the single overall verdict."""
    finding = subj["checkpoint"].isin(FINDINGS_CHECKPOINTS)
    if not finding.any():
        return [("verdict", ("Overall verdict", overall_verdict(div), _count_line(subj)))]
    code = int(decides_failure(div))
    labels = ", ".join(pd.unique(subj.loc[finding, "checkpoint"]).tolist())
    found = (f"Findings on the {labels} checkpoints (they do not decide the verdict or the "
             f"exit code: knobs are meant to matter there): {_count_line(subj[finding])}.")
    decide = deciding_rows(div)
    if decide.empty:
        return [("p", f"No healthy checkpoint was compared, so nothing in this run decides a "
                      f"verdict (exit code {code})."), ("p", found)]
    healthy = ", ".join(pd.unique(subj.loc[~finding, "checkpoint"]).tolist())
    return [("verdict", ("Overall verdict", overall_verdict(decide),
                         f"on the {healthy} checkpoints, which decide the exit code ({code}): "
                         f"{_count_line(subj[~finding])}")),
            ("p", found)]


def subject_table(divergence: pd.DataFrame, attribution: pd.DataFrame | None = None
                  ) -> pd.DataFrame:
    """One row per subject (family x checkpoint x variant x dtype x device x emulate), in frame
    order: worst verdict over every site and both modes, the logit figures (accumulated), the
    first site that is not a pass in each mode (frame order = execution order), the main cause."""
    causes = _main_causes(attribution)
    rows = []
    for key, g in divergence.groupby(list(SUBJECT), sort=False, dropna=False):
        rec = dict(zip(SUBJECT, key))
        rec["verdict"] = _worst(g["verdict"])
        worst = _worst_site(g, rec["verdict"])
        rec["worst_site"] = "" if worst is None else f"{worst['site']} ({worst['mode']})"
        rec["worst_reason"] = "" if worst is None else _text(worst["reason"])
        rec["has_overflow"] = bool((g["verdict"] == "overflow").any())
        acc = g[g["mode"] == "accumulated"]
        logit = acc[acc["site"] == "logits"]
        lg = logit.iloc[0] if len(logit) else None
        for col in ("floor_ratio", "rel_l2", "top1", "kl"):
            rec[f"logits_{col}"] = float(lg[col]) if lg is not None else math.nan
        rec["logits_verdict"] = lg["verdict"] if lg is not None else ""
        for mode in ("accumulated", "local"):
            rows_m = g[g["mode"] == mode]
            rec[f"has_{mode}"] = len(rows_m) > 0
            first = _first_divergent(rows_m)
            rec[f"first_{mode}"] = first["site"] if first is not None else ""
            rec[f"first_{mode}_verdict"] = first["verdict"] if first is not None else ""
            rec[f"first_{mode}_reason"] = _text(first["reason"]) if first is not None else ""
        rec["main_cause"] = causes.get(tuple(rec[k] for k in SUBJECT[:4]), "")
        rows.append(rec)
    return pd.DataFrame(rows)


def _worst_site(g: pd.DataFrame, verdict: str):
    """The row that earns the subject its verdict: the first with that verdict, in local mode
    when there is one there (the layer that makes it), else accumulated; None for a pass."""
    if verdict == "pass":
        return None
    hit = g[g["verdict"] == verdict]
    local = hit[hit["mode"] == "local"]
    return (local if len(local) else hit).iloc[0]


def _first_divergent(rows: pd.DataFrame):
    bad = rows[~rows["verdict"].isin(NOT_DIVERGENT)]
    return bad.iloc[0] if len(bad) else None


def _worst(verdicts) -> str:
    return worst(verdicts)


def attribution_sentence(row) -> str:
    """One attribution row as a sentence: how much of the subject's logit error (vs the
    reference, or vs another variant) disappears when that knob alone is flipped."""
    r = _record(row)
    what, flip = _attr_what(r), _attr_flip(r)
    before, after, share = float(r["error_before"]), float(r["error_after"]), float(r["share"])
    if before == 0:
        text = (f"{what} is zero; {flip} keeps it there" if after == 0
                else f"{what} is zero; {flip} makes it {_num(after)}")
    elif math.isinf(before) and math.isinf(after):
        text = f"{flip} leaves {what} non-finite"
    elif math.isinf(after):
        text = f"{flip} makes {what} non-finite"
    elif math.isnan(share):
        text = f"{flip}: no share can be computed for {what}"
    elif round(share * 100) > 0:
        text = f"{share:.0%} of {what} disappears with {flip}"
    elif round(share * 100) < 0:
        text = f"{flip} makes {what} {-share:.0%} larger"
    else:
        text = f"{flip} changes {what} by under 0.5%"
    note = _text(r.get("note"))
    site = _attr_site(r)
    label = "logit rel_l2" if site == "logits" else f"rel_l2 at {site}"
    return (text + f" ({label} {_num(before)} -> {_num(after)})"
            + (f"; {note}" if note else ""))


def _record(row) -> dict:
    return row if isinstance(row, dict) else row._asdict() if hasattr(row, "_asdict") \
        else dict(row)


def _attr_site(r) -> str:
    site = r.get("site")
    return site if isinstance(site, str) and site else "logits"


def _attr_what(r) -> str:
    where = f"{r['family']}/{r['checkpoint']}"
    site = _attr_site(r)
    err = "logit error" if site == "logits" else f"error at {site}"
    if r["target"] == "reference":
        return f"the {r['dtype']} {err} of {r['variant']} on {where}"
    div = "logit divergence" if site == "logits" else f"divergence at {site}"
    return f"the {r['dtype']} {div} of {r['variant']} from {r['target']} on {where}"


def _attr_flip(r) -> str:
    return f"{r['knob']}={r['from_value']}->{r['to_value']}"


def _visible(r) -> bool:
    """Whether a knob flip changes the logit error enough to be worth a sentence: a share that
    rounds to at least 1%, or a change in whether the error is zero or finite."""
    before, after, share = float(r["error_before"]), float(r["error_after"]), float(r["share"])
    if (before == 0) != (after == 0) or math.isinf(before) != math.isinf(after):
        return True
    return not math.isnan(share) and round(share * 100) != 0


def _main_causes(attribution) -> dict:
    """(family, checkpoint, variant, dtype) -> 'knob=a->b (62%)': the flip that removes the
    largest positive share of the logit error vs the reference (or, when only subject-vs-subject
    attribution exists, of the divergence from that other subject)."""
    if attribution is None or attribution.empty:
        return {}
    a = attribution[attribution["share"] >= 0.005]    # rounds to at least 1%: visible
    out = {}
    for key, g in a.groupby(list(SUBJECT[:4]), sort=False):
        ref = g[g["target"] == "reference"]
        g = ref if len(ref) else g
        if "site" in g.columns:  # a flip measured at the first divergent site explains the verdict
            at_site = g[g["site"] != "logits"]
            g = at_site if len(at_site) else g
        best = g.loc[g["share"].idxmax()]
        vs = "" if best["target"] == "reference" else f" vs {best['target']}"
        out[key] = (f"{best['knob']}={best['from_value']}->{best['to_value']} "
                    f"({best['share']:.0%}{vs})")
    return out


# ============================================================================ formatting
def _count_line(subj: pd.DataFrame) -> str:
    n = {v: int((subj["verdict"] == v).sum()) for v in VERDICTS}
    unmeasured = f", {n['unmeasured']} unmeasured" if n["unmeasured"] else ""
    return (f"{n['fail']} of {len(subj)} subjects fail, {n['overflow']} overflow{unmeasured}, "
            f"{n['warn']} warn, {n['pass']} pass")

def _num(x, spec: str = ".3g") -> str:
    if x is None or pd.isna(x):
        return DASH
    x = float(x)
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x.is_integer() and abs(x) < 1e9:  # counts and integral figures as integers, not 1e+03
        return str(int(x))
    return format(x, spec)


NO_TOP1 = "n/a: no decisive rows"  # top-1 not measured: every logit row a near tie

def _text(x) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) or x is pd.NA else str(x)

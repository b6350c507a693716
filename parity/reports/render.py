"""Divergence reports (DESIGN.md "Reports"): the folder a reader opens to learn which
family/checkpoint/variant/dtype diverges, from which layer, and why.

`write_report` turns the engine's two long-format frames into four files:
  divergence.csv  the divergence frame as is (one row per subject x mode x site);
  run.json        the environment of the run;
  summary.md      the verdicts at a glance, first divergent sites, attribution, overflow, logits;
  index.html      the same tables, coloured, plus plots of error against layer; self-contained
                  (inline CSS, PNGs as data: URIs) so it opens from disk or as a CI artifact.
`terminal_summary` is the short table `parity report` prints.

Both documents are built from one list of blocks (`_document`), so the Markdown and the HTML
always show the same tables. Every file is deterministic: the same frames give the same bytes
(fixed float format, frame order kept, PNGs without metadata and at a fixed dpi, no clock).
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd


from parity.errors import ParityError
from parity.reports.analysis import (DASH, FINDINGS_CHECKPOINTS, NO_TOP1, SUBJECT, _attr_flip,
                                     _count_line, _headline_blocks, _num, _text, _visible, _worst,
                                     attribution_sentence, deciding_rows, overall_verdict,
                                     subject_table)
from parity.reports.plots import (_style_keys, plot_errors)
from parity.engine.verdicts import CHECK_VERDICTS, VERDICTS, not_checked


DIVERGENCE_COLUMNS = (
    "family", "checkpoint", "variant", "dtype", "device", "emulate", "mode", "site", "layer",
    "kind", "max_abs", "mean_abs", "rel_l2", "max_ulp", "cosine", "floor_rel_l2", "floor_ratio",
    "nonfinite", "headroom", "top1", "kl", "budget_warn", "budget_fail", "verdict", "reason")
ATTRIBUTION_COLUMNS = (
    "family", "checkpoint", "variant", "dtype", "target", "knob", "from_value", "to_value",
    "error_before", "error_after", "share", "note")
# increasing severity, as the engine ranks them: 'overflow' means the reference itself exceeds
# the dtype's range at a site (no implementation in that dtype can hold it); 'fail' means the
# subject made an error over budget, non-finite values where the reference fits included
# divergence.csv keeps every float at full precision (shortest repr that round-trips): a cosine
# of 0.9999996 must not become 1 and a float column must not load back as int64
FLOAT_FORMAT = None
HTML_SIZE_BUDGET = 3_000_000   # bytes; a report page must stay light enough to mail or attach
FILES = ("divergence.csv", "run.json", "summary.md", "index.html")


# ============================================================================ entry points
def write_report(out_dir, divergence: pd.DataFrame, attribution: pd.DataFrame | None,
                 run: dict, title: str, checks: list[dict] | None = None,
                 generation: pd.DataFrame | None = None) -> dict[str, Path]:
    """Render the four report files and write them as the folder `out_dir`, whole or not at
    all (`files.publish_folder`: a new folder, or an earlier report's folder, is swapped in by
    one rename; a reader never sees half a report or a mix of two runs). Returns name -> path.
    Raises ParityError for malformed frames or a folder that cannot be written.

    `checks` (the gate's): dicts with `check`, `verdict` (pass|warn|fail|skip), `detail` and
    optional `figures`; given, they decide the headline verdict and the divergence frame may be
    empty (a gate that compared nothing layer by layer). `generation`: the gate's generation
    check, one row per prompt x step (parity.engine.generation.STEP_COLUMNS), shown per prompt."""
    from parity.files import publish_folder

    _check_frames(divergence, attribution, checks)
    out = Path(out_dir)
    contents = {
        "divergence.csv": render_csv(divergence),
        "run.json": render_json(run),
        "summary.md": render_markdown(divergence, attribution, run, title, checks,
                                      generation).encode(),
        "index.html": render_html(divergence, attribution, run, title, checks,
                                  generation).encode(),
    }
    try:
        return publish_folder(out, contents)
    except OSError as e:
        raise ParityError(f"{out}: cannot write the report folder ({e.strerror or e})") from None


def terminal_summary(divergence: pd.DataFrame, attribution: pd.DataFrame | None = None,
                     problems_only: bool = False):
    """A rich Table, one row per subject: verdict, logit floor_ratio, top-1 agreement, first
    divergent site (accumulated, and the local one when it differs) and, for a subject that is
    not a pass, the main cause (the knob whose flip removes most of its logit error).
    `problems_only` keeps the subjects that are not a pass (the caption still counts all)."""
    from rich.table import Table
    from rich.text import Text

    _check_frames(divergence, attribution)
    subj = subject_table(divergence, attribution)
    # the title carries the verdict that decides the exit code; stress findings go in the
    # caption (see _headline_blocks)
    finding = subj["checkpoint"].isin(FINDINGS_CHECKPOINTS)
    decide = deciding_rows(divergence)
    if decide.empty:
        verdict, title = None, "gpt-parity: no healthy checkpoint compared"
    else:
        verdict = overall_verdict(decide)
        title = f"gpt-parity: {verdict}"
    caption = _count_line(subj[~finding]) if len(decide) else ""
    if finding.any():
        labels = ", ".join(pd.unique(subj.loc[finding, "checkpoint"]).tolist())
        caption = "; ".join(c for c in (caption, f"findings on {labels} (do not decide the "
                                                  f"verdict): {_count_line(subj[finding])}") if c)
    table = Table(title=title, caption=caption,
                  title_style=RICH_STYLE[verdict.lower()] if verdict else "")
    for col in ("family", "checkpoint", "variant", "dtype", "verdict", "logits floor_ratio",
                "top1", "first divergent site", "main cause"):
        table.add_column(col, justify="right" if col in ("logits floor_ratio", "top1") else "left")
    for r in subj.itertuples(index=False):
        if problems_only and r.verdict == "pass":
            continue
        first = r.first_accumulated or ""
        if r.first_local and r.first_local != r.first_accumulated:
            first = f"{first} (local: {r.first_local})".strip()
        table.add_row(r.family, r.checkpoint, r.variant, r.dtype,
                      Text(r.verdict.upper() if r.verdict != "pass" else "pass",
                           style=RICH_STYLE[r.verdict]),
                      _num(r.logits_floor_ratio), _pct(r.logits_top1, missing="n/a"), first,
                      r.main_cause if r.verdict != "pass" else "")
    return table


RICH_STYLE = {"not_exposed": "dim", "unmeasured": "bold red", "pass": "green",
              "warn": "bold yellow", "overflow": "bold magenta",
              "fail": "bold red"}


# ============================================================================ the document
@dataclass(frozen=True)
class Cell:
    text: str
    verdict: str | None = None      # colours the cell in HTML, bolds it in Markdown
    heat: float | None = None       # 0..1: the overview's shade in HTML (green -> red)


@dataclass(frozen=True)
class DocTable:
    headers: tuple
    rows: tuple                      # of tuples of Cell


def _document(div: pd.DataFrame, attribution, run: dict, title: str, with_plots: bool,
              checks: list[dict] | None = None, generation: pd.DataFrame | None = None) -> list:
    """The report as blocks: ('h1'|'h2'|'h3'|'p', text), ('verdict', (label, VERDICT,
    detail)), ('table', DocTable),
    ('ul', [text]), ('img', (png_bytes, caption)). Markdown and HTML render the same list."""
    blocks: list = [("h1", title)]
    if checks:
        blocks.append(("verdict", ("Overall verdict", _checks_verdict(checks),
                                   _checks_count(checks))))
        blocks += [("h2", "Gate checks"), ("table", _checks_table(checks))]
    if generation is not None and len(generation):
        blocks += _generation_blocks(generation)
    if div.empty:
        blocks.append(("p", "No layer-by-layer comparison was made in this run."))
        return blocks + _run_blocks(run)
    subj = subject_table(div, attribution)
    multi_dev = subj[["device", "emulate"]].drop_duplicates().shape[0] > 1
    if not checks:
        blocks += _headline_blocks(div, subj)
    if len(subj) > 1:
        blocks.append(("h2", "Overview: worst floor ratio"))
        blocks.append(("p", "Each cell: the subject's worst floor_ratio over every site and both "
                            "modes (1 = as good as the dtype allows; darker red = further from "
                            "the floor); inf = non-finite values; OVERFLOW = some site's "
                            "reference exceeds the dtype itself."))
        blocks.append(("table", _overview(div, multi_dev)))

    blocks.append(("h2", "At a glance"))
    blocks.append(("p", "Each cell: the subject's worst verdict over every site and both modes; "
                        "its floor_ratio at the logits (accumulated; 1 = as good as the dtype "
                        "allows); from: the first site that is not a pass (local mode when it "
                        "has one: the layer that makes the error); +overflow: some site's "
                        "reference exceeds the dtype."))
    for ckpt in pd.unique(subj["checkpoint"]):
        s = subj[subj["checkpoint"] == ckpt]
        blocks += [("h3", f"checkpoint {_text(ckpt) or DASH}: {_worst(s['verdict']).upper()} "
                          f"({_count_line(s)})"),
                   ("table", _matrix(subj, ckpt, multi_dev))]

    blocks.append(("h2", "Where it diverges"))
    bad = subj[subj["verdict"] != "pass"]
    if bad.empty:
        blocks.append(("p", "Every subject is within budget at every site, in both modes."))
    else:
        blocks.append(("p", "The first site (in execution order) whose verdict is not a pass. "
                            "Accumulated: the subject runs on its own stream. Local: each layer "
                            "is fed the reference's input, so the local site is the layer that "
                            "makes the divergence rather than one that inherits it. Worst site: "
                            "the first site with the subject's verdict (local mode first), and "
                            "why."))
        blocks.append(("table", _divergence_table(bad, multi_dev)))

    blocks.append(("h2", "Why"))
    blocks += _why_blocks(attribution, subj)

    if with_plots:
        blocks.append(("h2", "Error against layer"))
        blocks.append(("p", "rel_l2 (top) and floor_ratio (bottom) per layer at a few key sites; "
                            "colour = variant, marker = dtype, solid = accumulated, dashed = "
                            "local; a triangle on the top edge = non-finite values at that "
                            "layer; dotted grey = fail budget."))
        style = _style_keys(div)
        for (fam, ckpt), g in div.groupby(["family", "checkpoint"], sort=False):
            png = plot_errors(g, fam, style)
            if png is not None:
                blocks.append(("img", (png, f"{fam} / {ckpt}")))

    blocks.append(("h2", "Overflow and non-finite values"))
    blocks += _overflow_blocks(div)

    blocks.append(("h2", "Logits, every subject"))
    blocks.append(("table", _logits_table(subj, multi_dev)))

    blocks.append(("h2", "How to read this report"))
    blocks.append(("ul", [
        "rel_l2 = ||subject - reference|| / ||reference|| over the elements that count "
        "(real tokens, visible score positions); the reference is float64.",
        "floor_ratio = rel_l2 of the subject / rel_l2 of the rounding floor (the float64 math "
        "with every op rounded once to the dtype: the best any implementation in that dtype can "
        "do). Healthy half-precision paths sit near 1; bugs land orders of magnitude away.",
        "warn / fail: floor_ratio over the site's budgets (parity/engine/budgets.toml), or non-finite "
        "values where the reference is finite (fail); overflow: the reference itself exceeds "
        "the dtype's range at that site. headroom = dtype max / max|reference|.",
        "top1 = share of decisive tokens (the reference's top-1 margin beyond what a subject "
        "within budget may move) whose arg-max logit matches the reference; "
        f"'{NO_TOP1}': not measured, no token was decisive; KL = mean "
        "KL(reference || subject) of the next-token distributions.",
        "divergence.csv holds every figure for every site; run.json the environment."]))

    return blocks + _run_blocks(run)


VOLATILE_RUN_KEYS = ("created", "wall_time_s")  # in run.json only: documents stay reproducible
SHOWN_ELSEWHERE = ("checks",)  # the gate's rows: the Checks table above renders them


def _run_blocks(run: dict) -> list:
    stable = {k: v for k, v in run.items()
              if k not in VOLATILE_RUN_KEYS and k not in SHOWN_ELSEWHERE}
    return [("h2", "Run"), ("p", "Timing and creation time are in run.json."),
            ("table", DocTable(("key", "value"), tuple(
                (Cell(k), Cell(v)) for k, v in _flatten(stable))))]




def _generation_blocks(steps: pd.DataFrame) -> list:
    """Per prompt: the tokens of both sides, the first divergent step with the reference's
    margin against what the dtype resolves there, and KL before and after it."""
    rows = []
    for p, g in steps.groupby("prompt", sort=True):
        g = g.sort_values("step")
        div = g[g["phase"] == "divergence"]
        decisive = bool(len(div)) and div.iloc[0]["ref_margin"] > div.iloc[0]["resolvable"]
        first = "none" if not len(div) else (
            f"step {int(div.iloc[0]['step'])}: {'decisive' if decisive else 'near-tie'}, margin "
            f"{_num(div.iloc[0]['ref_margin'])} vs {_num(div.iloc[0]['resolvable'])}")
        before, after = g[g["phase"] != "drift"], g[g["phase"] == "drift"]
        verdict = ("fail" if decisive or g["nonfinite"].any() else
                   "warn" if len(div) else "pass")
        rows.append((Cell(str(p)), Cell(" ".join(map(str, g["ref_token"]))),
                     Cell(" ".join(map(str, g["sub_token"]))),
                     Cell(f"{g['match'].mean():.3g}"), Cell(first, verdict),
                     Cell(_num(before["kl"].mean())),
                     Cell(_num(after["kl"].mean()) if len(after) else DASH),
                     Cell(_num(g["kl"].iloc[-1]))))
    return [("h2", "Generation"),
            ("p", "Greedy decoding per prompt: the subject with its own KV cache against the "
                  "float64 reference with its cache. First divergence: the first step whose "
                  "token differs, with the reference's top-1 margin (top-1 minus top-2 logit) "
                  "against what the dtype can resolve there (budgets.toml "
                  "generation_decisive_margin x floor_ratio_fail x the rounding floor's largest "
                  "logit error): decisive fails, a near-tie warns. KL = KL(reference || subject) "
                  "of the next-token distribution, the subject fed the reference's tokens (after "
                  "the divergence: teacher-forced drift)."),
            ("table", DocTable(("prompt", "reference tokens", "subject tokens", "exact match",
                                "first divergence", "KL up to it", "KL after (drift)",
                                "KL last step"), tuple(rows)))]


def _checks_verdict(checks: list[dict]) -> str:
    """The gate's rule: FAIL if any check fails, else WARN if any warns, else PASS (a skipped
    check neither passes nor fails)."""
    vs = {c["verdict"] for c in checks}
    return "FAIL" if "fail" in vs else "WARN" if "warn" in vs else "PASS"


def _checks_count(checks: list[dict]) -> str:
    n = {v: sum(c["verdict"] == v for c in checks) for v in CHECK_VERDICTS}
    skipped = [not_checked(c["check"], str(c.get("detail", ""))) for c in checks
               if c["verdict"] == "skip"]
    return (f"{n['fail']} of {len(checks)} checks fail, {n['warn']} warn, {n['pass']} pass, "
            f"{n['skip']} skipped" + "".join(f"; {x}" for x in skipped))


def _checks_table(checks: list[dict]) -> DocTable:
    rows = []
    for c in checks:
        figs = c.get("figures") or {}
        figures = ", ".join(f"{k}={_figure(v)}"
                            for k, v in sorted(figs.items(), key=lambda kv: str(kv[0])))
        rows.append((Cell(str(c.get("check", ""))), Cell(_vlabel(c["verdict"]), c["verdict"]),
                     Cell(_text(c.get("detail"))), Cell(figures)))
    return DocTable(("check", "verdict", "detail", "figures"), tuple(rows))


def _column_label(r, multi_dev: bool) -> str:
    label = f"{r.variant} {r.dtype}"
    return f"{label} @{_device(r.device, r.emulate)}" if multi_dev else label


def _device(device, emulate) -> str:
    return f"{device} (emulated)" if bool(emulate) else str(device)


def _matrix(subj: pd.DataFrame, ckpt, multi_dev: bool) -> DocTable:
    s = subj[subj["checkpoint"] == ckpt]
    cols = list(dict.fromkeys(_column_label(r, multi_dev) for r in s.itertuples(index=False)))
    fams = list(pd.unique(s["family"]))
    cells = {(f, c): [] for f in fams for c in cols}
    for r in s.itertuples(index=False):
        cells[(r.family, _column_label(r, multi_dev))].append(r)
    rows = []
    for f in fams:
        row = [Cell(f)]
        for c in cols:
            rs = cells[(f, c)]
            if not rs:
                row.append(Cell(""))
                continue
            v = _worst(r.verdict for r in rs)
            ratio = max((r.logits_floor_ratio for r in rs), key=_nan_low)
            text = f"{_vlabel(v)} {_num(ratio)}"
            worst = next(r for r in rs if r.verdict == v)
            # where it starts: the local site pins the layer that makes the error
            site = worst.first_local or worst.first_accumulated
            if site:
                text += f" from {site}"
            if v != "overflow" and any(r.has_overflow for r in rs):
                text += " +overflow"
            row.append(Cell(text, v))
        rows.append(tuple(row))
    return DocTable(("family", *cols), tuple(rows))


HEAT_DECADES = 2.0  # the overview's colour scale: floor ratio 1 (green) to 10^2 and beyond (red)


def _overview(div: pd.DataFrame, multi_dev: bool) -> DocTable:
    """Family x checkpoint rows, one column per subject: the worst floor_ratio of any site in
    either mode (inf when a site holds non-finite values), OVERFLOW where a reference value
    leaves the dtype; shaded by log10(ratio) over HEAT_DECADES."""
    keys = ["family", "checkpoint", "variant", "dtype", "device", "emulate"]
    worst: dict = {}
    for key, g in div.groupby(keys, sort=False, dropna=False):
        fam, ckpt, var, dt, dev, emu = key
        col = _column_label(pd.Series(dict(variant=var, dtype=dt, device=dev, emulate=emu)),
                            multi_dev)
        judged = g[g["verdict"] != "not_exposed"]
        ratios = judged["floor_ratio"].astype(float)
        r = math.inf if (judged["nonfinite"] > 0).any() else (
            float(ratios.max()) if ratios.notna().any() else math.nan)
        worst[(fam, _text(ckpt) or DASH, col)] = (r, _worst(g["verdict"]),
                                                  bool((g["verdict"] == "overflow").any()))
    rows_keys = list(dict.fromkeys(k[:2] for k in worst))
    cols = list(dict.fromkeys(k[2] for k in worst))
    rows = []
    for fam, ckpt in rows_keys:
        row = [Cell(f"{fam} / {ckpt}")]
        for c in cols:
            if (fam, ckpt, c) not in worst:
                row.append(Cell(""))
                continue
            r, v, ovf = worst[(fam, ckpt, c)]
            if ovf:
                row.append(Cell("OVERFLOW", "overflow"))
                continue
            heat = (1.0 if not math.isfinite(r) else
                    min(max(math.log10(max(r, 1.0)) / HEAT_DECADES, 0.0), 1.0)) \
                if not math.isnan(r) else None
            row.append(Cell(_num(r) if not math.isnan(r) else DASH, v, heat))
        rows.append(tuple(row))
    return DocTable(("family / checkpoint", *cols), tuple(rows))


def _nan_low(x: float) -> float:
    return -math.inf if math.isnan(x) else x


def _subject_cells(r, multi_dev: bool) -> list:
    """The cells that name a subject: family, checkpoint, variant, dtype (and device)."""
    return ([Cell(r.family), Cell(r.checkpoint), Cell(r.variant), Cell(r.dtype)]
            + ([Cell(_device(r.device, r.emulate))] if multi_dev else []))


def _divergence_table(bad: pd.DataFrame, multi_dev: bool) -> DocTable:
    head = ("family", "checkpoint", "variant", "dtype") + (("device",) if multi_dev else ()) + (
        "verdict", "logits floor_ratio", "first divergent (accumulated)",
        "first divergent (local)", "worst site", "why", "main cause")
    rows = []
    for r in bad.itertuples(index=False):
        rows.append(tuple(
            _subject_cells(r, multi_dev)
            + [Cell(_vlabel(r.verdict), r.verdict), Cell(_num(r.logits_floor_ratio)),
               Cell(_site_cell(r.first_accumulated, r.first_accumulated_verdict,
                               r.has_accumulated), r.first_accumulated_verdict or None),
               Cell(_site_cell(r.first_local, r.first_local_verdict, r.has_local),
                    r.first_local_verdict or None),
               Cell(r.worst_site, r.verdict), Cell(r.worst_reason), Cell(r.main_cause)]))
    return DocTable(head, tuple(rows))


def _site_cell(site: str, verdict: str, measured: bool) -> str:
    if not measured:
        return "not measured"
    return f"{site} ({verdict})" if site else "none"


def _why_blocks(attribution, subj: pd.DataFrame) -> list:
    """Sentences for the subjects that are not a pass and for every subject-vs-subject pair
    (flips with no visible effect folded into one line), then the share of every knob for every
    subject in one table, where a reader can see that on healthy subjects no knob matters."""
    if attribution is None or attribution.empty:
        return [("p", "No attribution was computed for this run.")]
    verdict = {tuple(r[:4]): r[4] for r in subj[list(SUBJECT[:4]) + ["verdict"]].itertuples(
        index=False)}
    blocks = [("p", "Each knob flipped alone to its precise choice, the rest of the subject "
                    "unchanged: the share of the logit error that disappears (negative: the "
                    "error grows).")]
    groups = list(attribution.groupby(list(SUBJECT[:4]) + ["target"], sort=False))
    bad = [(k, g) for k, g in groups
           if k[4] == "reference" and verdict.get(k[:4], "pass") != "pass"]
    pairs = [(k, g) for k, g in groups if k[4] != "reference"]
    for heading, chosen in (("Subjects that do not pass", bad),
                            ("Where two presets part ways", pairs)):
        if not chosen:
            continue
        blocks.append(("h3", heading))
        for key, g in chosen:
            fam, ckpt, var, dt, target = key
            recs = g.sort_values("share", ascending=False, kind="stable",
                                 na_position="last").to_dict("records")
            vs = "the reference" if target == "reference" else target
            items = [attribution_sentence(r) for r in recs if _visible(r)]
            # one entry per knob: a flip measured at the logits and again at the first
            # divergent site is one knob, and one visible anywhere is not "no visible effect"
            loud = {_attr_flip(r) for r in recs if _visible(r)}
            quiet = list(dict.fromkeys(_attr_flip(r) for r in recs
                                       if _attr_flip(r) not in loud))
            if quiet:
                items.append(f"no visible effect (under 0.5% each): {', '.join(quiet)}")
            blocks.append(("p", f"{fam} / {ckpt} / {var} / {dt} vs {vs}:"))
            blocks.append(("ul", items))
    compiled = attribution[attribution["knob"].isin(COMPILE_KNOBS)]
    if len(compiled):  # only in a run with compiled subjects
        blocks.append(("h3", "What compiling changes"))
        blocks.append(("p", "Each compiled subject against the same variant run eagerly in the "
                            "same real dtype (compile=...->off), and with Inductor's "
                            "emulate_precision_casts (the half roundings between fused ops kept)."))
        blocks.append(("ul", [f"{r['family']} / {r['checkpoint']} / {r['variant']} / "
                              f"{r['dtype']}: {attribution_sentence(r)}"
                              for r in compiled.to_dict("records")]))
    ref = attribution[attribution["target"] == "reference"]
    if len(ref):
        blocks.append(("h3", "Every knob, every subject (share of the logit error vs the "
                             "reference)"))
        blocks.append(("p", "Share of each subject's logit error that disappears when the knob "
                            "alone takes its precise choice (+: the knob costs accuracy; "
                            "inf: non-finite logits; 0 -> x: no error "
                            "before; blank: the preset already uses the precise choice)."))
        blocks.append(("table", _share_table(ref, verdict)))
    return blocks


COMPILE_KNOBS = ("compile", "emulate_precision_casts")  # parity/engine/attribution.py


def _share_table(ref: pd.DataFrame, verdict: dict) -> DocTable:
    knobs = list(pd.unique(ref["knob"]))
    rows = []
    for key, g in ref.groupby(list(SUBJECT[:4]), sort=False):
        by_knob = {r["knob"]: r for r in g.to_dict("records")}
        v = verdict.get(key, "pass")
        rows.append(tuple([Cell(str(k)) for k in key] + [Cell(_vlabel(v), v)]
                          + [Cell(_share_cell(by_knob[k]) if k in by_knob else "") for k in knobs]))
    return DocTable(("family", "checkpoint", "variant", "dtype", "verdict", *knobs), tuple(rows))


def _share_cell(r) -> str:
    before, after, share = float(r["error_before"]), float(r["error_after"]), float(r["share"])
    if math.isinf(before):          # non-finite logits: a share means nothing
        return "still inf" if math.isinf(after) else "removes inf"
    if math.isinf(after):
        return "makes inf"
    if before == 0:
        return f"0 -> {_num(after)}"
    if math.isnan(share):
        return DASH
    pct = round(share * 100)
    return "0%" if pct == 0 else f"{pct:+d}%"


def _overflow_blocks(div: pd.DataFrame) -> list:
    """Where values stopped being finite: sites whose reference exceeds the dtype ('overflow')
    and sites where the subject produced inf/NaN although the reference fits (a 'fail')."""
    hit = div[(div["verdict"] == "overflow") | (div["nonfinite"] > 0)]
    if hit.empty:
        return [("p", "Every value stayed finite, and every reference value fits its dtype.")]
    rows = []
    for _, g in hit.groupby(list(SUBJECT) + ["mode"], sort=False, dropna=False):
        first = g.iloc[0]
        rows.append((Cell(first["family"]), Cell(first["checkpoint"]), Cell(first["variant"]),
                     Cell(first["dtype"]), Cell(first["mode"]),
                     Cell(first["site"], first["verdict"]), Cell(str(len(g))),
                     Cell(str(int(first["nonfinite"]))), Cell(_num(first["headroom"])),
                     Cell(_magnitude(first))))
    return [("p", "Per subject and mode: the first site with non-finite values or a reference "
                  "beyond the dtype's range, how many sites are affected, and why (headroom = "
                  "dtype max / max|reference|: below 1 the dtype cannot hold the site)."),
            ("table", DocTable(("family", "checkpoint", "variant", "dtype", "mode", "first site",
                                "sites", "non-finite values", "headroom", "magnitude"),
                               tuple(rows)))]


def _magnitude(row) -> str:
    h, dt = float(row["headroom"]), row["dtype"]
    if not math.isnan(h) and h < 1:
        return (f"the reference peaks at {_num(1 / h)}x the {dt} max: no {dt} "
                f"implementation can hold this site")
    return (f"the reference fits ({_num(h)}x below the {dt} max): the subject overflowed in "
            f"an intermediate (e.g. a product formed before its scale)")


def _logits_table(subj: pd.DataFrame, multi_dev: bool) -> DocTable:
    head = ("family", "checkpoint", "variant", "dtype") + (("device",) if multi_dev else ()) + (
        "verdict", "logits rel_l2", "logits floor_ratio", "top1", "KL")
    rows = []
    for r in subj.itertuples(index=False):
        rows.append(tuple(
            _subject_cells(r, multi_dev)
            + [Cell(_vlabel(r.verdict), r.verdict), Cell(_num(r.logits_rel_l2)),
               Cell(_num(r.logits_floor_ratio), r.logits_verdict or None),
               Cell(_pct(r.logits_top1, missing=NO_TOP1)), Cell(_num(r.logits_kl, ".2e"))]))
    return DocTable(head, tuple(rows))


def _figure(v) -> str:
    """A check's figure as text: numbers as the report prints them, a mapping as `a:1 b:2`."""
    if isinstance(v, dict):
        return " ".join(f"{k}:{_figure(x)}" for k, x in v.items())
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    return _num(v)


def _flatten(d, prefix="") -> list[tuple[str, str]]:
    """Nested run facts as `a.b.c` keys with readable values: dicts inside lists are flattened
    as `a.0.b`, never printed as a Python repr; timing keys are left to run.json."""
    out = []
    for k in sorted(d, key=str):
        v, name = d[k], f"{prefix}{k}"
        if k in VOLATILE_RUN_KEYS:
            continue
        if isinstance(v, dict):
            out += _flatten(v, name + ".")
        elif isinstance(v, (list, tuple)) and any(isinstance(x, (dict, list, tuple)) for x in v):
            out += _flatten(dict(enumerate(v)), name + ".")
        elif isinstance(v, (list, tuple)):
            out.append((name, ", ".join(map(str, v))))
        elif isinstance(v, float):
            out.append((name, _num(v)))
        else:
            out.append((name, str(v)))
    return out


# ============================================================================ formatting
def _pct(x, missing: str = DASH) -> str:
    if x is None or pd.isna(x):
        return missing
    s = f"{100 * float(x):.1f}"
    return ("99.9" if s == "100.0" and float(x) < 1 else s) + "%"


def _vlabel(v: str) -> str:
    return "pass" if v == "pass" else v.upper()


# ============================================================================ renderers
def render_csv(divergence: pd.DataFrame) -> bytes:
    buf = io.StringIO()
    divergence.to_csv(buf, index=False, float_format=FLOAT_FORMAT, lineterminator="\n")
    return buf.getvalue().encode()


def render_json(run: dict) -> bytes:
    return (json.dumps(run, indent=2, sort_keys=True, default=_json_default) + "\n").encode()


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (Path, set, frozenset)):
        return str(o) if isinstance(o, Path) else sorted(o)
    return str(o)


def render_markdown(div, attribution, run, title, checks=None, generation=None) -> str:
    out = []
    for kind, body in _document(div, attribution, run, title, False, checks, generation):
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + body)
        elif kind == "verdict":
            out.append(f"**{body[0]}: {body[1]}** — {body[2]}.")
        elif kind == "p":
            out.append(body)
        elif kind == "ul":
            out.append("\n".join(f"- {t}" for t in body))
        elif kind == "table":
            out.append(_md_table(body))
    return "\n\n".join(out) + "\n"


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _md_table(t: DocTable) -> str:
    def cell(c: Cell) -> str:
        s = _md_escape(c.text)
        return f"**{s}**" if c.verdict and c.verdict != "pass" and s else s
    lines = ["| " + " | ".join(_md_escape(h) for h in t.headers) + " |",
             "|" + "|".join("---" for _ in t.headers) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in t.rows]
    return "\n".join(lines)


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em auto;max-width:1200px;
color:#1b1b1b;padding:0 1em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.9em}
th,td{border:1px solid #d0d0d0;padding:.25em .55em;text-align:left;vertical-align:top}
th{background:#f3f3f3}
td.pass{background:#e3f4e6}td.warn{background:#fff2c2}td.skip{color:#777}
td.fail{background:#f9d2cf;font-weight:600}td.overflow{background:#e9c8f2;font-weight:600}
.verdict{font-size:1.3em;padding:.4em .8em;display:inline-block;border-radius:4px}
.verdict.PASS{background:#e3f4e6}.verdict.WARN{background:#fff2c2}.verdict.FAIL{background:#f9d2cf}
.verdict.OVERFLOW{background:#e9c8f2}
figure{margin:1em 0}figcaption{font-weight:600}img{max-width:100%}
summary{cursor:pointer}summary h2{display:inline}td.heat{text-align:right}
li{margin:.2em 0}
""".strip()


COLLAPSED = ("Logits, every subject", "How to read this report", "Run")  # closed at first
OPEN = ("Why", "Error against layer", "Overflow and non-finite values")  # collapsible, open


def render_html(div, attribution, run, title, checks=None, generation=None) -> str:
    """The same blocks as summary.md; long sections (OPEN, COLLAPSED) fold into <details>."""
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{e(title)}</title>", f"<style>\n{CSS}\n</style>", "</head>", "<body>"]
    in_details = False
    for kind, body in _document(div, attribution, run, title, True, checks, generation):
        if kind == "h2" and in_details:
            out.append("</details>")
            in_details = False
        if kind == "h2" and (body in OPEN or body in COLLAPSED):
            out.append(f"<details{' open' if body in OPEN else ''}><summary><h2>{e(body)}</h2>"
                       "</summary>")
            in_details = True
        elif kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{e(body)}</{kind}>")
        elif kind == "verdict":
            out.append(f'<p><span class="verdict {e(body[1])}">{e(body[0])}: '
                       f"<b>{e(body[1])}</b></span> {e(body[2])}.</p>")
        elif kind == "p":
            out.append(f"<p>{e(body)}</p>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{e(t)}</li>" for t in body) + "</ul>")
        elif kind == "table":
            out.append(_html_table(body))
        elif kind == "img":
            png, caption = body
            data = base64.b64encode(png).decode("ascii")
            out.append(f'<figure><figcaption>{e(caption)}</figcaption>'
                       f'<img alt="{e(caption)}: error against layer" '
                       f'src="data:image/png;base64,{data}"></figure>')
    if in_details:
        out.append("</details>")
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"


def _html_cell(c: Cell) -> str:
    e = html.escape
    if c.heat is not None and c.verdict != "overflow":
        # hue 120 (green) at the floor to 0 (red) HEAT_DECADES above it
        style = f' style="background:hsl({120 * (1 - c.heat):.0f},70%,{85 - 15 * c.heat:.0f}%)"'
        return f'<td class="heat"{style}>{e(c.text)}</td>'
    if c.verdict:
        return f'<td class="{c.verdict}">{e(c.text)}</td>'
    return f"<td>{e(c.text)}</td>"


def _html_table(t: DocTable) -> str:
    e = html.escape
    head = "<tr>" + "".join(f"<th>{e(h)}</th>" for h in t.headers) + "</tr>"
    rows = []
    for row in t.rows:
        tds = "".join(_html_cell(c) for c in row)
        rows.append(f"<tr>{tds}</tr>")
    return "<table>\n<thead>" + head + "</thead>\n<tbody>\n" + "\n".join(rows) + \
        "\n</tbody>\n</table>"


# ============================================================================ checks and IO
def _check_frames(div, attribution, checks=None) -> None:
    if not isinstance(div, pd.DataFrame):
        raise ParityError("report: the divergence table is not a pandas DataFrame")
    missing = [c for c in DIVERGENCE_COLUMNS if c not in div.columns]
    if missing:
        raise ParityError(f"report: the divergence table lacks columns {missing}")
    unknown = sorted(map(str, set(div["verdict"].unique()) - set(VERDICTS)))
    if unknown:
        raise ParityError(f"report: unknown verdicts {unknown} (expected one of {VERDICTS})")
    if div.empty and not checks:
        raise ParityError("report: the divergence table is empty: nothing was compared")
    for c in checks or ():
        if not isinstance(c, dict) or c.get("verdict") not in CHECK_VERDICTS:
            raise ParityError(f"report: a gate check needs a verdict in {CHECK_VERDICTS}: {c!r}")
    if attribution is not None and not attribution.empty:
        missing = [c for c in ATTRIBUTION_COLUMNS if c not in attribution.columns]
        if missing:
            raise ParityError(f"report: the attribution table lacks columns {missing}")

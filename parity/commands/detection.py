"""Detection power (`parity detection`): do the budgets catch the bugs people make?

Every mutant of the catalogue in tests/mutants.py (a fast path with one planted numerics bug in
one layer) runs through the project's checks, next to its healthy twin (the same `hf` preset
without the bug) on the same checkpoint and inputs:

  layers   `compare` on the tiny checkpoint (local and accumulated mode)
  cache    decoding with the KV cache against the full forward (`parity.engine.consistency`)
  batch    batch rows and left padding against each row alone (`parity.engine.consistency`)
  stress   `compare` on the stress checkpoint (real-sized magnitudes)

A check *catches* a mutant when the mutant gets a `fail` or `overflow` verdict there while the
healthy twin gets none (a check the healthy twin already fails, e.g. HF GPT-2's raw q.k^T on the
stress checkpoint, cannot tell the bug from the known finding and counts as "n/a"). The verdict
budgets are the shipped ones, unchanged: the table measures them, it does not tune them.

Per mutant x family x dtype the table gives: which checks catch it, the first divergent site in
local mode of the catching check (it must be a site of the planted op, in the planted layer),
that site's verdict and floor ratio, and whether the mutant is only flagged (`warn`). Written to
`reports/detection/detection.md` and `detection.csv` (or `--out DIR`).

Each row gets an `outcome` (`outcome()`); the exit code is 1 when any row's outcome is a failure,
0 otherwise (`exit_code()`):

  killed                      a check catches it, pinned on a site of the planted op: fine
  flagged below the budget    no check catches it, but it is flagged `warn`, pinned, and its floor
                              ratio there is finite and at most the fail budget, in a dtype where
                              the catalogue does not promise a kill (every dtype but MUST_KILL):
                              the bug is smaller than the budget can see (e.g. LayerNorm's unbiased
                              variance in bf16, whose floor is 8x fp16's). Reported, not a failure
  wrong pin      (failure)    caught or flagged, but the first divergent site (local mode) is not
                              a site of the planted op in the planted layer
  survivor       (failure)    not caught, and either no check flags it at all, or its floor ratio
                              at the planted site exceeds the fail budget or is not a number, or
                              the dtype is one of MUST_KILL (fp16: every catalogued bug is more
                              than 8x fp16's floor, tests/test_detection.py holds each to a kill)
  false alarm    (failure)    the healthy twin fails (`fail`/`overflow`) a check on the tiny
                              checkpoint (layers, cache, batch): the budgets flag healthy code. On
                              the stress checkpoint a healthy failure is a known finding (HF
                              GPT-2's raw q.k^T); that check counts as n/a for the mutant.

The documented run (fp16 46/46 killed; bf16 39/45 killed, 6 flagged below the budget) exits 0.
"""
from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from parity.errors import ParityError
from parity.engine.verdicts import FAILING

if TYPE_CHECKING:  # pandas is imported when a table is made, not when the CLI builds its parser
    import pandas as pd

CHECKS = ("layers", "cache", "batch", "stress")
LENGTH = {"tiny": 16, "stress": 24}  # stress: longer than GPT-Neo's window of 8
COLUMNS = ["mutant", "family", "dtype", "bug", "planted", "check", "caught_by", "first_site",
           "verdict", "floor_ratio", "budget_fail", "kill_site", "pinned", "killed", "flagged",
           "healthy_fails", "outcome"]
BAD = FAILING  # a catching verdict / a healthy failure
TINY_CHECKS = ("layers", "cache", "batch")  # a healthy failure there is a false alarm
# dtypes where every catalogued bug must be killed: each is more than 8x fp16's rounding floor
# (smallest, LayerNorm's unbiased variance: floor ratio 15-23 in fp16)
MUST_KILL = ("float16",)
OK_OUTCOMES = ("killed", "flagged below the budget")


class Bench:
    """Checkpoints and healthy frames, made once per (family, preset) / (family, dtype)."""

    def __init__(self, root: Path):
        self.root, self._ckpt, self._healthy = root, {}, {}

    def ckpt(self, family: str, preset: str):
        from parity.checkpoints.checkpoint import load_checkpoint
        from parity.checkpoints.recipes import make_checkpoint

        key = (family, preset)
        if key not in self._ckpt:
            self._ckpt[key] = load_checkpoint(
                make_checkpoint(family, self.root / f"{family}-{preset}", preset=preset))
        return self._ckpt[key]

    def frames(self, family: str, dtype: str, factory=None) -> dict[str, "pd.DataFrame"]:
        """check -> frame (every check of CHECKS) for the `hf` subject, healthy or mutated."""
        from parity.engine import consistency as C
        from parity.engine.compare import Subject
        from parity.checkpoints.inputs import default_batch

        key = (family, dtype)
        if factory is None and key in self._healthy:
            return self._healthy[key]
        subj = [Subject(variant="hf", dtype=dtype)]
        tiny, stress = self.ckpt(family, "tiny"), self.ckpt(family, "stress")
        out = {}
        inp = default_batch(tiny.config, LENGTH["tiny"])
        for name in ("layers", "cache", "batch"):
            out[name] = C.RUNNERS[name](tiny, inp, subj, label="tiny", model_factory=factory)
        out["stress"] = C.layers_check(stress, default_batch(stress.config, LENGTH["stress"]),
                                       subj, label="stress", model_factory=factory)
        if factory is None:
            self._healthy[key] = out
        return out


def assess(spec, family: str, dtype: str, bench: Bench) -> dict:
    """One row of the detection table."""
    from parity.engine import consistency as C

    cfg = bench.ckpt(family, "tiny").config
    healthy = bench.frames(family, dtype)
    mutant = bench.frames(family, dtype, spec.factory(cfg))
    caught, flagged, healthy_fails = [], [], []
    for c in CHECKS:
        if healthy[c]["verdict"].isin(BAD).any():
            healthy_fails.append(c)
            continue
        v = set(mutant[c]["verdict"])
        if v & set(BAD):
            caught.append(c)
        elif "warn" in v:
            flagged.append(c)
    check = spec.check if spec.check in caught else (caught or flagged or [spec.check])[0]
    first = C.first_divergent(mutant[check], "local") if check not in healthy_fails else None
    row = first.iloc[0] if first is not None and len(first) else None
    budget_fail = (math.nan if row is None
                   else float(mutant[check].loc[first.index[0], "budget_fail"]))
    kill = None
    if caught:
        m = mutant[check]
        bad = m[m["verdict"].isin(BAD)]
        local = bad[bad["mode"] == "local"]
        kill = (local if len(local) else bad).iloc[0]
    expected = spec.expected_sites(cfg)
    n = spec.planted(cfg)
    return {
        "mutant": spec.name, "family": family, "dtype": dtype, "bug": spec.bug,
        "planted": "head" if n is None else f"layer {n}",
        "check": check if (caught or flagged) else "",
        "caught_by": ", ".join(caught),
        "first_site": "" if row is None else row["site"],
        "verdict": "" if row is None else row["verdict"],
        "floor_ratio": math.nan if row is None else float(row["floor_ratio"]),
        "budget_fail": budget_fail,
        "kill_site": "" if kill is None else f"{kill['site']} ({kill['verdict']}, {kill['mode']})",
        "pinned": row is not None and row["site"] in expected,
        "killed": bool(caught),
        "flagged": bool(caught or flagged),
        "healthy_fails": ", ".join(healthy_fails),
        "outcome": "",  # set by outcome() once the row is complete
    }


def _checks(text) -> set[str]:
    return {c.strip() for c in text.split(",") if c.strip()} if isinstance(text, str) else set()


def outcome(r) -> str:
    """The outcome of one row (a mapping with COLUMNS): see the module's docstring."""
    get = r.get
    false_alarm = sorted(_checks(get("healthy_fails")) & set(TINY_CHECKS))
    if false_alarm:
        return f"false alarm (healthy fails {', '.join(false_alarm)})"
    killed, flagged, pinned = bool(get("killed")), bool(get("flagged")), bool(get("pinned"))
    if (killed or flagged) and not pinned:
        return "wrong pin"
    if killed:
        return "killed"
    if not flagged:
        return "survivor (no check flags it)"
    fr, budget = (math.nan if get(k) is None else float(get(k))
                  for k in ("floor_ratio", "budget_fail"))
    if get("dtype") in MUST_KILL:
        return f"survivor (only warn in {get('dtype')}, where every mutant must be killed)"
    if not (math.isfinite(fr) and math.isfinite(budget) and fr <= budget):
        return f"survivor (floor ratio {_num(fr)} not within the fail budget {_num(budget)})"
    return "flagged below the budget"


def failed(df: "pd.DataFrame") -> "pd.DataFrame":
    """The rows whose outcome fails the command."""
    return df[[outcome(r) not in OK_OUTCOMES for r in df.to_dict("records")]]


def detection_table(families=None, dtypes=("float16", "bfloat16"), mutants=None,
                    progress=None) -> "pd.DataFrame":
    """The table for every catalogue entry (or the named `mutants`) applicable to `families`."""
    import torch

    from parity.commands.search import tests_module

    torch.set_num_threads(1)
    Mu = tests_module("mutants")
    specs = [s for s in Mu.CATALOGUE if not mutants or s.name in mutants]
    if mutants:
        unknown = set(mutants) - {s.name for s in Mu.CATALOGUE}
        if unknown:
            raise ParityError(f"unknown mutant(s) {', '.join(sorted(unknown))} (catalogue: "
                              f"{', '.join(s.name for s in Mu.CATALOGUE)})")
    rows = []
    with tempfile.TemporaryDirectory(prefix="parity-detection-") as tmp:
        bench = Bench(Path(tmp))
        for dtype in dtypes:
            for spec in specs:
                for family in spec.families:
                    if (families and family not in families) or dtype not in spec.dtypes:
                        continue  # an equivalent mutant there (see the catalogue's Spec)
                    if progress:
                        progress(f"{spec.name} {family} {dtype}")
                    rows.append(assess(spec, family, dtype, bench))
    import pandas as pd

    df = pd.DataFrame(rows, columns=COLUMNS)
    df["outcome"] = [outcome(r) for r in rows]
    return df


def kill_rates(df: "pd.DataFrame") -> dict[str, tuple[int, int]]:
    """dtype -> (killed, total)."""
    return {d: (int(g["killed"].sum()), len(g)) for d, g in df.groupby("dtype", sort=False)}


def _num(x: float) -> str:
    if isinstance(x, float) and math.isnan(x):
        return "-"
    return "inf" if math.isinf(x) else f"{x:.3g}"


def render(df: "pd.DataFrame", seconds: float | None = None) -> str:
    """detection.md: the kill rate per dtype, the exit code and why, the table, the failures,
    the mutants flagged below the budget."""
    df = df.assign(outcome=[outcome(r) for r in df.to_dict("records")])
    rates = kill_rates(df)
    lines = ["# Detection power of the verdict budgets", "",
             "Each mutant is the `hf` fast path with one planted bug (tests/mutants.py), on the "
             "tiny (4 layers, 2 x 16 tokens, left padding) and stress checkpoints, judged by the "
             "shipped budgets (parity/engine/budgets.toml). A check catches a mutant when it fails or "
             "overflows there while the healthy `hf` path does not. `first divergent site` is "
             "the first non-pass site in local mode (each layer fed the reference's input) of "
             "the catching check; `pinned` = it is a site of the planted op in the planted "
             "layer.", ""]
    below = df[df["outcome"] == "flagged below the budget"]
    bad = failed(df)
    for d, (k, n) in rates.items():
        pinned = int(df[(df["dtype"] == d) & df["killed"]]["pinned"].sum())
        nb = int((below["dtype"] == d).sum())
        lines.append(f"- **{d}**: {k} of {n} mutants killed ({100.0 * k / max(n, 1):.0f}%), "
                     f"{pinned} of {k} pinned on the planted layer and op"
                     + (f"; {nb} flagged below the budget" if nb else "") + ".")
    lines += ["", f"**Exit 1**: {len(bad)} failure(s), listed under Failures (survivor, wrong "
                  "pin or false alarm)." if len(bad) else
              "**Exit 0**: every mutant is killed or flagged below the budget, pinned on its "
              "planted site, and the healthy twin passes the tiny checkpoint's checks."]
    lines += ["", "| mutant | family | dtype | planted | caught by | first divergent site "
              "(local) | verdict | floor ratio | pinned | outcome |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in df.itertuples(index=False):
        caught = r.caught_by or (f"none (warn in {r.check})" if r.flagged else "none")
        verdict = r.verdict or "-"
        if r.killed and r.verdict not in BAD:  # the first divergence grows into a failure
            verdict += f", then {r.kill_site}"
        lines.append(f"| {r.mutant} | {r.family} | {r.dtype} | {r.planted} | {caught} | "
                     f"{r.first_site or '-'} | {verdict} | {_num(r.floor_ratio)} | "
                     f"{'yes' if r.pinned else 'no'} | {r.outcome} |")
    from parity.commands.search import tests_module

    skipped = [(s, d) for s in tests_module("mutants").CATALOGUE for d in sorted(set(df["dtype"]))
               if d not in s.dtypes and s.name in set(df["mutant"])]
    if skipped:
        lines += ["", "Not run (equivalent mutants: in that dtype the planted change computes "
                  "what the healthy path does, up to rounding the healthy path already pays):"]
        lines += [f"- {s.name} in {d}" for s, d in skipped]
    if len(bad):
        lines += ["", "## Failures", ""]
        lines += [f"- {r['mutant']} / {r['family']} / {r['dtype']}: {outcome(r)}"
                  + (f" (first divergent site {r['first_site']}, expected the planted op in "
                     f"{r['planted']})" if outcome(r) == "wrong pin" else "")
                  for r in bad.to_dict("records")]
    if len(below):
        lines += ["", "## Flagged below the budget", "",
                  "A floor-ratio budget sees an error only when it is more than "
                  "`floor_ratio_fail` (8) times the dtype's rounding floor. A bug whose own "
                  "relative error is smaller (LayerNorm's unbiased variance: 1/(2d) = 0.8% at "
                  "d = 64; epsilon 1e-1 against a variance of ~1) stays below that line in bf16, "
                  "whose floor is 8x fp16's: it is flagged `warn` (floor ratio 2-8), not killed, "
                  "unless the stress checkpoint's large aligned q/k amplify it. This does not "
                  "fail the command (in fp16 it would). A check the healthy path already fails "
                  "on the stress checkpoint counts as n/a (`healthy_fails`).", ""]
        for r in below.itertuples(index=False):
            lines.append(f"- {r.mutant} / {r.family} / {r.dtype}: warn at {r.first_site} "
                         f"(floor ratio {_num(r.floor_ratio)} <= fail budget "
                         f"{_num(r.budget_fail)})"
                         + (f"; healthy path fails {r.healthy_fails}"
                            if isinstance(r.healthy_fails, str) and r.healthy_fails else ""))
    if seconds is not None:
        lines += ["", f"Measured in {seconds:.0f} s."]
    return "\n".join(lines) + "\n"


def write(out: Path, df: "pd.DataFrame", seconds: float | None = None) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    csv, md = out / "detection.csv", out / "detection.md"
    df.to_csv(csv, index=False)
    md.write_text(render(df, seconds))
    return {"csv": csv, "md": md}


def exit_code(df: "pd.DataFrame") -> int:
    """1 when a row's outcome is a failure (survivor, wrong pin, false alarm), else 0: a mutant
    flagged below the budget does not fail the command (the module's docstring)."""
    return 1 if len(failed(df)) else 0


# ----------------------------------------------------------------------------- CLI
def cmd_detection(a) -> int:
    import reference

    from parity.subjects import normalize_dtype

    for f in a.families or ():
        if f not in reference.FAMILIES:
            raise ParityError(f"unknown family {f!r} (choose from {', '.join(reference.FAMILIES)})")
    dtypes = [normalize_dtype(d) for d in a.dtypes]
    bad = [d for d in dtypes if d not in ("float16", "bfloat16")]
    if bad:
        raise ParityError(f"--dtypes: float16 and/or bfloat16, got {', '.join(bad)}")
    t0 = time.perf_counter()
    df = detection_table(a.families, dtypes, a.mutants,
                         progress=lambda m: print(f"  {m}", flush=True))
    if df.empty:
        raise ParityError("no catalogue entry applies to the chosen families")
    files = write(Path(a.out), df, time.perf_counter() - t0)
    for d, (k, n) in kill_rates(df).items():
        nb = int(((df["dtype"] == d) & (df["outcome"] == "flagged below the budget")).sum())
        print(f"{d}: {k}/{n} mutants killed"
              + (f", {nb} flagged below the budget (not a failure)" if nb else ""))
    for r in failed(df).to_dict("records"):
        print(f"FAILED {r['mutant']} / {r['family']} / {r['dtype']}: {outcome(r)}")
    print(f"wrote {files['md']} and {files['csv']}")
    return exit_code(df)

"""The verdict vocabulary of one compared site, shared by comparison, gate, report, search and
detection (a light module: no torch, NumPy or pandas).

Mildest first:
  not_exposed  the subject does not report a site the reference has (listed, never dropped; a
               failure instead when the policy's `[gate] require_sites` names it)
  pass / warn  within the budget / over the warn limit
  overflow     the reference itself exceeds the dtype's range at this site
  unmeasured   no floor ratio could be formed (NaN, or a non-finite floor beside a finite
               subject): never a pass
  fail         the subject's error is over budget (non-finite values where the reference fits
               included)
"""
from dataclasses import dataclass, field

VERDICTS = ("not_exposed", "pass", "warn", "overflow", "unmeasured", "fail")
FAILING = ("fail", "overflow", "unmeasured")
NOT_DIVERGENT = ("pass", "not_exposed")  # rows that are not a divergence


def worst(verdicts) -> str:
    """The most severe of `verdicts` ('pass' when there are none)."""
    return max(verdicts, key=VERDICTS.index, default="pass")


# Verdicts of a check (a gate row, a golden file, a tokenizer comparison): a check that did not
# run is `skip`, and says why.
CHECK_VERDICTS = ("pass", "warn", "fail", "skip")


@dataclass(kw_only=True)
class Result:
    """One verdict row of any check: what was checked (`name`), the verdict, one sentence why
    (`detail`) and the figures behind it. The gate's rows, a golden file's check, a foreign
    golden's summary and the tokenizer comparison are all Results; a comparison's per-site rows
    are the records of its DataFrame (engine.compare.COLUMNS)."""

    name: str
    verdict: str
    detail: str = ""
    figures: dict = field(default_factory=dict)

    @property
    def not_checked(self) -> str:
        """For a skipped check, what was not checked and why ("tokenizer not checked: ...")."""
        return not_checked(self.name, self.detail)

    def as_dict(self) -> dict:
        return {"check": self.name, "verdict": self.verdict, "detail": self.detail,
                "figures": self.figures}


def not_checked(name: str, detail: str) -> str:
    """The phrase a verdict line and a report headline give a skipped check."""
    return f"{name} not checked: {detail.removeprefix('not run: ')}"

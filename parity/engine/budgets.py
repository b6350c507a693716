"""Budgets and tolerances as data (`parity/engine/budgets.toml`), shared by tests, reports and the gate."""
from __future__ import annotations

import fnmatch
import functools
import math
from dataclasses import dataclass
import tomllib
from pathlib import Path

from parity.errors import ParityError

DEFAULT_FILE = Path(__file__).with_name("budgets.toml")


@functools.lru_cache(maxsize=8)
def load(path: str | None = None) -> dict:
    p = Path(path) if path else DEFAULT_FILE
    try:
        data = tomllib.loads(p.read_text())
    except OSError as e:
        raise ParityError(f"{p}: cannot read budgets file ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise ParityError(f"{p}: not valid TOML ({e})") from None
    if data.get("schema") != "parity-budgets/1":
        raise ParityError(f"{p}: schema is {data.get('schema')!r}, expected 'parity-budgets/1'")
    for name, t in data.get("tolerances", {}).items():
        if not isinstance(t, dict) or not t.get("reason"):
            raise ParityError(f"{p}: tolerance {name!r} has no reason")
    return data


def tolerance(name: str, kind: str | None = None, path: str | None = None) -> float:
    """A named agreement tolerance: `rel` or `abs` (whichever the entry has, or `kind`)."""
    t = load(path).get("tolerances", {}).get(name)
    if t is None:
        raise KeyError(f"no tolerance {name!r} in the budgets file")
    if kind is None:
        kind = "rel" if "rel" in t else "abs" if "abs" in t else next(
            k for k in t if k != "reason")
    return float(t[kind])


def cpu_capability() -> str:
    """torch's CPU kernel level, lowercased: `default`, `avx2`, `avx512` on x86-64 (lowered with
    ATEN_CPU_CAPABILITY=default|avx2|avx512); other platforms report other names."""
    import torch

    return torch.backends.cpu.get_cpu_capability().lower()


def cpu_tolerance(name: str, kind: str | None = None, capability: str | None = None,
                  path: str | None = None) -> float:
    """A tolerance whose value depends on torch's native CPU kernels: the entry's
    `[tolerances.<name>.by_cpu.<capability>]` value where one is given for `capability`
    (default: this process's, `cpu_capability()`), else the entry's own value, which holds on
    every measured level (budgets.toml gives the figures per level)."""
    t = load(path).get("tolerances", {}).get(name)
    if t is None:
        raise KeyError(f"no tolerance {name!r} in the budgets file")
    level = (t.get("by_cpu") or {}).get(capability or cpu_capability(), {})
    if kind is not None and kind in level:
        return float(level[kind])
    return tolerance(name, kind, path)


# ----------------------------------------------------------------------------- verdict budgets
VERDICT_KEYS = ("floor_ratio_warn", "floor_ratio_fail", "top1_min", "kl_max")
# a float64 subject has no rounding floor to be measured against: its limit is a plain rel_l2
# (required in [defaults.float64], optional elsewhere)
OPTIONAL_KEYS = ("rel_l2_max",)
# what the gate requires by default (a policy's [gate] table overrides): the sites a subject
# must expose (globs; `block-outputs` = every block's output stream) and the checks that may
# not be skipped (e.g. "tokenizer" for a release that ships tokenizer files)
DEFAULT_GATE = {"require_sites": ["logits", "block-outputs"], "require": []}
GATE_CHECKS = ("structure", "tokenizer", "golden", "subject", "determinism", "cache", "batch",
               "generation")
MATCH_KEYS = ("family", "variant", "site", "dtype", "mode", "checkpoint")


@dataclass(frozen=True)
class Budget:
    floor_ratio_warn: float
    floor_ratio_fail: float
    top1_min: float
    kl_max: float
    rel_l2_max: float = math.nan
    reason: str = ""


def validate_policy(data: dict, source: str) -> None:
    """Schema check of the verdict part of a budgets / policy file."""
    defaults = data.get("defaults")
    if not isinstance(defaults, dict) or not defaults:
        raise ParityError(f"{source}: no [defaults.<dtype>] tables")
    for dt, t in defaults.items():
        if not isinstance(t, dict):
            raise ParityError(f"{source}: defaults.{dt} is not a table")
        missing = [k for k in VERDICT_KEYS + (OPTIONAL_KEYS if dt == "float64" else ())
                   if k not in t]
        if missing:
            raise ParityError(f"{source}: defaults.{dt} lacks {', '.join(missing)}")
        _check_numbers(t, f"{source}: defaults.{dt}")
    overrides = data.get("overrides", [])
    if not isinstance(overrides, list):
        raise ParityError(f"{source}: overrides must be an array of tables ([[overrides]])")
    for n, o in enumerate(overrides):
        where = f"{source}: overrides[{n}]"
        if not isinstance(o, dict):
            raise ParityError(f"{where} is not a table")
        if not o.get("reason"):
            raise ParityError(f"{where} has no reason")
        unknown = [k for k in o if k not in VERDICT_KEYS + OPTIONAL_KEYS + MATCH_KEYS
                   + ("reason",)]
        if unknown:
            raise ParityError(f"{where} has unknown keys {', '.join(unknown)}")
        if not any(k in o for k in VERDICT_KEYS + OPTIONAL_KEYS):
            raise ParityError(f"{where} sets no budget ({', '.join(VERDICT_KEYS)})")
        _check_numbers(o, where)
    gate = data.get("gate", {})
    if not isinstance(gate, dict):
        raise ParityError(f"{source}: [gate] must be a table")
    unknown = [k for k in gate if k not in tuple(DEFAULT_GATE) + ("reason",)]
    if unknown:
        raise ParityError(f"{source}: [gate] has unknown keys {', '.join(unknown)} "
                          f"(known: {', '.join(DEFAULT_GATE)})")
    for k in DEFAULT_GATE:
        v = gate.get(k, [])
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ParityError(f"{source}: [gate] {k} must be a list of strings, got {v!r}")
    unknown = [r for r in gate.get("require", []) if r not in GATE_CHECKS]
    if unknown:
        raise ParityError(f"{source}: [gate] require names unknown checks {', '.join(unknown)} "
                          f"(known: {', '.join(GATE_CHECKS)})")


def _check_numbers(t: dict, where: str) -> None:
    for k in VERDICT_KEYS + OPTIONAL_KEYS:
        if k in t and (isinstance(t[k], bool) or not isinstance(t[k], (int, float))):
            raise ParityError(f"{where}: {k} must be a number, got {t[k]!r}")
        if k in t and t[k] < 0:
            raise ParityError(f"{where}: {k} must not be negative")


def load_policy(path: str | None = None) -> dict:
    data = load(path)
    validate_policy(data, str(path or DEFAULT_FILE))
    return data


def budget_for(policy: dict, *, dtype: str, family: str = "", variant: str = "", site: str = "",
               mode: str = "", checkpoint: str = "") -> Budget:
    """The budget of one site: the dtype's defaults, then every matching override in order."""
    base = policy["defaults"].get(dtype)
    if base is None:  # never judge a dtype by another dtype's limits
        raise ParityError(f"the budgets/policy file has no [defaults.{dtype}] table for a "
                          f"{dtype} subject (it has: {', '.join(sorted(policy['defaults']))})")
    vals = {k: float(base[k]) for k in VERDICT_KEYS + OPTIONAL_KEYS if k in base}
    reasons = []
    key = dict(family=family, variant=variant, site=site, dtype=dtype, mode=mode,
               checkpoint=checkpoint)
    for o in policy.get("overrides", []):
        if all(fnmatch.fnmatchcase(str(key[k]), str(o[k])) for k in MATCH_KEYS if k in o):
            vals.update({k: float(o[k]) for k in VERDICT_KEYS + OPTIONAL_KEYS if k in o})
            reasons.append(o["reason"])
    return Budget(**vals, reason="; ".join(reasons))


def gate_requirements(policy: dict | None) -> dict:
    """The policy's `[gate]` table over the defaults: `require_sites`, `require`."""
    gate = (policy or {}).get("gate", {})
    return {k: list(gate.get(k, v)) for k, v in DEFAULT_GATE.items()}


def required_sites(policy: dict | None) -> list[str]:
    return gate_requirements(policy)["require_sites"]

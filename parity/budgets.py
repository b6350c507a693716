"""Budgets and tolerances as data (`parity/budgets.toml`), shared by tests, reports and the gate."""
from __future__ import annotations

import functools
import tomllib
from pathlib import Path

from .errors import ParityError

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

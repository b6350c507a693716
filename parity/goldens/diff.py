"""How a stored golden tensor differs from its regeneration or from the reference: per-site
figures (max rel change, ULPs of the site's largest value, values changed)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class SiteDiff:
    """How one stored tensor compares with its regeneration (or with the reference)."""

    site: str
    dtype: str
    shape: tuple
    max_abs: float = 0.0
    rel: float = 0.0  # max |new - old| / max |old|
    max_ulp: float = 0.0  # in ULPs (of `dtype`) of the site's largest value: metrics.ulps_of_max
    changed: int = 0
    total: int = 0
    note: str = ""

    def describe(self) -> str:
        s = (f"max rel change {self.rel:.3g} (max abs {self.max_abs:.3g}, {_ulps(self.max_ulp)} "
             f"ULP of the site's largest {self.dtype} value, {self.changed} of {self.total} "
             "values changed)")
        return f"{s}; {self.note}" if self.note else s


def diff_arrays(site: str, old: np.ndarray, new: np.ndarray, dtype: str) -> SiteDiff:
    """Compare every element: finite values by size, non-finite ones (masked scores) by
    position and sign."""
    from parity.engine.metrics import ulps_of_max

    d = SiteDiff(site, dtype, tuple(old.shape), total=int(old.size))
    if old.shape != new.shape:
        d.rel = d.max_abs = d.max_ulp = math.inf
        d.changed = int(old.size)
        d.note = f"shape changed from {list(old.shape)} to {list(new.shape)}"
        return d
    same = (old == new) | (np.isnan(old) & np.isnan(new))
    d.changed = int((~same).sum())
    fin_o, fin_n = np.isfinite(old), np.isfinite(new)
    if ((fin_o != fin_n) | (~fin_o & ~same)).any():
        d.rel = d.max_abs = d.max_ulp = math.inf
        d.note = "non-finite values appeared, vanished or moved"
        return d
    if not fin_o.any():
        return d
    o, n = old[fin_o], new[fin_o]
    d.max_abs = float(np.abs(n - o).max())
    scale = float(np.abs(o).max())
    d.rel = 0.0 if d.max_abs == 0 else (d.max_abs / scale if scale > 0 else math.inf)
    d.max_ulp = float(ulps_of_max(n, o, dtype).max())
    return d



def _ulps(x: float) -> str:
    """A ULP figure (`metrics.ulps_of_max`: ULPs of the site's largest value) as text."""
    return "0" if x == 0 else f"{x:.3g}"

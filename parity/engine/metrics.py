"""Per-site error metrics of a subject against the float64 reference (DESIGN.md "Metrics").

All functions take float64 NumPy arrays of the same shape plus a boolean `valid` mask (the
elements that count: real tokens, visible score positions) and return plain floats.
"""
from __future__ import annotations

import math

import numpy as np

from reference import dtypes
from reference.dtypes import DTYPES
from reference.ops import round_to

DTYPE_MAX = {name: d.max for name, d in DTYPES.items()}
# unit roundoff u: round-to-nearest moves a value by at most u relative (uniformly within +-u
# for generic values, variance u^2/3)
UNIT_ROUNDOFF = {name: d.unit_roundoff for name, d in DTYPES.items()}


# ----------------------------------------------------------------------------- ULP distance
def ordered_bits(x: np.ndarray, dtype: str) -> np.ndarray:
    """Map values of `dtype` to integers whose difference is the number of representable values
    between them: sign-magnitude bits folded so that -0 and +0 both map to 0 and negative numbers
    count down. `x` must already hold values of that dtype (float64 carrier)."""
    x = np.asarray(x, dtype=np.float64)
    if dtype == "float16":
        b = x.astype(np.float16).view(np.uint16).astype(np.int64)
        sign, mag = b >> 15, b & 0x7FFF
    elif dtype == "bfloat16":
        b = x.astype(np.float32).view(np.uint32).astype(np.int64) >> 16
        sign, mag = b >> 15, b & 0x7FFF
    elif dtype == "float32":
        b = x.astype(np.float32).view(np.uint32).astype(np.int64)
        sign, mag = b >> 31, b & 0x7FFFFFFF
    elif dtype == "float64":
        b = x.view(np.int64)
        sign, mag = (b < 0).astype(np.int64), b & np.int64(0x7FFFFFFFFFFFFFFF)
    else:
        raise ValueError(f"no ULP scale for dtype {dtype!r}")
    return np.where(sign == 1, -mag, mag)


def ulp_distance(y: np.ndarray, r: np.ndarray, dtype: str) -> np.ndarray:
    """Representable steps of `dtype` between the subject value y and the reference r rounded to
    that dtype (0 = the subject holds the correctly rounded value). Non-finite pairs give inf."""
    rr = round_to(r, dtype) if dtype != "float64" else np.asarray(r, np.float64)
    yy = round_to(y, dtype) if dtype != "float64" else np.asarray(y, np.float64)
    fin = np.isfinite(rr) & np.isfinite(yy)
    d = np.abs(ordered_bits(np.where(fin, yy, 0.0), dtype)
               - ordered_bits(np.where(fin, rr, 0.0), dtype)).astype(np.float64)
    return np.where(fin, d, np.inf)


def ulps_of_max(y: np.ndarray, r: np.ndarray, dtype: str) -> np.ndarray:
    """|y - r| in units in the last place (of `dtype`) of the array's largest reference value
    max|r|: the ULP figure of a golden comparison. `ulp_distance` counts the representable
    values between y and r, and near zero there are astronomically many (two float64 values of
    +-1e-17, noise of a sum whose terms are ~1, are 9e18 steps apart), so a site's worst count
    says nothing. Counted in the spacing at the site's scale it reads as the size of the change:
    0 only for equal values, 1 for one rounding step of the largest value. Non-finite pairs
    give inf."""
    f = dtypes.facts(dtype)
    y = np.asarray(y, np.float64)
    r = np.asarray(r, np.float64)
    fin = np.isfinite(y) & np.isfinite(r)
    big = float(np.abs(r[fin]).max()) if fin.any() else 0.0
    tiny = 2.0 ** (f.min_exp - f.mantissa)  # the smallest subnormal: the finest spacing there is
    spacing = max(2.0 ** math.floor(math.log2(big)) * f.eps, tiny) if big > 0 else tiny
    return np.where(fin, np.abs(np.where(fin, y - r, 0.0)) / spacing, np.inf)


# ----------------------------------------------------------------------------- error figures
def rel_l2(y: np.ndarray, r: np.ndarray, valid: np.ndarray | None = None) -> float:
    """||y - r|| / ||r|| over the valid elements where r is finite (0/0 = 0; x/0 = inf). A
    non-finite y among them gives inf: dropping it would report an all-NaN y as exact."""
    y, r = _select(y, r, valid)
    if not np.isfinite(y).all():
        return math.inf
    num = float(np.sqrt(np.sum((y - r) ** 2)))
    den = float(np.sqrt(np.sum(r**2)))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def _select(y, r, valid):
    y = np.asarray(y, np.float64)
    r = np.asarray(r, np.float64)
    if valid is None:
        valid = np.isfinite(r)
    else:
        valid = np.broadcast_to(valid, r.shape) & np.isfinite(r)
    return y[valid], r[valid]


def site_metrics(y: np.ndarray, r: np.ndarray, dtype: str, valid: np.ndarray | None = None) -> dict:
    """max_abs, mean_abs, rel_l2, max_ulp, cosine, nonfinite, headroom, ref_max_abs."""
    ys, rs = _select(y, r, valid)
    nonfinite = int((~np.isfinite(ys)).sum())
    fin = np.isfinite(ys)
    d = np.abs(ys[fin] - rs[fin])
    ref_max = float(np.abs(rs).max()) if rs.size else 0.0
    out = {
        "max_abs": float(d.max()) if d.size else 0.0,
        "mean_abs": float(d.mean()) if d.size else 0.0,
        "rel_l2": rel_l2(ys, rs, None) if rs.size else 0.0,
        "max_ulp": float(ulp_distance(ys, rs, dtype).max()) if rs.size else 0.0,
        "cosine": _cosine(ys[fin], rs[fin]),
        "nonfinite": nonfinite,
        "headroom": (DTYPE_MAX[dtype] / ref_max) if ref_max > 0 else math.inf,
        "ref_max_abs": ref_max,
    }
    if nonfinite:
        out["rel_l2"] = math.inf
    return out


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float(np.dot(a.ravel(), b.ravel()) / (na * nb))


def floor_ratio(subject_err: float, floor_err: float) -> float:
    """How many times worse than the rounding floor. A floor error of exactly zero (e.g. fp16
    weights looked up unchanged) gives 1 for a zero subject error and inf otherwise."""
    if floor_err == 0.0:
        return 1.0 if subject_err == 0.0 else math.inf
    return subject_err / floor_err


# ----------------------------------------------------------------------------- logits
def log_softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def decisive_rows(r: np.ndarray, floor: np.ndarray, factor: float) -> np.ndarray:
    """Rows whose top-1 the dtype can decide: the reference's top-1 margin exceeds `factor` x
    the rounding floor's largest logit error in that row. On near-tied logits the floor itself
    flips the top-1, so an absolute top-1 limit there is a false alarm, not a finding."""
    top = np.argmax(r, axis=-1)
    second = np.sort(r, axis=-1)[:, -2] if r.shape[-1] > 1 else np.full(len(r), -np.inf)
    margin = r[np.arange(len(r)), top] - second
    err = np.abs(np.where(np.isfinite(floor), floor, np.inf) - r).max(axis=-1)
    return margin > factor * err


def logit_metrics(y: np.ndarray, r: np.ndarray, rows: np.ndarray | None = None,
                  floor: np.ndarray | None = None, margin_factor: float | None = None) -> dict:
    """top-1 agreement and mean KL(ref || subject) over the valid token rows (B, T), and with
    the floor's logits the floor's own KL (`floor_kl`).

    With the floor's logits and a margin factor, top-1 counts only the decisive rows (see
    `decisive_rows`); `top1_rows` says how many rows counted. With no decisive row top-1 is
    not measured: NaN, never a perfect 1.0."""
    y = np.asarray(y, np.float64).reshape(-1, r.shape[-1])
    r = np.asarray(r, np.float64).reshape(-1, r.shape[-1])
    f = None if floor is None else np.asarray(floor, np.float64).reshape(-1, r.shape[-1])
    if rows is not None:
        keep = np.asarray(rows, bool).reshape(-1)
        y, r = y[keep], r[keep]
        f = None if f is None else f[keep]
    if not r.size:
        return {"top1": math.nan, "kl": 0.0, "top1_rows": 0, "floor_kl": math.nan}
    counted = (np.ones(len(r), bool) if f is None or margin_factor is None
               else decisive_rows(r, f, margin_factor))
    agree = np.argmax(np.nan_to_num(y, nan=-np.inf), -1) == np.argmax(r, -1)
    top1 = float(np.mean(agree[counted])) if counted.any() else math.nan  # not measured
    lr = log_softmax(r)

    def kl_of(x):
        if not np.isfinite(x).all():
            return math.inf
        return max(float(np.mean(np.sum(np.exp(lr) * (lr - log_softmax(x)), axis=-1))), 0.0)

    return {"top1": top1, "kl": kl_of(y), "top1_rows": int(counted.sum()),
            "floor_kl": math.nan if f is None else kl_of(f)}


# ----------------------------------------------------------------------------- valid masks
def valid_mask(site: str, ref: np.ndarray, token_rows: np.ndarray | None) -> np.ndarray:
    """Elements that count at a site: real-token rows (B, T) broadcast over the site's layout,
    and for attention scores/probs only the key positions the reference lets a query see."""
    r = np.asarray(ref)
    if token_rows is None:
        token_rows = np.ones(r.shape[:1] + (_t_axis_len(site, r),), bool)
    rows = np.asarray(token_rows, bool)
    if site.endswith(("attn.q", "attn.k", "attn.v")):
        m = rows[:, None, :, None]
    elif site.endswith(("attn.scores", "attn.probs")):
        m = rows[:, None, :, None] & np.isfinite(r) if site.endswith("scores") else (
            rows[:, None, :, None] & np.ones(r.shape, bool))
    else:
        m = rows.reshape(rows.shape + (1,) * (r.ndim - 2))
    return np.broadcast_to(m, r.shape)


def score_noise(q: np.ndarray, k: np.ndarray, scores: np.ndarray, qk_dtype: str,
                score_dtype: str) -> np.ndarray:
    """(B, H, T, Tk) the typical (one standard deviation) error, in nats, that rounding puts
    into each pre-softmax score of any implementation storing q and k in `qk_dtype` and the
    scores in `score_dtype`: each q_i k_i carries the relative rounding errors of both factors
    (variance 2u^2/3 each product), the stored score its own (u_s^2/3). Computed from the
    reference alone (q, k after rotary; the score scale fitted from scores = c q.k), so it
    depends on neither the subject nor the rounding floor's luck."""
    s = np.asarray(scores, np.float64)
    vis = np.isfinite(s)
    var = UNIT_ROUNDOFF.get(score_dtype, 0.0) ** 2 / 3.0 * np.where(vis, s, 0.0) ** 2
    if q is None or k is None:
        return np.sqrt(var)
    q = np.asarray(q, np.float64)
    k = np.asarray(k, np.float64)
    if k.shape[:2] == q.shape[:2] and k.shape[2] == s.shape[-1]:  # no past keys held apart
        raw = q @ k.transpose(0, 1, 3, 2)
        rv = np.where(vis, raw, 0.0)
        den = float(np.sum(rv * rv))
        c = float(np.sum(np.where(vis, s, 0.0) * rv) / den) if den > 0 else 0.0
        var = var + (2.0 / 3.0) * UNIT_ROUNDOFF.get(qk_dtype, 0.0) ** 2 * c * c * (
            (q * q) @ (k * k).transpose(0, 1, 3, 2))
    return np.sqrt(var)


def ill_conditioned_rows(noise: np.ndarray, scores: np.ndarray, limit_nats: float) -> np.ndarray:
    """(B, H, T) query rows of one attention layer whose probabilities the dtype cannot
    resolve: some visible key's score carries a typical rounding error (`score_noise`) above
    `limit_nats` while the row has two or more keys to weigh. Scores are log-probabilities up to
    a shift, so an error of x nats moves a probability ratio by e^x: past 1 nat, which of two
    healthy roundings lands nearer the reference is luck, and comparing them is a lottery (the
    attention counterpart of top-1 on near-tied logits, `decisive_rows`)."""
    vis = np.isfinite(np.asarray(scores))
    worst = np.where(vis, noise, 0.0).max(axis=-1)
    return (vis.sum(axis=-1) >= 2) & (worst > limit_nats)


def exclude_rows(site: str, valid: np.ndarray, ill: np.ndarray) -> np.ndarray:
    """Drop ill-conditioned query rows (B, H, T) from a site's valid mask: whole rows of
    `attn.probs`, the head's slice of `attn.context` (heads merged: (B, T, H*hd)), and the
    token rows of `attn.out` where any head is ill-conditioned."""
    if site.endswith("attn.probs"):
        return valid & ~ill[..., None]
    if site.endswith("attn.context"):
        b, h, t = ill.shape
        hd = valid.shape[-1] // h
        return valid & ~np.repeat(ill.transpose(0, 2, 1), hd, axis=-1).reshape(b, t, h * hd)
    if site.endswith("attn.out"):  # the projection mixes heads: a row with any such head
        return valid & ~ill.any(axis=1)[..., None]
    return valid


def _t_axis_len(site, r):
    return r.shape[2] if site.endswith(("attn.q", "attn.k", "attn.v", "attn.scores",
                                        "attn.probs")) else r.shape[1]


# ----------------------------------------------------------------------------- where it diverges
def fmt_pair(x: float, limit: float) -> tuple[str, str]:
    """`x` and `limit` as text, `x` with enough significant digits that it never prints like a
    different limit ("floor_ratio 4.0003 > 4", not "4 > 4")."""
    b = f"{limit:g}"
    for digits in range(3, 18):
        a = f"{x:.{digits}g}"
        if a != b or x == limit:
            return a, b
    return repr(x), b


def over_limit(y: np.ndarray, r: np.ndarray, valid: np.ndarray, scale: float) -> dict:
    """Where a subject leaves its budget, element by element: the valid elements whose error
    |y - r| exceeds `scale` (e.g. the fail budget x the floor's root-mean-square error, the
    per-element reading of a floor ratio over budget), and the worst element's index in the
    site's own layout ((b, t, d) or (b, h, t, k)) with both values. Non-finite subject values
    count as over."""
    y = np.asarray(y, np.float64)
    r = np.asarray(r, np.float64)
    valid = np.broadcast_to(valid, r.shape) & np.isfinite(r)
    with np.errstate(invalid="ignore"):
        err = np.where(valid, np.abs(y - r), -1.0)
    err = np.where(valid & ~np.isfinite(y), np.inf, err)
    total = int(valid.sum())
    over = int(((err > scale) | np.isinf(err)).sum())  # a non-finite subject value is over
    idx = np.unravel_index(int(np.argmax(err)), err.shape) if err.size else ()
    return {"over": over, "total": total, "index": tuple(int(i) for i in idx),
            "subject": float(y[idx]) if err.size else math.nan,
            "reference": float(r[idx]) if err.size else math.nan}


def where_text(loc: dict, what: str) -> str:
    """'41 / 960 elements (4.3%) over <what>; worst at (0, 3, 7): subject 0.1234, reference
    0.1003' — the shape of torch.testing.assert_close's mismatch report."""
    share = 100.0 * loc["over"] / loc["total"] if loc["total"] else 0.0
    idx = ", ".join(map(str, loc["index"]))
    return (f"{loc['over']} / {loc['total']} elements ({share:.2g}%) over {what}; worst at "
            f"({idx}): subject {loc['subject']:.6g}, reference {loc['reference']:.6g}")


def floor_rms(f: np.ndarray, r: np.ndarray, valid: np.ndarray) -> float:
    """Root-mean-square error of the rounding floor over the valid elements: rel_l2 x ||r|| /
    sqrt(n), the element-level scale of a floor ratio."""
    f, r = _select(f, r, valid)
    return float(np.sqrt(np.mean((f - r) ** 2))) if r.size else 0.0

"""Consistency checks beyond one forward, judged by the same verdict budgets as `compare`.

A subject can match the reference on one full forward and still be wrong where people use it:

  cache    decoding with the KV cache. The subject runs the first `split` tokens, then the rest
           with `past` = its own cache; the decoded positions are compared with the reference's
           full forward, against the rounding floor of the full forward. A cache computes the
           same function in another order, so the same floor-relative budget applies.
  batch    batch rows and left padding. The subject runs the whole (padded) batch; the real
           positions of each row are compared with the reference of that row alone, unpadded
           (same position ids), against that row's own rounding floor. Pads that leak into real
           tokens, or rows that see each other, fail here.

Both run in `accumulated` and `local` mode like `compare` (local: every block is fed the
reference's input to it, so a divergence is pinned on the layer that makes it) and return the
long frame of `compare` (`parity.engine.compare.COLUMNS`) plus two columns: `check` and `case` (which
row, which split). `layers` wraps `compare` itself in the same frame, so a caller can put the
three checks side by side (`parity detection` does).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

import reference
from reference.sites import site_kind

from parity.engine import budgets as B
from parity.engine.compare import (COLUMNS, MODES, Subject, block_inputs, compare, floor_local, forward_local,
                      make_records, to_frame, token_rows, wide_sites)
from parity.devices import emulated
from parity.checkpoints.inputs import Inputs

CHECK_COLUMNS = COLUMNS + ["check", "case"]
CHECKS = ("layers", "cache", "batch")
PER_HEAD = ("attn.q", "attn.k", "attn.v", "attn.scores", "attn.probs")
KEYED = ("attn.scores", "attn.probs")


# ----------------------------------------------------------------------------- slicing sites
def query_axis(site: str) -> int:
    """Axis of the (new) token positions: 2 for per-head sites (B, H, T, ...), else 1."""
    return 2 if site_kind(site) in PER_HEAD else 1


def take(site: str, a: np.ndarray, rows=slice(None), queries=slice(None),
         keys=slice(None)) -> np.ndarray:
    """Rows, query positions and (for scores/probs) key positions of one site's array."""
    a = a[rows]
    a = a[(slice(None),) * query_axis(site) + (queries,)]
    if site_kind(site) in KEYED:
        a = a[..., keys]
    return a


def _cut(a, sl):
    return None if a is None else np.asarray(a)[:, sl]


# ----------------------------------------------------------------------------- running
def _model(ckpt, subject: Subject, model_factory):
    from parity.subjects import fast

    make = model_factory or fast.FastModel
    extra = {"compile": subject.compile} if subject.compile != "off" else {}
    return make(ckpt, subject.variant, dtype=subject.dtype, device=subject.device,
                emulate=subject.emulate, **extra)


def _floor(cfg, weights, inputs: Inputs, streams, dtype: str, wide: dict, mode: str):
    if dtype not in ("float16", "bfloat16", "float32"):
        return None
    if mode == "local":
        return floor_local(cfg, weights, inputs, streams, dtype, wide)
    return reference.forward(cfg, weights, inputs.input_ids, inputs.attention_mask,
                             inputs.position_ids, floor=dtype, floor_sites=wide).sites


def _records(ref, sub, flo, dtypes, rows, policy, *, mode, cfg, label, subject, meta, check,
             case):
    dtype = meta.get("dtype", subject.dtype)
    recs = make_records(ref, sub, flo, dtypes, rows, policy, mode=mode, family=cfg.family,
                        label=label, variant=subject.name, dtype=dtype,
                        subject_dtype=subject.dtype, device=meta.get("device", subject.device),
                        emulate=emulated(meta))
    for r in recs:
        r.update(check=check, case=case)
    return recs


def frame(records: list[dict]) -> pd.DataFrame:
    df = to_frame(records)
    for c in ("check", "case"):
        df[c] = [r[c] for r in records] if records else pd.Series(dtype=object)
    return df[CHECK_COLUMNS]


# ----------------------------------------------------------------------------- the checks
def layers_check(ckpt, inputs: Inputs, subjects, *, label="", modes=MODES, policy=None,
                 model_factory=None) -> pd.DataFrame:
    """`compare` in the frame of the other checks (check `layers`)."""
    df = compare(ckpt, inputs, list(subjects), label=label, modes=modes, policy=policy,
                 model_factory=model_factory)
    df["check"], df["case"] = "layers", ""
    return df[CHECK_COLUMNS]


def default_split(inputs: Inputs) -> int:
    """Half the tokens as the prompt, the rest decoded with the cache."""
    return max(1, inputs.input_ids.shape[1] // 2)


def decode_check(ckpt, inputs: Inputs, subjects, *, split: int | None = None, label="",
                 modes=MODES, policy=None, model_factory=None) -> pd.DataFrame:
    """Check `cache`: tokens [split, T) decoded with past = the subject's own cache of tokens
    [0, split), against the reference's full forward and its rounding floor."""
    cfg, weights = ckpt.config, ckpt.weights()
    policy = policy or B.load_policy()
    ids, mask, pos = inputs.input_ids, inputs.attention_mask, inputs.position_ids
    t = ids.shape[1]
    if t < 2:
        return frame([])
    s = default_split(inputs) if split is None else split
    if not 1 <= s < t:
        raise ValueError(f"split {s} outside [1, {t})")
    ref = reference.forward(cfg, weights, ids, mask, pos)
    streams = block_inputs(ref, cfg)
    head = Inputs(ids[:, :s], _cut(mask, slice(None, s)), _cut(pos, slice(None, s)))
    tail = Inputs(ids[:, s:], mask, _cut(pos, slice(s, None)))  # mask covers past + new
    rows = token_rows(inputs)
    rows = None if rows is None else rows[:, s:]
    tail_ref = {k: take(k, v, queries=slice(s, None)) for k, v in ref.sites.items()}
    records, floors = [], {}
    for subject in subjects:
        model = _model(ckpt, subject, model_factory)
        for mode in modes:
            if mode == "local":
                first = forward_local(model, head, [z[:, :s] for z in streams])
                out = forward_local(model, tail, [z[:, s:] for z in streams], past=first.cache)
            else:
                out = model.forward(tail, past=model.forward(head).cache)
            dtype = out.meta.get("dtype", subject.dtype)
            key = (mode, dtype, tuple(sorted(wide_sites(out.dtypes, dtype).items())))
            if key not in floors:
                flo = _floor(cfg, weights, inputs, streams, dtype, dict(key[2]), mode)
                floors[key] = None if flo is None else {
                    k: take(k, v, queries=slice(s, None)) for k, v in flo.items()}
            records += _records(tail_ref, out.sites, floors[key], dict(out.dtypes), rows, policy,
                                mode=mode, cfg=cfg, label=label, subject=subject,
                                meta=out.meta, check="cache", case=f"decode {s}..{t - 1}")
    return frame(records)


def batch_check(ckpt, inputs: Inputs, subjects, *, label="", modes=MODES, policy=None,
                model_factory=None) -> pd.DataFrame:
    """Check `batch`: each row's real positions in the (padded) batch against the reference of
    that row alone, unpadded, with the same position ids, and that row's rounding floor."""
    cfg, weights = ckpt.config, ckpt.weights()
    policy = policy or B.load_policy()
    ids, mask, pos = inputs.input_ids, inputs.attention_mask, inputs.position_ids
    b, t = ids.shape
    if b == 1 and (mask is None or np.all(mask != 0)):
        return frame([])  # one unpadded row: the batch is the row alone
    full_pos = np.broadcast_to(np.arange(t), (b, t)) if pos is None else np.asarray(pos)
    ref = reference.forward(cfg, weights, ids, mask, pos)
    streams = block_inputs(ref, cfg)
    alone = []
    for r in range(b):
        real = np.arange(t) if mask is None else np.flatnonzero(np.asarray(mask)[r] != 0)
        inp = Inputs(ids[r:r + 1, real], None, full_pos[r:r + 1, real].copy())
        ref_r = reference.forward(cfg, weights, inp.input_ids, None, inp.position_ids)
        alone.append((real, inp, ref_r, block_inputs(ref_r, cfg)))
    records, floors = [], {}
    for subject in subjects:
        model = _model(ckpt, subject, model_factory)
        for mode in modes:
            out = forward_local(model, inputs, streams) if mode == "local" else model.forward(inputs)
            dtype = out.meta.get("dtype", subject.dtype)
            wide = tuple(sorted(wide_sites(out.dtypes, dtype).items()))
            for r, (real, inp, ref_r, streams_r) in enumerate(alone):
                key = (r, mode, dtype, wide)
                if key not in floors:
                    floors[key] = _floor(cfg, weights, inp, streams_r, dtype, dict(wide), mode)
                sub = {k: take(k, v, slice(r, r + 1), real, real) for k, v in out.sites.items()}
                records += _records(ref_r.sites, sub, floors[key], dict(out.dtypes), None,
                                    policy, mode=mode, cfg=cfg, label=label, subject=subject,
                                    meta=out.meta, check="batch",
                                    case=f"row {r} ({t - len(real)} pads)")
    return frame(records)


RUNNERS = {"layers": layers_check, "cache": decode_check, "batch": batch_check}


def run_checks(ckpt, inputs: Inputs, subjects, checks=CHECKS, **kw) -> pd.DataFrame:
    """The named checks on one checkpoint and batch, concatenated."""
    frames = [RUNNERS[c](ckpt, inputs, subjects, **kw) for c in checks]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else frame([])


def first_divergent(df: pd.DataFrame, mode: str = "local") -> pd.DataFrame:
    """Per check / variant / dtype: the first site (execution order, first case) not passing."""
    bad = df[(df["mode"] == mode) & (df["verdict"] != "pass")]
    keys = ["check", "family", "checkpoint", "variant", "dtype"]
    return bad.groupby(keys, sort=False).head(1)[keys + ["case", "site", "layer", "verdict",
                                                         "reason", "floor_ratio"]]

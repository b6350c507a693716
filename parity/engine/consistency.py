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

from reference.sites import site_kind

from parity.engine import budgets as B
from parity.engine.compare import (COLUMNS, MODES, Subject, block_inputs, compare, floor_local, forward_local,
                      make_records, to_frame, token_rows, wide_sites)
from parity.devices import emulated
from parity.checkpoints.inputs import Inputs
from parity.engine.reference_runner import ReferenceRunner
from parity.engine.verdicts import FAILING, NOT_DIVERGENT, Result

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


def _floor(runner: ReferenceRunner, inputs: Inputs, streams, dtype: str, wide: dict, mode: str,
           sites=None):
    if dtype not in ("float16", "bfloat16", "float32"):
        return None
    if mode == "local":
        return floor_local(runner.cfg, runner.weights, inputs, streams, dtype, wide)
    return runner.forward(inputs, sites=sites, floor=dtype, floor_sites=wide).sites


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
                 modes=MODES, policy=None, model_factory=None, runner=None,
                 sites=None) -> pd.DataFrame:
    """Check `cache`: tokens [split, T) decoded with past = the subject's own cache of tokens
    [0, split), against the reference's full forward and its rounding floor. `runner`: the
    reference (default in memory; `ReferenceRunner(ckpt, bounded=True)` streams weights);
    `sites`: globs of the sites compared (block inputs and logits at least; default all)."""
    cfg = ckpt.config
    runner = runner or ReferenceRunner(ckpt)
    policy = policy or B.load_policy()
    ids, mask, pos = inputs.input_ids, inputs.attention_mask, inputs.position_ids
    t = ids.shape[1]
    if t < 2:
        return frame([])
    s = default_split(inputs) if split is None else split
    if not 1 <= s < t:
        raise ValueError(f"split {s} outside [1, {t})")
    ref = runner.forward(inputs, sites=sites)
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
                out = model.forward(tail, sites=sites,
                                    past=model.forward(head, sites=sites).cache)
            dtype = out.meta.get("dtype", subject.dtype)
            key = (mode, dtype, tuple(sorted(wide_sites(out.dtypes, dtype).items())))
            if key not in floors:
                flo = _floor(runner, inputs, streams, dtype, dict(key[2]), mode, sites)
                floors[key] = None if flo is None else {
                    k: take(k, v, queries=slice(s, None)) for k, v in flo.items()}
            records += _records(tail_ref, out.sites, floors[key], dict(out.dtypes), rows, policy,
                                mode=mode, cfg=cfg, label=label, subject=subject,
                                meta=out.meta, check="cache", case=f"decode {s}..{t - 1}")
    return frame(records)


def rows_alone(inputs: Inputs) -> list[tuple[np.ndarray, Inputs]] | None:
    """Each row of a batch alone: (its real positions in the batch, the row unpadded with the
    batch's position ids). None for one unpadded row (the batch is the row alone)."""
    ids, mask, pos = inputs.input_ids, inputs.attention_mask, inputs.position_ids
    b, t = ids.shape
    if b == 1 and (mask is None or np.all(mask != 0)):
        return None
    full_pos = np.broadcast_to(np.arange(t), (b, t)) if pos is None else np.asarray(pos)
    out = []
    for r in range(b):
        real = np.arange(t) if mask is None else np.flatnonzero(np.asarray(mask)[r] != 0)
        out.append((real, Inputs(ids[r:r + 1, real], None, full_pos[r:r + 1, real].copy())))
    return out


def batch_check(ckpt, inputs: Inputs, subjects, *, label="", modes=MODES, policy=None,
                model_factory=None, runner=None, sites=None) -> pd.DataFrame:
    """Check `batch`: each row's real positions in the (padded) batch against the reference of
    that row alone, unpadded, with the same position ids, and that row's rounding floor.
    `runner`, `sites`: as for `decode_check`."""
    cfg = ckpt.config
    runner = runner or ReferenceRunner(ckpt)
    policy = policy or B.load_policy()
    rows = rows_alone(inputs)
    if rows is None:
        return frame([])  # one unpadded row: the batch is the row alone
    t = inputs.input_ids.shape[1]
    ref = runner.forward(inputs, sites=sites)
    streams = block_inputs(ref, cfg)
    alone = []
    for real, inp in rows:
        ref_r = runner.forward(inp, sites=sites)
        alone.append((real, inp, ref_r, block_inputs(ref_r, cfg)))
    records, floors = [], {}
    for subject in subjects:
        model = _model(ckpt, subject, model_factory)
        for mode in modes:
            out = (forward_local(model, inputs, streams) if mode == "local"
                   else model.forward(inputs, sites=sites))
            dtype = out.meta.get("dtype", subject.dtype)
            wide = tuple(sorted(wide_sites(out.dtypes, dtype).items()))
            for r, (real, inp, ref_r, streams_r) in enumerate(alone):
                key = (r, mode, dtype, wide)
                if key not in floors:
                    floors[key] = _floor(runner, inp, streams_r, dtype, dict(wide), mode, sites)
                sub = {k: take(k, v, slice(r, r + 1), real, real) for k, v in out.sites.items()}
                records += _records(ref_r.sites, sub, floors[key], dict(out.dtypes), None,
                                    policy, mode=mode, cfg=cfg, label=label, subject=subject,
                                    meta=out.meta, check="batch",
                                    case=f"row {r} ({t - len(real)} pads)")
    return frame(records)


def _pool(site: str, arrays: list[np.ndarray]) -> np.ndarray:
    """Rows of one site, each a (1, ...) array over that row's own tokens, as one sequence in
    which each row sees only itself: token axes concatenated, attention scores and
    probabilities block-diagonal (-inf / 0 between rows: never visible, never counted)."""
    if len(arrays) == 1:
        return arrays[0]
    if site_kind(site) in KEYED:
        sizes = [a.shape[2] for a in arrays]
        n = sum(sizes)
        fill = -np.inf if site_kind(site) == "attn.scores" else 0.0
        out = np.full(arrays[0].shape[:2] + (n, n), fill)
        at = 0
        for a, m in zip(arrays, sizes):
            out[:, :, at:at + m, at:at + m] = a
            at += m
        return out
    return np.concatenate(arrays, axis=query_axis(site))


def pooled_batch_check(ckpt, inputs: Inputs, subject: Subject, *, label="", policy=None,
                       model_factory=None, runner=None, sites=None) -> pd.DataFrame:
    """Check `batch` as the gate runs it (accumulated mode): each row's real positions in the
    padded batch against the reference of that row alone, as `batch_check`, but judged once over
    every row pooled (rows side by side, each seeing only itself) rather than row by row, so that
    a short prompt (three tokens: a few dozen elements per site, where a floor ratio is noise)
    is judged within the whole batch, as the subject check judges it."""
    cfg = ckpt.config
    runner = runner or ReferenceRunner(ckpt)
    policy = policy or B.load_policy()
    rows = rows_alone(inputs)
    if rows is None:
        return frame([])
    b, mask = inputs.input_ids.shape[0], inputs.attention_mask
    model = _model(ckpt, subject, model_factory)
    out = model.forward(inputs, sites=sites)
    dtype = out.meta.get("dtype", subject.dtype)
    wide = wide_sites(out.dtypes, dtype)
    refs, subs, floors, starts, at = [], [], [], [], 0
    for r, (real, inp) in enumerate(rows):
        refs.append(runner.forward(inp, sites=sites).sites)
        floors.append(_floor(runner, inp, None, dtype, wide, "accumulated", sites))
        subs.append({k: take(k, v, slice(r, r + 1), real, real) for k, v in out.sites.items()})
        starts.append(f"row {r}: {at}..{at + len(real) - 1}")
        at += len(real)

    def pool(traces):
        return {k: _pool(k, [tr[k] for tr in traces]) for k in traces[0]
                if all(k in tr for tr in traces)}

    pads = 0 if mask is None else int((np.asarray(mask) == 0).sum())
    records = _records(pool(refs), pool(subs), None if floors[0] is None else pool(floors),
                       dict(out.dtypes), None, policy, mode="accumulated", cfg=cfg, label=label,
                       subject=subject, meta=out.meta, check="batch",
                       case=f"{b} rows pooled, {pads} pads (tokens {'; '.join(starts)})")
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


# ----------------------------------------------------------------------------- gate rows
def gate_sites(family: str) -> str:
    """What the gate's cache and batch rows compare: the embedding, every block's attention
    (q and k too: they tell which attention rows the dtype can resolve, `metrics.score_noise`)
    and output stream, the final LayerNorm and the logits (the sites that carry a cache or
    padding error; the rest of each block is the subject check's job), so that a deep model's
    traces stay small."""
    from reference.sites import block_output_site

    return ("embed,blocks.*.attn.q,blocks.*.attn.k,blocks.*.attn.scores,blocks.*.attn.probs,"
            f"blocks.*.{block_output_site(family)},ln_f,logits")


def gate_result(name: str, df: pd.DataFrame, what: str) -> Result:
    """One gate row from a consistency frame: the worst verdict, with figures (cases, sites
    compared and over budget, worst floor ratio, logits floor ratio and KL, non-finite values)
    and the first site that is not a pass, with its case and why."""
    from parity.engine.compare import overall

    judged = df[df["verdict"] != "not_exposed"]
    logits = df[df["site"] == "logits"]
    figures = {"cases": int(df["case"].nunique()), "sites_compared": int(len(judged)),
               "sites_over_budget": int(df["verdict"].isin(FAILING).sum()),
               "worst_floor_ratio": _num(judged["floor_ratio"].max()),
               "logits_floor_ratio": _num(logits["floor_ratio"].max()),
               "logits_kl": _num(logits["kl"].max()),
               "nonfinite": int(df["nonfinite"].fillna(0).sum())}
    v = overall(df)
    bad = df[~df["verdict"].isin(NOT_DIVERGENT)]
    if bad.empty:
        n = figures["cases"]
        detail = f"{what}: every site within budget" + (f" ({n} cases)" if n > 1 else "")
    else:
        b = bad.iloc[0]
        detail = (f"{what}: first divergent site {b['site']} ({b['case']}, {b['verdict']}: "
                  f"{b['reason']})")
    return Result(name=name, verdict={"pass": "pass", "warn": "warn"}.get(v, "fail"),
                  detail=detail, figures=figures)


def _num(x):
    import math

    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def gate_rows(ckpt, inputs: Inputs, subject: Subject, policy: dict, *, bounded: bool,
              label: str = "", progress=None) -> list[Result]:
    """The gate's `cache` and `batch` rows, in accumulated mode (the subject check runs both
    modes; `parity detection` runs these two in both to pin a layer). `bounded`: reference and
    floor stream their weights and the fast path keeps none (the gate's --impl fast)."""
    from reference import family

    from parity.engine.generation import subject_model

    runner = ReferenceRunner(ckpt, bounded=bounded)
    sites = gate_sites(ckpt.config.family)
    model = None

    def factory(ck, variant, **kw):  # one model for both rows
        nonlocal model
        model = model or subject_model(ck, subject, bounded=bounded)
        return model

    kw = dict(label=label, modes=("accumulated",), policy=policy, model_factory=factory,
              runner=runner, sites=sites)
    rows = []
    fam = family(ckpt.config.family)
    if progress:
        progress("cache")
    if subject.impl == "hf" and not fam.hf_cache:
        rows.append(Result(name="cache", verdict="skip",
                           detail=f"not run: transformers' {fam.hf_class} keeps no key/value "
                                  f"cache (the generation check re-runs the whole sequence "
                                  f"for each token instead)"))
    elif not getattr(factory(ckpt, subject.variant), "has_cache", True):
        rows.append(Result(name="cache", verdict="skip",
                           detail="not run: this subject takes no past key/value cache (a "
                                  "compiled transformers model; the generation check re-runs "
                                  "the whole sequence for each token instead)"))
    else:
        df = decode_check(ckpt, inputs, [subject], **kw)
        s = default_split(inputs)
        rows.append(gate_result("cache", df, f"tokens {s}..{inputs.input_ids.shape[1] - 1} "
                                             f"decoded with the subject's KV cache of 0..{s - 1}")
                    if len(df) else Result(name="cache", verdict="skip",
                                           detail="not run: the prompts are one token long"))
    if progress:
        progress("batch")
    df = pooled_batch_check(ckpt, inputs, subject, label=label, policy=policy,
                            model_factory=factory, runner=runner, sites=sites)
    rows.append(gate_result("batch", df, f"each of {inputs.input_ids.shape[0]} prompts in the "
                                         f"padded batch against itself alone (rows pooled)")
                if len(df) else Result(name="batch", verdict="skip",
                                       detail="not run: one unpadded prompt (the batch is the "
                                              "prompt alone)"))
    return rows

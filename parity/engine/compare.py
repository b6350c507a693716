"""Layer-by-layer comparison of subjects against the float64 reference (DESIGN.md "Metrics").

Two error figures per site:
  accumulated  the subject runs on its own stream from the embedding on;
  local        each subject block is fed the reference's input to that block, rounded to the
               subject's dtype, so a divergence is pinned on the layer that makes it.
Every figure is also expressed against the rounding floor (the same math with every weight,
matmul output and site output rounded once to the dtype) run in the same mode.

`compare(...)` returns a pandas DataFrame in long format, one row per
family x checkpoint x variant x dtype x device x mode x site.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

import reference
from reference import ops
from reference.model import make_context
from reference.sites import block_output_site, site_kind, site_layer

from parity.engine import budgets as B
from parity.engine import metrics as M
from parity.checkpoints.checkpoint import Checkpoint
from parity.devices import emulated
from parity.checkpoints.inputs import Inputs
from parity.subjects.compiled import split_label, variant_label
from parity.engine.verdicts import FAILING, NOT_DIVERGENT, VERDICTS, worst  # noqa: F401 (re-exported)

MODES = ("accumulated", "local")
# A logit row counts for top-1 agreement when the reference's top-1 margin exceeds this many
# times the error a subject at the fail budget may make (floor_ratio_fail x the floor's error):
# 2 leaves room for the floor's error and the subject's on both of the two leading logits.
DECISIVE_MARGIN = 2.0
COLUMNS = ["family", "checkpoint", "variant", "dtype", "device", "emulate", "mode", "site",
           "layer", "kind", "site_dtype", "max_abs", "mean_abs", "rel_l2", "max_ulp", "cosine",
           "floor_rel_l2", "floor_ratio", "nonfinite", "headroom", "ref_max_abs", "top1", "kl",
           "budget_warn", "budget_fail", "verdict", "reason"]


@dataclass(frozen=True, kw_only=True)
class Subject:
    """One implementation under test: a fast-path variant (preset, optionally with knob
    overrides) in a dtype on a device, eager or compiled (`compile`: 'off' | 'inductor' |
    'inductor+emulate_precision_casts', parity/subjects/compiled.py)."""

    variant: str = "hf"
    dtype: str = "float16"
    device: str = "cpu"
    emulate: bool | None = None
    impl: str = "fast"
    compile: str = "off"

    @property
    def name(self) -> str:
        """The variant column: the variant, or 'hf+compile=inductor' for a compiled one."""
        return variant_label(self.variant, self.compile)

    @property
    def label(self) -> str:
        return f"{self.name}/{self.dtype}"


# ----------------------------------------------------------------------------- reference side
def token_rows(inputs: Inputs) -> np.ndarray | None:
    """(B, T) real-token rows of the new tokens, or None when there is no padding."""
    if inputs.attention_mask is None:
        return None
    t = inputs.input_ids.shape[1]
    return np.asarray(inputs.attention_mask)[:, -t:] != 0


def block_inputs(trace: reference.Trace, cfg) -> list[np.ndarray]:
    """The stream entering each block, and (last) the stream entering the head."""
    out_site = block_output_site(cfg.family)
    return [trace["embed"]] + [trace[f"blocks.{i}.{out_site}"] for i in range(cfg.n_layer)]


def floor_local(cfg, weights, inputs: Inputs, streams: list[np.ndarray], dtype: str,
                floor_sites=None) -> dict:
    """The rounding floor run block by block on the reference's (rounded) inputs."""
    mod = reference.family_module(cfg.family)
    ctx, trace = make_context(cfg, weights, inputs.input_ids, inputs.attention_mask,
                              inputs.position_ids, floor=dtype, floor_sites=floor_sites)
    mod.embed(ctx, trace.input_ids)
    for i in range(cfg.n_layer):
        mod.block(ctx, i, ops.round_to(streams[i], dtype))
    mod.head(ctx, ops.round_to(streams[-1], dtype))
    return trace.sites


# ----------------------------------------------------------------------------- subject side
def subject_traces(ckpt: Checkpoint, inputs: Inputs, subject: Subject, streams, modes,
                   model_factory=None):
    """Sites of the subject in each mode: {mode: {site: float64 array}}, and site dtypes.
    `model_factory` (default `fast.FastModel`) builds the model from (ckpt, variant, dtype=,
    device=, emulate=): a hook for patched implementations (tests/mutants.py)."""
    from parity.subjects import fast

    make = model_factory or fast.FastModel
    extra = {"compile": subject.compile} if subject.compile != "off" else {}
    model = make(ckpt, subject.variant, dtype=subject.dtype, device=subject.device,
                 emulate=subject.emulate, **extra)
    out, dtypes, meta = {}, {}, {}
    if "accumulated" in modes:
        t = model.forward(inputs)
        out["accumulated"], dtypes, meta = t.sites, dict(t.dtypes), dict(t.meta)
    if "local" in modes:
        t = forward_local(model, inputs, streams)
        out["local"] = t.sites
        dtypes = dtypes or dict(t.dtypes)
        meta = meta or dict(t.meta)
    return out, dtypes, meta


def forward_local(model, inputs: Inputs, streams: list[np.ndarray], past=None) -> reference.Trace:
    """Local mode: each subject block fed the reference's stream into it, rounded to the
    subject's dtype (`streams[i]`: the input to block i for these tokens, `past`: an optional
    cache of earlier tokens)."""
    import torch

    with torch.no_grad():
        ctx = model.prepare(inputs, past=past)
        model.embed(ctx)
        for i in range(model.cfg.n_layer):
            model.block(ctx, i, streams[i])
        model.head(ctx, streams[-1])
        return model.finish(ctx)


# ----------------------------------------------------------------------------- rows and verdicts
def site_row(site, sub, ref, flo, rows, site_dtype, dtype, margin_factor=None,
             valid=None) -> dict:
    valid = M.valid_mask(site, ref, rows) if valid is None else valid
    m = M.site_metrics(sub, ref, site_dtype, valid)
    if flo is not None:
        fr = M.rel_l2(flo, ref, valid)
        m["floor_rel_l2"] = fr
        m["floor_ratio"] = M.floor_ratio(m["rel_l2"], fr)
    else:
        m["floor_rel_l2"] = math.nan
        m["floor_ratio"] = math.nan
    if site == "logits":
        m.update(M.logit_metrics(sub, ref, rows, floor=flo, margin_factor=margin_factor))
    else:
        m.update(top1=math.nan, kl=math.nan, top1_rows=0, floor_kl=math.nan)
    return m


def _rounds_to_inf(x: float, dtype: str) -> bool:
    """Beyond the dtype's max by half an ulp or more: |x| rounds to inf (just above the max,
    e.g. 65510 in fp16, it still rounds to the max and the dtype holds it)."""
    if dtype not in ("float16", "bfloat16", "float32"):
        return False
    with np.errstate(over="ignore"):
        return bool(np.isinf(ops.round_to(np.array([x], np.float64), dtype)[0]))


def verdict(m: dict, budget: B.Budget, site: str, site_dtype: str, dtype: str,
            where=None) -> tuple[str, str]:
    """pass / warn / fail / overflow / unmeasured, with the reason in one sentence.

    `where(scale, what)` (optional) names how many elements exceed an element-level limit and
    the worst one (`metrics.where_text`). A float64 subject is held to the policy's
    `rel_l2_max` (it has no rounding floor)."""
    where = where or (lambda scale, what: "")
    limit = M.DTYPE_MAX.get(site_dtype, math.inf)
    if m["ref_max_abs"] > limit and _rounds_to_inf(m["ref_max_abs"], site_dtype):
        return "overflow", (f"reference max |x| = {m['ref_max_abs']:.3g} exceeds {site_dtype} max "
                            f"{limit:.6g}: the dtype cannot hold this site")
    if m["nonfinite"]:
        return "fail", _join(f"{m['nonfinite']} non-finite values where the reference is finite "
                             f"(max |x| {m['ref_max_abs']:.3g}, headroom {m['headroom']:.3g})",
                             where(math.inf, "the dtype's range (non-finite)"))
    if dtype == "float64":
        tol = budget.rel_l2_max
        if not m["rel_l2"] <= tol:
            a, b = M.fmt_pair(m["rel_l2"], tol)
            return "fail", _join(f"rel_l2 {a} > {b} in float64",
                                 where(tol * m["ref_max_abs"], f"{b} x max |reference|"))
        return "pass", ""
    fr = m["floor_ratio"]
    floor_err = m.get("floor_rel_l2", 0.0)
    if math.isnan(fr) or not math.isfinite(floor_err):
        return "unmeasured", (f"floor ratio not measured: the rounding floor's error is "
                              f"{floor_err:.3g} beside a subject error of {m['rel_l2']:.3g}")
    if site == "logits":
        if math.isnan(m["top1"]):
            pass  # no decisive row: top-1 is not measured here (the floor ratio and KL still are)
        elif m["top1"] < budget.top1_min:
            a, b = M.fmt_pair(m["top1"], budget.top1_min)
            return "fail", (f"top-1 agreement {a} < {b} over {m.get('top1_rows', 0)} decisive "
                            f"rows")
        # KL grows as the square of the logit error: a subject at the fail budget may reach
        # floor_ratio_fail^2 x the floor's own KL, so an absolute limit below what the dtype
        # itself reaches would be a lottery
        floor_kl = m.get("floor_kl", math.nan)
        kl_limit = budget.kl_max if not math.isfinite(floor_kl) else max(
            budget.kl_max, budget.floor_ratio_fail ** 2 * floor_kl)
        if not m["kl"] <= kl_limit:
            a, b = M.fmt_pair(m["kl"], kl_limit)
            why = "" if kl_limit == budget.kl_max else (
                f" (= {budget.floor_ratio_fail:g}^2 x the floor's KL {floor_kl:.3g})")
            return "fail", f"KL {a} > {b}{why}"
    for v, lim in (("fail", budget.floor_ratio_fail), ("warn", budget.floor_ratio_warn)):
        if fr > lim:
            a, b = M.fmt_pair(fr, lim)
            return v, _join(f"floor_ratio {a} > {b}",
                            where(lim * m.get("floor_rms", math.nan),
                                  f"{b} x the floor's rms error"))
    return "pass", ""


def _join(head: str, tail: str) -> str:
    return f"{head}: {tail}" if tail else head


def wide_sites(dtypes: dict, dtype: str) -> dict:
    """Sites a subject keeps wider than its dtype (upcast scores, fp32 softmax): the rounding
    floor rounds those to that width, so it is the best implementation of the same layout."""
    return {k: v for k, v in dtypes.items() if v != dtype and k != "logits"}


def required_site(site: str, family: str, patterns) -> bool:
    """Whether the policy requires the subject to expose `site` (globs; `block-outputs` stands
    for every block's output stream)."""
    import fnmatch

    out = f"blocks.*.{block_output_site(family)}"
    return any(fnmatch.fnmatchcase(site, out if p == "block-outputs" else p) for p in patterns)


def make_records(ref_sites: dict, sub_sites: dict, floor_sites: dict | None, dtypes: dict,
                 rows, policy: dict, *, mode: str, family: str, label: str, variant: str,
                 dtype: str, subject_dtype: str, device: str, emulate: bool,
                 state: dict | None = None) -> list[dict]:
    """One record per site of the reference, in reference order.

    A site the subject does not expose gets a row of its own (`not_exposed`, or `fail` when the
    policy's `[gate] require_sites` names it): nothing is dropped silently. Non-finite values
    downstream of a site whose reference exceeds the dtype's range are that overflow's
    consequence, not a parity failure: they get the verdict `overflow` too, with the origin in
    the reason. `state` carries the origin across calls (the lockstep's layers); in local mode
    it ends with the layer, since the next block starts from the reference."""
    state = {} if state is None else state
    required = B.required_sites(policy)
    resolvable = B.tolerance("attention_resolvable")  # nats: attention rows the dtype resolves
    base_variant = split_label(variant)[0]  # a compiled subject keeps its variant's budgets
    common = dict(family=family, checkpoint=label, variant=variant, dtype=subject_dtype,
                  device=device, emulate=emulate, mode=mode)
    out = []
    for site, r in ref_sites.items():
        if mode == "local" and state.get("layer", -1) != site_layer(site):
            state.pop("origin", None)
            state["layer"] = site_layer(site)
        if site not in sub_sites:
            req = required_site(site, family, required)
            out.append(dict(common, site=site, layer=site_layer(site), kind=site_kind(site),
                            site_dtype=dtypes.get(site, dtype), nonfinite=0,
                            verdict="fail" if req else "not_exposed",
                            reason="not exposed by the subject" + (
                                " (required by the policy: [gate] require_sites)" if req
                                else "")))
            continue
        sdt = dtypes.get(site, dtype)
        budget = B.budget_for(policy, dtype=dtype, family=family, variant=base_variant,
                              site=site, mode=mode, checkpoint=label)
        flo = None if floor_sites is None else floor_sites.get(site)
        y = sub_sites[site]
        valid = full = M.valid_mask(site, r, rows)
        note = ""
        if site.endswith("attn.scores") and dtype in M.UNIT_ROUNDOFF:  # this layer's conditioning
            pre = site[: -len("scores")]
            noise = M.score_noise(ref_sites.get(pre + "q"), ref_sites.get(pre + "k"), r,
                                  dtypes.get(pre + "q", dtype), sdt)
            state["ill"] = M.ill_conditioned_rows(noise, r, resolvable)
            if rows is not None:
                state["ill"] &= np.asarray(rows, bool)[:, None, :]
        elif site.endswith(("attn.probs", "attn.context", "attn.out")) and "ill" in state:
            ill = state["ill"]
            if ill.any():
                valid = M.exclude_rows(site, valid, ill)
                n_rows = ill.size if rows is None else int(np.asarray(rows).sum()) * ill.shape[1]
                note = (f"{int(ill.sum())} of {n_rows} query rows not judged: {dtype} cannot "
                        f"resolve them (rounding puts more than {resolvable:g} nat of typical "
                        f"error into a score)")
        # top-1 counts the rows a subject within budget cannot flip (DECISIVE_MARGIN)
        m = site_row(site, y, r, flo, rows, sdt, dtype,
                     margin_factor=DECISIVE_MARGIN * budget.floor_ratio_fail, valid=valid)
        if note:  # rows not judged still may not hide a non-finite value
            m["nonfinite"] = int((~np.isfinite(np.asarray(y)[full & np.isfinite(r)])).sum())
            if m["nonfinite"]:
                m["rel_l2"], m["floor_ratio"] = math.inf, math.inf
        if flo is not None:
            m["floor_rms"] = M.floor_rms(flo, r, valid)
        v, why = verdict(m, budget, site, sdt, dtype,
                         where=lambda scale, what: M.where_text(
                             M.over_limit(y, r, valid, scale), what))
        if v == "overflow":
            state.setdefault("origin", (site, m["ref_max_abs"], sdt))
        elif v in ("fail", "unmeasured") and "origin" in state and (
                m["nonfinite"] or not math.isfinite(m["floor_ratio"])
                or not math.isfinite(m["floor_rel_l2"])):
            o = state["origin"]
            v, why = "overflow", (f"inherited from {o[0]}, where the reference (max |x| "
                                  f"{o[1]:.3g}) exceeds {o[2]}: {why}")
        if note and not valid.any():  # the dtype cannot resolve any row of this site
            v, why = "unmeasured", (f"not measured: every query row is ill-conditioned in "
                                    f"{sdt} ({note})")
        elif note:
            why = f"{why}; {note}" if why else note
        out.append(dict(
            common, site=site, layer=site_layer(site), kind=site_kind(site),
            site_dtype=sdt, budget_warn=budget.floor_ratio_warn,
            budget_fail=budget.floor_ratio_fail, verdict=v, reason=why,
            **{k: m[k] for k in ("max_abs", "mean_abs", "rel_l2", "max_ulp", "cosine",
                                 "floor_rel_l2", "floor_ratio", "nonfinite", "headroom",
                                 "ref_max_abs", "top1", "kl")}))
    return out


def to_frame(records: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame.from_records(records, columns=COLUMNS)
    df["layer"] = df["layer"].astype("Int64")
    return df


def compare(ckpt: Checkpoint, inputs: Inputs, subjects: list[Subject], *, label: str = "",
            modes=MODES, policy: dict | None = None, ref_trace=None, progress=None,
            model_factory=None) -> pd.DataFrame:
    """Compare every subject with the reference on one checkpoint; long-format DataFrame."""
    cfg = ckpt.config
    policy = policy or B.load_policy()
    weights = ckpt.weights()
    ref = ref_trace or reference.forward(cfg, weights, inputs.input_ids, inputs.attention_mask,
                                         inputs.position_ids)
    rows = token_rows(inputs)
    streams = block_inputs(ref, cfg)
    floors: dict[tuple[str, str], dict] = {}
    records = []
    for subject in subjects:
        traces, dtypes, meta = subject_traces(ckpt, inputs, subject, streams, modes,
                                              model_factory)
        dtype = meta.get("dtype", subject.dtype)  # the fp32 preset forces float32
        # the floor in the subject's own storage dtypes: a site the subject keeps wider (upcast
        # scores, fp32 softmax) is rounded to that width in the floor too
        wide = wide_sites(dtypes, dtype)
        key = (dtype, tuple(sorted(wide.items())))
        if dtype in ("float16", "bfloat16", "float32") and key not in floors:
            floors[key] = {
                "accumulated": reference.forward(
                    cfg, weights, inputs.input_ids, inputs.attention_mask, inputs.position_ids,
                    floor=dtype, floor_sites=wide).sites,
                "local": floor_local(cfg, weights, inputs, streams, dtype, wide)}
        for mode in modes:
            flo = floors.get(key, {}).get(mode)
            records += make_records(ref.sites, traces[mode], flo, dtypes, rows, policy, mode=mode,
                                    family=cfg.family, label=label, variant=subject.name,
                                    dtype=dtype, subject_dtype=subject.dtype,
                                    device=meta.get("device", subject.device),
                                    emulate=emulated(meta))
        if progress:
            progress(subject)
    return to_frame(records)


def first_divergent(df: pd.DataFrame, mode: str = "accumulated") -> pd.DataFrame:
    """Per family/checkpoint/variant/dtype: the first site (execution order) not passing."""
    bad = df[(df["mode"] == mode) & ~df["verdict"].isin(NOT_DIVERGENT)]
    keys = ["family", "checkpoint", "variant", "dtype"]
    return bad.groupby(keys, sort=False).head(1)[keys + ["site", "layer", "verdict", "reason",
                                                         "floor_ratio"]]


def overall(df: pd.DataFrame) -> str:
    """The worst verdict of any row ('pass' for an empty frame); `not_exposed` alone is a pass."""
    return worst(set(df["verdict"]) - {"not_exposed"})

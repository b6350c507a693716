"""Bounded-memory lockstep comparison (issue 6): reference, rounding floor and subject advance
one layer at a time from lazily read weights, each layer's sites are compared and dropped.

Memory stays flat in depth: no weight is kept after its layer, the float64 copies of large
matrices are made in row chunks (`StreamingContext.matmul`), the embedding gathers only the
rows the prompts use, and the LM head is applied in vocabulary chunks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

import reference
from reference import ops
from reference.model import Context, make_context
from reference.sites import block_output_site

from . import budgets as B
from .checkpoint import Checkpoint, LazyWeights
from .compare import make_records, to_frame, token_rows
from .inputs import Inputs

CHUNK_ELEMENTS = 1 << 24  # float64 elements converted at once (128 MiB)


@dataclass
class StreamingContext(Context):
    """A reference Context that reads big weights from the checkpoint in chunks."""

    ckpt: Checkpoint | None = None
    weight_dtype: str | None = None  # floor: round weights to this dtype

    def _f64(self, t: torch.Tensor) -> np.ndarray:
        a = t.to(torch.float64).numpy()
        return ops.round_to(a, self.weight_dtype) if self.weight_dtype else a

    def gather(self, name, index):
        idx = np.asarray(index)
        uniq, inv = np.unique(idx, return_inverse=True)
        rows = self._f64(self.ckpt.rows(name, uniq))
        return rows[inv.reshape(idx.shape)]

    def matmul(self, x, name, transpose):
        t = self.ckpt.tensor(name)  # as stored (e.g. fp16), memory-mapped
        out_dim = t.shape[0] if transpose else t.shape[1]
        in_dim = t.shape[1] if transpose else t.shape[0]
        step = max(1, CHUNK_ELEMENTS // max(in_dim, 1))
        y = np.empty(x.shape[:-1] + (out_dim,), dtype=np.float64)
        for a in range(0, out_dim, step):
            b = min(out_dim, a + step)
            if transpose:
                y[..., a:b] = x @ self._f64(t[a:b]).T
            else:
                y[..., a:b] = x @ self._f64(t[:, a:b])
        return y


def lockstep(ckpt: Checkpoint, inputs: Inputs, model, *, policy: dict | None = None,
             label: str = "", variant: str = "", progress=None):
    """Compare a FastModel (built with cache_weights=False) against the reference and the floor,
    layer by layer, in both modes. Returns (DataFrame, subject logits, reference logits)."""
    cfg = ckpt.config
    mod = reference.family_module(cfg.family)
    policy = policy or B.load_policy()
    dtype = model.meta()["dtype"]
    floor = dtype if dtype in ("float16", "bfloat16", "float32") else None
    small = LazyWeights(ckpt, cache=False)
    args = (inputs.input_ids, inputs.attention_mask, inputs.position_ids)

    def ctx(floor_dtype=None):
        w = small if floor_dtype is None else reference.model.RoundedWeights(small, floor_dtype)
        return make_context(cfg, w, *args, floor=floor_dtype, context_cls=StreamingContext,
                            ckpt=ckpt, weight_dtype=floor_dtype)

    ref_ctx, ref_tr = ctx()
    fa_ctx, fa_tr = ctx(floor) if floor else (None, None)
    fl_ctx, fl_tr = ctx(floor) if floor else (None, None)
    rows = token_rows(inputs)
    meta = model.meta()
    common = dict(family=cfg.family, label=label, variant=variant or model.variant, dtype=dtype,
                  subject_dtype=dtype, device=meta.get("device", "cpu"),
                  emulate=str(meta.get("emulate", "")) in ("True", "on", "true"))
    records: list[dict] = []
    with torch.no_grad():
        acc, loc = model.prepare(inputs), model.prepare(inputs)

        def compare_and_drop():
            wide = {k: v for k, v in acc.trace.dtypes.items() if v != dtype and k != "logits"}
            for c in (fa_ctx, fl_ctx):
                if c is not None:
                    c.floor_sites.update(wide)
            return wide

        def emit():
            for mode, sub, flo in (("accumulated", acc.trace, fa_tr), ("local", loc.trace, fl_tr)):
                records.extend(make_records(ref_tr.sites, sub.sites,
                                            None if flo is None else flo.sites,
                                            {**acc.trace.dtypes, **loc.trace.dtypes}, rows,
                                            policy, mode=mode, **common))
            for t in (ref_tr, acc.trace, loc.trace, fa_tr, fl_tr):
                if t is not None:
                    t.sites.clear()

        h_ref = mod.embed(ref_ctx, ref_tr.input_ids)
        h_sub = model.embed(acc)
        model.embed(loc)
        h_fa = mod.embed(fa_ctx, fa_tr.input_ids) if floor else None
        if floor:
            mod.embed(fl_ctx, fl_tr.input_ids)
        emit()
        for i in range(cfg.n_layer):
            h_sub_next = model.block(acc, i, h_sub)
            model.block(loc, i, h_ref)
            compare_and_drop()
            if floor:
                h_fa = mod.block(fa_ctx, i, h_fa)
                mod.block(fl_ctx, i, ops.round_to(h_ref, floor))
            h_ref = mod.block(ref_ctx, i, h_ref)
            h_sub = h_sub_next
            emit()
            if progress:
                progress(i)
        sub_logits = model.head(acc, h_sub)
        model.head(loc, h_ref)
        if floor:
            mod.head(fa_ctx, h_fa)
            mod.head(fl_ctx, ops.round_to(h_ref, floor))
        mod.head(ref_ctx, h_ref)
        ref_logits = ref_ctx.last_logits
        for t, c in ((ref_tr, ref_ctx), (fa_tr, fa_ctx), (fl_tr, fl_ctx)):
            if t is not None:  # logits last, as the trace driver does
                t.sites["logits"] = c.last_logits
        acc.trace.sites["logits"] = model.to_numpy(sub_logits)
        loc.trace.sites["logits"] = model.to_numpy(loc.logits)
        acc.trace.dtypes["logits"] = loc.trace.dtypes["logits"] = dtype
        emit()
    return to_frame(records), acc_logits_np(model, sub_logits), ref_logits


def acc_logits_np(model, t):
    return model.to_numpy(t)

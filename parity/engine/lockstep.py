"""Bounded-memory lockstep comparison: reference, rounding floor and subject advance
one layer at a time from lazily read weights; each layer's sites are compared, then dropped.

Memory stays flat in depth: no weight is kept after its layer, float64 copies of large matrices
are made in row chunks (`StreamingContext.matmul`), the embedding gathers only the rows the
prompts use, and the LM head runs in vocabulary chunks (the fast path does the same with
`cache_weights=False`). The two floor streams (accumulated, and local: fed the rounded reference
stream) run as one batch of 2B rows — blocks are row-independent — so each weight is read and
converted twice per layer (reference, floor), not three times.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

import reference
from reference import ops
from reference.model import Context, RoundedWeights, make_context

from parity.engine import budgets as B
from parity.checkpoints.checkpoint import Checkpoint, LazyWeights
from parity.engine.compare import make_records, to_frame, token_rows, wide_sites
from parity.devices import emulated
from parity.checkpoints.inputs import Inputs

CHUNK_ELEMENTS = 1 << 24  # weight elements converted to float64 at once (128 MiB)
_NARROW = {"float16": (torch.float16,), "bfloat16": (torch.bfloat16,),
           "float32": (torch.float16, torch.bfloat16, torch.float32)}


@dataclass
class StreamingContext(Context):
    """A reference Context that reads big weights from the checkpoint in chunks."""

    ckpt: Checkpoint | None = None
    weight_dtype: str | None = None  # floor: round weights to this dtype

    def _f64(self, t: torch.Tensor) -> np.ndarray:
        """float64 copy of a stored chunk, rounded to the floor's dtype. Stored values that the
        dtype already holds need no rounding; float32 storage rounds correctly through torch's
        single conversion; float64 storage through round_to (torch would round twice)."""
        dt = self.weight_dtype
        if dt is None or t.dtype in _NARROW.get(dt, ()):
            return t.to(torch.float64).numpy()
        if t.dtype == torch.float32:
            return t.to(getattr(torch, dt)).to(torch.float64).numpy()
        return ops.round_to(t.to(torch.float64).numpy(), dt)

    def gather(self, name, index):
        idx = np.asarray(index)
        uniq, inv = np.unique(idx, return_inverse=True)
        rows = self._f64(self.ckpt.rows(name, uniq))
        return rows[inv.reshape(idx.shape)]

    def matmul(self, x, name, transpose):
        t = self.ckpt.tensor(name)  # as stored (e.g. fp16)
        out_dim = t.shape[0] if transpose else t.shape[1]
        in_dim = t.shape[1] if transpose else t.shape[0]
        step = max(1, CHUNK_ELEMENTS // max(in_dim, 1))
        y = np.empty(x.shape[:-1] + (out_dim,), dtype=np.float64)
        for a in range(0, out_dim, step):
            b = min(out_dim, a + step)
            # the GEMM stays NumPy's: the reference shares no kernel with the subject under test
            w = self._f64(t[a:b] if transpose else t[:, a:b])
            y[..., a:b] = self.mm(x, w.T if transpose else w)
        return y


def _twice(a):
    return None if a is None else np.concatenate([a, a], axis=0)


def lockstep(ckpt: Checkpoint, inputs: Inputs, model, *, policy: dict | None = None,
             label: str = "", variant: str = "", progress=None, keep=None):
    """Compare a FastModel (built with cache_weights=False) against the reference and the floor,
    layer by layer, in both modes. Returns (DataFrame, kept subject sites): `keep(site)` selects
    accumulated subject sites to return (e.g. block outputs for a determinism check)."""
    cfg = ckpt.config
    mod = reference.family_module(cfg.family)
    policy = policy or B.load_policy()
    meta = model.meta()
    dtype = meta["dtype"]
    floor = dtype if dtype in ("float16", "bfloat16", "float32") else None
    small = LazyWeights(ckpt, cache=False)
    ids, mask, pos = inputs.input_ids, inputs.attention_mask, inputs.position_ids
    b = ids.shape[0]
    if pos is None:
        pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)

    ref_ctx, ref_tr = make_context(cfg, small, ids, mask, pos, context_cls=StreamingContext,
                                   ckpt=ckpt)
    if floor:  # rows [0, B): accumulated floor; rows [B, 2B): local floor
        f_ctx, f_tr = make_context(cfg, RoundedWeights(small, floor), _twice(ids), _twice(mask),
                                   _twice(pos), floor=floor, context_cls=StreamingContext,
                                   ckpt=ckpt, weight_dtype=floor)
    rows = token_rows(inputs)
    common = dict(family=cfg.family, label=label, variant=variant or model.variant, dtype=dtype,
                  subject_dtype=dtype, device=meta.get("device", "cpu"),
                  emulate=emulated(meta))
    records: list[dict] = []
    kept: dict[str, np.ndarray] = {}
    states = {"accumulated": {}, "local": {}}  # overflow origins carried across layers

    with torch.no_grad():
        acc, loc = model.prepare(inputs), model.prepare(inputs)

        def emit():
            """Compare what the last step recorded, then drop it."""
            dts = {**acc.trace.dtypes, **loc.trace.dtypes}
            fa = fl = None
            if floor:
                fa = {k: v[:b] for k, v in f_tr.sites.items()}
                fl = {k: v[b:] for k, v in f_tr.sites.items()}
            for mode, sub, flo in (("accumulated", acc.trace, fa), ("local", loc.trace, fl)):
                records.extend(make_records(ref_tr.sites, sub.sites, flo, dts, rows, policy,
                                            mode=mode, state=states[mode], **common))
            if keep:
                kept.update({k: v for k, v in acc.trace.sites.items() if keep(k)})
            for t in (ref_tr, acc.trace, loc.trace) + ((f_tr,) if floor else ()):
                t.sites.clear()

        def widen():
            """The floor keeps wide what the subject keeps wide (e.g. upcast scores)."""
            if floor:
                f_ctx.floor_sites.update(wide_sites(acc.trace.dtypes, dtype))

        h_ref = mod.embed(ref_ctx, ids)
        h_sub = model.embed(acc)
        model.embed(loc)
        h_f = mod.embed(f_ctx, f_tr.input_ids) if floor else None
        emit()
        for i in range(cfg.n_layer):
            h_sub_next = model.block(acc, i, h_sub)
            model.block(loc, i, h_ref)
            widen()
            if floor:  # accumulated rows continue; local rows restart from the reference
                h_f = mod.block(f_ctx, i, np.concatenate([h_f[:b], ops.round_to(h_ref, floor)]))
            h_ref = mod.block(ref_ctx, i, h_ref)
            h_sub = h_sub_next
            emit()
            if progress:
                progress(i)
        acc.trace.sites.pop("logits", None)
        model.head(acc, h_sub)
        model.head(loc, h_ref)
        widen()
        if floor:
            mod.head(f_ctx, np.concatenate([h_f[:b], ops.round_to(h_ref, floor)]))
        mod.head(ref_ctx, h_ref)
        for tr, logits in ((acc.trace, acc.logits), (loc.trace, loc.logits)):
            tr.sites["logits"] = model.to_numpy(logits)
            tr.dtypes["logits"] = dtype
        emit()
    return to_frame(records), kept

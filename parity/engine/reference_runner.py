"""The float64 reference (or its rounding floor) as one callable, in memory or streamed.

Checks beyond one forward (the KV cache, batch rows, generation) call the reference many times
on the same checkpoint. `ReferenceRunner.forward` is `reference.forward` with the checkpoint
bound to it, in one of two ways:

  in memory  every weight read once as float64 and kept (`Checkpoint.weights()`): fastest, and
             what a model of a few hundred MB can afford;
  bounded    weights read from disk for each use, big matrices converted to float64 in row
             chunks (`lockstep.StreamingContext`), nothing kept: memory stays flat in depth, at
             the price of one pass over the weights per call. The gate's `--impl fast` runs
             this way, like its lockstep.

Both give the same numbers (a chunked GEMM computes each output element the same way).
"""
from __future__ import annotations

import reference
from reference.model import RoundedWeights, make_context

from parity.checkpoints.checkpoint import Checkpoint, LazyWeights
from parity.checkpoints.inputs import Inputs


class ReferenceRunner:
    """`forward(inputs, past=, sites=, floor=, floor_sites=)` -> reference.Trace (with `.cache`)
    of the reference, or of its rounding floor in `floor` (fp16/bf16/fp32)."""

    def __init__(self, ckpt: Checkpoint, bounded: bool = False):
        self.ckpt, self.cfg, self.bounded = ckpt, ckpt.config, bounded
        self.weights = LazyWeights(ckpt, cache=False) if bounded else ckpt.weights()

    def forward(self, inputs: Inputs, *, past=None, sites=None, floor: str | None = None,
                floor_sites=None) -> reference.Trace:
        ids, mask, pos = inputs.input_ids, inputs.attention_mask, inputs.position_ids
        if not self.bounded:
            return reference.forward(self.cfg, self.weights, ids, mask, pos, past=past,
                                     sites=sites, floor=floor, floor_sites=floor_sites)
        from parity.engine.lockstep import StreamingContext

        mod = reference.family_module(self.cfg.family)
        w = self.weights if floor is None else RoundedWeights(self.weights, floor)
        ctx, trace = make_context(self.cfg, w, ids, mask, pos, past, sites, floor, floor_sites,
                                  context_cls=StreamingContext, ckpt=self.ckpt,
                                  weight_dtype=floor)
        h = mod.embed(ctx, trace.input_ids)
        for i in range(self.cfg.n_layer):
            h = mod.block(ctx, i, h)
        mod.head(ctx, h)
        trace.cache = ctx.present
        trace.sites.pop("logits", None)  # as reference.forward: logits always kept, last
        trace.sites["logits"] = ctx.last_logits
        trace.dtypes.setdefault("logits", trace.meta["dtype"])
        return trace

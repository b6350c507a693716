"""The forward driver shared by the five families: inputs, masks, cache, rounding, recording.

A family module provides `param_shapes(cfg)`, `embed(ctx, ids)`, `block(ctx, i, h)` and
`head(ctx, h)`; `forward()` here strings them together. The same pieces are called one layer at a
time by the lockstep comparison in `parity/`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from . import dtypes, ops
from .config import ModelConfig
from .trace import Recorder, Trace


class RoundedWeights(Mapping):
    """A view of a weight mapping with every tensor rounded to the floor's dtype."""

    def __init__(self, weights: Mapping, dtype: str):
        self.weights, self.dtype = weights, dtype

    def __getitem__(self, k):
        return ops.round_to(self.weights[k], self.dtype)

    def __iter__(self):
        return iter(self.weights)

    def __len__(self):
        return len(self.weights)


@dataclass
class Context:
    """Everything a block needs besides its input stream."""

    cfg: ModelConfig
    W: Mapping  # canonical name -> float64 array
    rec: Recorder
    q_index: np.ndarray  # (T,) absolute indices of the new tokens
    position_ids: np.ndarray  # (B, T)
    key_mask: np.ndarray | None  # (B, T_past + T) or None
    past: list | None = None
    present: list = field(default_factory=list)
    rnd: Callable[[np.ndarray], np.ndarray] = ops.identity
    floor_sites: Mapping | None = None  # floor mode: per-site dtype where it differs
    floor_dtype: str | None = None  # floor mode: the target dtype (GEMMs follow ops.floor_matmul)
    last_logits: np.ndarray | None = None
    _visible: dict = field(default_factory=dict)

    # -- helpers used by the family modules
    def site(self, name: str, x: np.ndarray) -> np.ndarray:
        """Round a site output (floor mode) and record it."""
        return self.rec(name, self.round_site(name, x))

    def round_site(self, name: str, x: np.ndarray) -> np.ndarray:
        if self.floor_sites and name in self.floor_sites:
            return ops.round_to(x, self.floor_sites[name])
        return self.rnd(x)

    def w(self, name: str) -> np.ndarray:
        return self.W[name]

    def gather(self, name: str, index) -> np.ndarray:
        """Rows `index` of an embedding table (B, T) -> (B, T, d)."""
        return self.W[name][index]

    def matmul(self, x, name: str, transpose: bool) -> np.ndarray:
        """x @ W (transpose=False, Conv1D [in, out]) or x @ W^T (nn.Linear [out, in]).
        One place, so that a streaming context can read W in chunks."""
        w = self.W[name]
        return self.mm(x, w.T if transpose else w)

    def mm(self, a, b) -> np.ndarray:
        """A GEMM: exact in float64, or as the floor's dtype accumulates (ops.floor_matmul)."""
        return ops.floor_matmul(a, b, self.floor_dtype)

    def conv1d(self, x, prefix):
        """HF Conv1D: weight [in, out]; y = x W + b (one GEMM, one rounding)."""
        return self.rnd(self.matmul(x, prefix + ".weight", False) + self.W[prefix + ".bias"])

    def linear(self, x, prefix, bias=True):
        """nn.Linear: weight [out, in]; y = x W^T (+ b)."""
        y = self.matmul(x, prefix + ".weight", True)
        if bias:
            y = y + self.W[prefix + ".bias"]
        return self.rnd(y)

    def layer_norm(self, x, prefix):
        return ops.layer_norm(
            x, self.W[prefix + ".weight"], self.W[prefix + ".bias"], self.cfg.layer_norm_epsilon
        )

    def act(self, x):
        return ops.ACTIVATIONS[self.cfg.activation](x)

    def visible(self, i: int) -> np.ndarray:
        kind = self.cfg.layer_kind(i)
        if kind not in self._visible:
            k_len = self.q_index[-1] + 1
            window = self.cfg.window_size if kind == "local" else None
            self._visible[kind] = ops.visible_keys(self.q_index, k_len, self.key_mask, window)
        return self._visible[kind]

    def attend(self, i: int, q, k, v, scale: float):
        """Causal attention of one layer. q, k, v: (B, H, T, hd) for the new tokens.
        Records attn.q/k/v/scores/probs/context; returns the merged context (B, T, d)."""
        p = f"blocks.{i}.attn."
        self.site(p + "q", q)
        self.site(p + "k", k)
        self.site(p + "v", v)
        if self.past is not None:
            pk, pv = self.past[i]
            k = np.concatenate([pk, k], axis=2)
            v = np.concatenate([pv, v], axis=2)
        self.present.append((k, v))
        kt = k.transpose(0, 1, 3, 2)
        scores = self.round_site(p + "scores", scale * self.mm(q, kt))  # (B,H,T,Tk)
        scores = np.where(self.visible(i), scores, -np.inf)
        self.rec(p + "scores", scores)
        probs = self.site(p + "probs", ops.softmax(scores, axis=-1))
        context = self.site(p + "context", ops.merge_heads(self.rnd(self.mm(probs, v))))
        return context


def pre_ln_block(ctx: Context, i: int, h, attention, mlp):
    """The pre-LN sequential block of GPT-2, GPTMeg and GPT-Neo (their attention and MLP differ):
    h <- h + Attn(LN1 h); h <- h + MLP(LN2 h)."""
    s, p = f"blocks.{i}.", f"h.{i}."
    a = attention(ctx, i, ctx.site(s + "ln_1", ctx.layer_norm(h, p + "ln_1")))
    h = ctx.site(s + "resid_mid", h + a)
    m = mlp(ctx, i, ctx.site(s + "ln_2", ctx.layer_norm(h, p + "ln_2")))
    return ctx.site(s + "resid_post", h + m)


def make_context(
    cfg: ModelConfig,
    weights: Mapping,
    input_ids,
    attention_mask=None,
    position_ids=None,
    past=None,
    sites=None,
    floor: str | None = None,
    floor_sites: Mapping | None = None,
    context_cls=Context,
    **context_fields,
) -> tuple[Context, Trace]:
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {ids.shape}")
    b, t = ids.shape
    past_len = 0 if not past else past[0][0].shape[2]
    if position_ids is None:
        position_ids = np.broadcast_to(np.arange(past_len, past_len + t), (b, t))
    position_ids = np.asarray(position_ids, dtype=np.int64)
    key_mask = None if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
    if key_mask is not None and key_mask.shape != (b, past_len + t):
        raise ValueError(
            f"attention_mask has shape {key_mask.shape}, expected {(b, past_len + t)} "
            "(past plus new tokens)"
        )
    dtype = "float64" if floor is None else dtypes.canonical(floor)
    trace = Trace(
        family=cfg.family,
        input_ids=ids,
        attention_mask=key_mask,
        position_ids=position_ids,
        meta={"producer": "gpt-parity reference", "dtype": dtype},
    )
    rnd = ops.identity if floor is None else (lambda x: ops.round_to(x, dtype))
    W = weights if floor is None else RoundedWeights(weights, dtype)
    ctx = context_cls(
        cfg=cfg,
        W=W,
        rec=Recorder(trace, sites, dtype),
        q_index=np.arange(past_len, past_len + t),
        position_ids=position_ids,
        key_mask=key_mask,
        past=past,
        rnd=rnd,
        floor_sites=dict(floor_sites or {}) if floor is not None else None,
        floor_dtype=None if floor is None else dtype,
        **context_fields,
    )
    return ctx, trace


def forward(family_module, cfg, weights, input_ids, attention_mask=None, position_ids=None,
            past=None, sites=None, floor=None, floor_sites=None) -> Trace:
    ctx, trace = make_context(
        cfg, weights, input_ids, attention_mask, position_ids, past, sites, floor, floor_sites
    )
    h = family_module.embed(ctx, trace.input_ids)
    for i in range(cfg.n_layer):
        h = family_module.block(ctx, i, h)
    family_module.head(ctx, h)
    trace.cache = ctx.present
    # logits are always kept (a trace without them is not a trace), last in order
    trace.sites.pop("logits", None)
    trace.sites["logits"] = ctx.last_logits
    trace.dtypes.setdefault("logits", trace.meta["dtype"])
    return trace

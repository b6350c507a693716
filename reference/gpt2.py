"""GPT-2 (HF model_type "gpt2"), float64. MODEL_NOTES.md section 2.

Pre-LN sequential blocks, Conv1D weights [in, out], learned positions, final ln_f, tied head.
    h <- h + Attn(LN1 h);  h <- h + MLP(LN2 h);  logits = LN_f(h) wte^T
"""
from __future__ import annotations

import math

from . import ops
from .model import Context, pre_ln_block


def param_shapes(cfg) -> dict[str, tuple[int, ...]]:
    d, f = cfg.d_model, cfg.d_inner
    shapes = {"wte.weight": (cfg.vocab_size, d), "wpe.weight": (cfg.n_positions, d)}
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        shapes.update({
            p + "ln_1.weight": (d,), p + "ln_1.bias": (d,),
            p + "attn.c_attn.weight": (d, 3 * d), p + "attn.c_attn.bias": (3 * d,),
            p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
            p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
            p + "mlp.c_fc.weight": (d, f), p + "mlp.c_fc.bias": (f,),
            p + "mlp.c_proj.weight": (f, d), p + "mlp.c_proj.bias": (d,),
        })
    shapes.update({"ln_f.weight": (d,), "ln_f.bias": (d,)})
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes


def attn_scale(cfg, i: int) -> float:
    """1/sqrt(hd) if scale_attn_weights, further /(layer_idx + 1) if scale_attn_by_inverse_layer_idx."""
    c = 1.0 / math.sqrt(cfg.head_dim) if cfg.scale_attn_weights else 1.0
    if cfg.scale_attn_by_inverse_layer_idx:
        c /= i + 1
    return c


def embed(ctx: Context, ids):
    h = ctx.gather("wte.weight", ids) + ctx.gather("wpe.weight", ctx.position_ids)  # (B, T, d)
    return ctx.site("embed", h)


def attention(ctx: Context, i: int, x):
    """Conv1D q|k|v split by columns, causal softmax attention, c_proj."""
    cfg, p = ctx.cfg, f"h.{i}.attn."
    qkv = ctx.conv1d(x, p + "c_attn")  # (B, T, 3d)
    q, k, v = (ops.split_heads(t, cfg.n_head) for t in ops.split3(qkv, cfg.d_model))
    context = ctx.attend(i, q, k, v, attn_scale(cfg, i))
    return ctx.site(f"blocks.{i}.attn.out", ctx.conv1d(context, p + "c_proj"))


def mlp(ctx: Context, i: int, x):
    s, p = f"blocks.{i}.mlp.", f"h.{i}.mlp."
    a = ctx.site(s + "fc_in", ctx.conv1d(x, p + "c_fc"))
    a = ctx.site(s + "act", ctx.act(a))
    return ctx.site(s + "out", ctx.conv1d(a, p + "c_proj"))


def block(ctx: Context, i: int, h):
    """h <- h + Attn(LN1 h); h <- h + MLP(LN2 h)."""
    return pre_ln_block(ctx, i, h, attention, mlp)


def head(ctx: Context, h):
    h = ctx.site("ln_f", ctx.layer_norm(h, "ln_f"))
    w = "wte.weight" if ctx.cfg.tie_word_embeddings else "lm_head.weight"
    ctx.last_logits = ctx.site("logits", ctx.rnd(ctx.matmul(h, w, True)))
    return ctx.last_logits

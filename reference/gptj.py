"""GPT-J (HF model_type "gptj"), float64. MODEL_NOTES.md section 4.

Parallel block: one LN feeds attention and MLP, h <- Attn(a) + MLP(a) + h with a = LN1(h).
Interleaved-pair rotary on the first rotary_dim dims of q and k (positions from position_ids),
s = q k^T / sqrt(hd), bias-free q/k/v/out projections, no learned positions, untied LM head
WITH a bias. Vocab 50400 = 50257 used + 143 TPU padding rows.
"""
from __future__ import annotations

import math

from . import ops
from .model import Context


def param_shapes(cfg) -> dict[str, tuple[int, ...]]:
    d, f = cfg.d_model, cfg.d_inner
    shapes = {"wte.weight": (cfg.vocab_size, d)}
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        shapes.update({
            p + "ln_1.weight": (d,), p + "ln_1.bias": (d,),
            p + "attn.q_proj.weight": (d, d), p + "attn.k_proj.weight": (d, d),
            p + "attn.v_proj.weight": (d, d), p + "attn.out_proj.weight": (d, d),
            p + "mlp.fc_in.weight": (f, d), p + "mlp.fc_in.bias": (f,),
            p + "mlp.fc_out.weight": (d, f), p + "mlp.fc_out.bias": (d,),
        })
    shapes.update({"ln_f.weight": (d,), "ln_f.bias": (d,)})
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    shapes["lm_head.bias"] = (cfg.vocab_size,)  # HF's lm_head keeps its bias even when tied
    return shapes


def embed(ctx: Context, ids):
    return ctx.site("embed", ctx.gather("wte.weight", ids))


def attention(ctx: Context, i: int, x):
    cfg, p = ctx.cfg, f"h.{i}.attn."
    q = ops.split_heads(ctx.linear(x, p + "q_proj", bias=False), cfg.n_head)  # (B, H, T, hd)
    k = ops.split_heads(ctx.linear(x, p + "k_proj", bias=False), cfg.n_head)
    v = ops.split_heads(ctx.linear(x, p + "v_proj", bias=False), cfg.n_head)
    sin, cos = ops.rotary_sin_cos(ctx.position_ids, cfg.rotary_dim)  # (B, T, R)
    q = ctx.rnd(ops.apply_rotary(q, sin, cos, cfg.rotary_dim))
    k = ctx.rnd(ops.apply_rotary(k, sin, cos, cfg.rotary_dim))
    context = ctx.attend(i, q, k, v, 1.0 / math.sqrt(cfg.head_dim))
    return ctx.site(f"blocks.{i}.attn.out", ctx.linear(context, p + "out_proj", bias=False))


def mlp(ctx: Context, i: int, x):
    s, p = f"blocks.{i}.mlp.", f"h.{i}.mlp."
    a = ctx.site(s + "fc_in", ctx.linear(x, p + "fc_in"))
    a = ctx.site(s + "act", ctx.act(a))
    return ctx.site(s + "out", ctx.linear(a, p + "fc_out"))


def block(ctx: Context, i: int, h):
    s = f"blocks.{i}."
    a = ctx.site(s + "ln_1", ctx.layer_norm(h, f"h.{i}.ln_1"))
    attn = attention(ctx, i, a)
    m = mlp(ctx, i, a)
    return ctx.site(s + "resid_post", attn + m + h)


def head(ctx: Context, h):
    h = ctx.site("ln_f", ctx.layer_norm(h, "ln_f"))
    w = "wte.weight" if ctx.cfg.tie_word_embeddings else "lm_head.weight"
    logits = ctx.matmul(h, w, True) + ctx.w("lm_head.bias")  # the bias stays when the weight is tied
    ctx.last_logits = ctx.site("logits", ctx.rnd(logits))
    return ctx.last_logits

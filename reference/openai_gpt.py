"""OpenAI GPT (HF model_type "openai-gpt"), float64. MODEL_NOTES.md section 1.

Post-LN sequential blocks, Conv1D weights, learned positions, no final LN, head tied to tokens_embed:
    n = LN1(h + Attn(h));  h <- LN2(n + MLP(n));  logits = h E^T
"""
from __future__ import annotations

import math

from . import ops
from .gpt2 import mlp
from .model import Context


def param_shapes(cfg) -> dict[str, tuple[int, ...]]:
    d, f = cfg.d_model, cfg.d_inner
    shapes = {"tokens_embed.weight": (cfg.vocab_size, d), "positions_embed.weight": (cfg.n_positions, d)}
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        shapes.update({
            p + "attn.c_attn.weight": (d, 3 * d), p + "attn.c_attn.bias": (3 * d,),
            p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
            p + "ln_1.weight": (d,), p + "ln_1.bias": (d,),
            p + "mlp.c_fc.weight": (d, f), p + "mlp.c_fc.bias": (f,),
            p + "mlp.c_proj.weight": (f, d), p + "mlp.c_proj.bias": (d,),
            p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
        })
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes


def embed(ctx: Context, ids):
    h = ctx.gather("tokens_embed.weight", ids) + ctx.gather("positions_embed.weight", ctx.position_ids)
    return ctx.site("embed", h)


def attention(ctx: Context, i: int, x):
    cfg, p = ctx.cfg, f"h.{i}.attn."
    qkv = ctx.conv1d(x, p + "c_attn")
    q, k, v = (ops.split_heads(t, cfg.n_head) for t in ops.split3(qkv, cfg.d_model))
    # s = q k^T / sqrt(hd); masked entries are replaced (by -1e4 in HF), here excluded exactly
    context = ctx.attend(i, q, k, v, 1.0 / math.sqrt(cfg.head_dim))
    return ctx.site(f"blocks.{i}.attn.out", ctx.conv1d(context, p + "c_proj"))


def block(ctx: Context, i: int, h):
    s, p = f"blocks.{i}.", f"h.{i}."
    a = attention(ctx, i, h)
    r = ctx.site(s + "resid_mid", h + a)
    n = ctx.site(s + "ln_1", ctx.layer_norm(r, p + "ln_1"))
    m = mlp(ctx, i, n)
    r = ctx.site(s + "resid_post", n + m)
    return ctx.site(s + "ln_2", ctx.layer_norm(r, p + "ln_2"))


def head(ctx: Context, h):
    w = "tokens_embed.weight" if ctx.cfg.tie_word_embeddings else "lm_head.weight"
    ctx.last_logits = ctx.site("logits", ctx.rnd(ctx.matmul(h, w, True)))
    return ctx.last_logits

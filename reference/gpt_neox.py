"""GPT-NeoX (HF model_type "gpt_neox", the Pythia architecture), float64. MODEL_NOTES.md section 10.

Pre-LN with two LNs per block, parallel (use_parallel_residual, the default) or sequential:
    parallel:   h <- MLP(LN2 h) + Attn(LN1 h) + h
    sequential: h <- h + Attn(LN1 h); h <- h + MLP(LN2 h)
Fused query_key_value laid out PER HEAD ([q_h0 | k_h0 | v_h0 | q_h1 | ...], each hd wide), with
biases; rotate-half rotary on the first R = int(hd * partial_rotary_factor) dims of q and k (base
rope_theta); s = q k^T / sqrt(hd); exact erf gelu by default; no learned positions; final LN;
untied embed_out without a bias. Canonical names follow the registry (`h.{i}.ln_1` is HF's
`gpt_neox.layers.{i}.input_layernorm`, `ln_f` its `final_layer_norm`).
"""
from __future__ import annotations

import math

from . import ops
from .model import Context, pre_ln_block


def param_shapes(cfg) -> dict[str, tuple[int, ...]]:
    d, f = cfg.d_model, cfg.d_inner
    shapes = {"embed_in.weight": (cfg.vocab_size, d)}
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        shapes.update({
            p + "ln_1.weight": (d,), p + "ln_1.bias": (d,),
            p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
            p + "attention.query_key_value.weight": (3 * d, d),
            p + "attention.query_key_value.bias": (3 * d,),
            p + "attention.dense.weight": (d, d), p + "attention.dense.bias": (d,),
            p + "mlp.dense_h_to_4h.weight": (f, d), p + "mlp.dense_h_to_4h.bias": (f,),
            p + "mlp.dense_4h_to_h.weight": (d, f), p + "mlp.dense_4h_to_h.bias": (d,),
        })
    shapes.update({"ln_f.weight": (d,), "ln_f.bias": (d,)})
    if not cfg.tie_word_embeddings:
        shapes["embed_out.weight"] = (cfg.vocab_size, d)
    return shapes


def embed(ctx: Context, ids):
    return ctx.site("embed", ctx.gather("embed_in.weight", ids))


def attention(ctx: Context, i: int, x):
    cfg, p = ctx.cfg, f"h.{i}.attention."
    b, t, _ = x.shape
    H, hd, R = cfg.n_head, cfg.head_dim, cfg.rotary_dim
    qkv = ctx.linear(x, p + "query_key_value").reshape(b, t, H, 3, hd).transpose(3, 0, 2, 1, 4)
    q, k, v = qkv  # each (B, H, T, hd): per head, q | k | v
    sin, cos = ops.rotary_half_sin_cos(ctx.position_ids, R, cfg.rotary_base)  # (B, T, R)
    q = ctx.rnd(ops.apply_rotary_half(q, sin, cos, R))
    k = ctx.rnd(ops.apply_rotary_half(k, sin, cos, R))
    context = ctx.attend(i, q, k, v, 1.0 / math.sqrt(hd))
    return ctx.site(f"blocks.{i}.attn.out", ctx.linear(context, p + "dense"))


def mlp(ctx: Context, i: int, x):
    s, p = f"blocks.{i}.mlp.", f"h.{i}.mlp."
    a = ctx.site(s + "fc_in", ctx.linear(x, p + "dense_h_to_4h"))
    a = ctx.site(s + "act", ctx.act(a))
    return ctx.site(s + "out", ctx.linear(a, p + "dense_4h_to_h"))


def block(ctx: Context, i: int, h):
    if ctx.cfg.block != "parallel":  # use_parallel_residual false
        return pre_ln_block(ctx, i, h, attention, mlp)
    s, p = f"blocks.{i}.", f"h.{i}."
    attn = attention(ctx, i, ctx.site(s + "ln_1", ctx.layer_norm(h, p + "ln_1")))
    m = mlp(ctx, i, ctx.site(s + "ln_2", ctx.layer_norm(h, p + "ln_2")))
    return ctx.site(s + "resid_post", m + attn + h)


def head(ctx: Context, h):
    h = ctx.site("ln_f", ctx.layer_norm(h, "ln_f"))
    w = "embed_in.weight" if ctx.cfg.tie_word_embeddings else "embed_out.weight"
    ctx.last_logits = ctx.site("logits", ctx.rnd(ctx.matmul(h, w, True)))
    return ctx.last_logits

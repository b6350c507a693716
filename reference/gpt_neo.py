"""GPT-Neo (HF model_type "gpt_neo"), float64. MODEL_NOTES.md section 3.

GPT-2's block structure with nn.Linear weights [out, in], bias-free q/k/v projections, NO score
scaling (s = q k^T), and local layers that see key j from query i iff 0 <= i - j < window_size.
"""
from __future__ import annotations

from . import ops
from .gpt2 import embed, head  # noqa: F401  (same embedding, ln_f and tied head)
from .model import Context, pre_ln_block


def param_shapes(cfg) -> dict[str, tuple[int, ...]]:
    d, f = cfg.d_model, cfg.d_inner
    shapes = {"wte.weight": (cfg.vocab_size, d), "wpe.weight": (cfg.n_positions, d)}
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        a = p + "attn.attention."
        shapes.update({
            p + "ln_1.weight": (d,), p + "ln_1.bias": (d,),
            a + "q_proj.weight": (d, d), a + "k_proj.weight": (d, d), a + "v_proj.weight": (d, d),
            a + "out_proj.weight": (d, d), a + "out_proj.bias": (d,),
            p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
            p + "mlp.c_fc.weight": (f, d), p + "mlp.c_fc.bias": (f,),
            p + "mlp.c_proj.weight": (d, f), p + "mlp.c_proj.bias": (d,),
        })
    shapes.update({"ln_f.weight": (d,), "ln_f.bias": (d,)})
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes


def attention(ctx: Context, i: int, x):
    cfg, p = ctx.cfg, f"h.{i}.attn.attention."
    q = ops.split_heads(ctx.linear(x, p + "q_proj", bias=False), cfg.n_head)
    k = ops.split_heads(ctx.linear(x, p + "k_proj", bias=False), cfg.n_head)
    v = ops.split_heads(ctx.linear(x, p + "v_proj", bias=False), cfg.n_head)
    context = ctx.attend(i, q, k, v, 1.0)  # no 1/sqrt(hd): GPT-Neo does not scale
    return ctx.site(f"blocks.{i}.attn.out", ctx.linear(context, p + "out_proj"))


def mlp(ctx: Context, i: int, x):
    s, p = f"blocks.{i}.mlp.", f"h.{i}.mlp."
    a = ctx.site(s + "fc_in", ctx.linear(x, p + "c_fc"))
    a = ctx.site(s + "act", ctx.act(a))
    return ctx.site(s + "out", ctx.linear(a, p + "c_proj"))


def block(ctx: Context, i: int, h):
    """h <- h + Attn(LN1 h); h <- h + MLP(LN2 h)."""
    return pre_ln_block(ctx, i, h, attention, mlp)

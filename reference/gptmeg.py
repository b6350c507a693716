"""GPTMeg (model_type "gptmeg", ours): GPT-2 with Megatron's fp16 numerics. MODEL_NOTES.md section 5.

In float64 the three Megatron differences (fp32 LayerNorm, fused scripted gelu, baddbmm with alpha)
vanish except one: Megatron's gelu uses the truncated constant 0.79788456, which the config selects
as activation "gelu_megatron" (the default for this family). So the math is GPT-2's, weights,
names and shapes included.
"""
from .gpt2 import attention, attn_scale, block, embed, head, mlp, param_shapes  # noqa: F401

"""Tiny Hugging Face models for tests that use transformers as an external oracle.

The reference (`reference/`) is checked against HF `transformers` run in float64 (MODEL_NOTES.md
section 8): every weight is randomised with a seeded generator (LayerNorm gains and every bias
included, so that no term of the math hides behind an identity init), and the same tensors,
renamed to canonical names, become the reference's weights. Only imported by tests that have
already done `pytest.importorskip("transformers")`.
"""
from __future__ import annotations

import inspect

import numpy as np
import torch
from torch import nn

import reference

# family -> the HF model_type whose classes implement it (GPTMeg is GPT-2 with Megatron's gelu)
HF_MODEL_TYPE = {"openai-gpt": "openai-gpt", "gpt2": "gpt2", "gpt_neo": "gpt_neo",
                 "gptj": "gptj", "gptmeg": "gpt2"}


def hf_config(family: str, **fields):
    """A tiny HF config for `family` (bos/eos cleared: the defaults lie outside a tiny vocab)."""
    from transformers import AutoConfig

    base = dict(vocab_size=64, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return AutoConfig.for_model(HF_MODEL_TYPE[family], **{**base, **fields})


def reference_config(family: str, hf_cfg) -> reference.ModelConfig:
    """The reference's view of the same model, parsed from the HF config dict as a checkpoint's
    config.json would be (GPTMeg: the GPT-2 dict relabelled, with Megatron's gelu)."""
    d = hf_cfg.to_dict()
    if family == "gptmeg":
        d.update(model_type="gptmeg", activation_function="gelu_megatron")
    return reference.parse_config(d)


class MegatronGelu(nn.Module):
    """Megatron's scripted gelu (MODEL_NOTES section 5b), written out for HF GPT-2's MLP:
    x * 0.5 * (1 + tanh(0.79788456 * x * (1 + 0.044715 * x * x)))."""

    def forward(self, x):
        return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1.0 + 0.044715 * x * x)))


def build_model(family: str, hf_cfg, seed: int = 0, attn_implementation: str | None = None):
    """A float64 HF causal LM with every parameter drawn from a seeded generator, in eval mode.

    Built with dtype=float64 at construction so that buffers made at init time (GPT-J's rotary
    table) are float64 too (MODEL_NOTES section 8.3)."""
    from transformers import AutoModelForCausalLM

    kw = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float64, **kw)
    randomize(model, seed)
    if family == "gptmeg":
        for block in model.transformer.h:
            block.mlp.act = MegatronGelu()
    return model.eval()


def randomize(model: nn.Module, seed: int) -> None:
    """Overwrite every parameter (tied ones once): LayerNorm gains 1 + 0.1 N, biases 0.1 N,
    matrices N / sqrt(d_model) so that attention is neither uniform nor one-hot."""
    g = torch.Generator().manual_seed(seed)
    d = model.config.hidden_size
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied parameters are listed once
            z = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if p.ndim == 1 and name.endswith("weight"):  # LayerNorm gain
                z = 1.0 + 0.1 * z
            elif p.ndim == 1:
                z = 0.1 * z
            else:
                z = z / d**0.5
            p.copy_(z.to(p.dtype))


def canonical_weights(model: nn.Module) -> dict[str, np.ndarray]:
    """state_dict -> canonical names (HF keys without `transformer.`) -> float64 NumPy arrays."""
    out = {}
    for k, v in model.state_dict().items():
        name = k[len("transformer."):] if k.startswith("transformer.") else k
        if v.is_floating_point():
            out[name] = v.detach().to(torch.float64).numpy().copy()
    return out


def padded_batch(vocab: int, lengths: list[int], t: int, seed: int, offsets=None):
    """Left-padded ids (B, t), attention_mask and explicit position_ids.

    Positions count real tokens from `offsets[b]` (cumsum(mask) - 1, as `generate` derives them,
    shifted), so a model that ignored position_ids or derived them itself would disagree."""
    rng = np.random.default_rng(seed)
    b = len(lengths)
    ids = rng.integers(0, vocab, size=(b, t), dtype=np.int64)
    mask = np.zeros((b, t), dtype=np.int64)
    for i, n in enumerate(lengths):
        mask[i, t - n:] = 1
    offsets = np.zeros(b, dtype=np.int64) if offsets is None else np.asarray(offsets, np.int64)
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0) + offsets[:, None]
    return ids, mask, pos


def _cache_kwarg(model) -> str:
    """transformers 5.x renames `past_key_values` to `cache`; use whichever forward takes."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def hf_forward(model, ids, mask=None, pos=None, past=None, use_cache=False):
    """Run the HF model; returns (logits, hidden_states tuple, cache) as float64 torch tensors."""
    kw = dict(output_hidden_states=True, use_cache=use_cache)
    if mask is not None:
        kw["attention_mask"] = torch.as_tensor(mask)
    if pos is not None:
        kw["position_ids"] = torch.as_tensor(pos)
    if past is not None:
        kw[_cache_kwarg(model)] = past
    with torch.no_grad():
        out = model(torch.as_tensor(ids), **kw)
    cache = out.get("cache", out.get("past_key_values")) if use_cache else None
    return out.logits, out.hidden_states, cache


def hidden_state_sites(family: str, n_layer: int) -> list[str]:
    """Site names of HF's `hidden_states` tuple: the registry's mapping (the README's golden
    recipe table), which the tests that use this hold against transformers."""
    return reference.family(family).hf_hidden_state_sites(n_layer)


def rel_max_error(ref: np.ndarray, other, rows: np.ndarray | None = None) -> float:
    """max |ref - other| / max |ref| over the (B, T) positions selected by `rows` (bool)."""
    ref = np.asarray(ref, dtype=np.float64)
    other = other.detach().to(torch.float64).numpy() if isinstance(other, torch.Tensor) else \
        np.asarray(other, dtype=np.float64)
    if rows is not None:
        ref, other = ref[rows], other[rows]
    scale = np.max(np.abs(ref))
    return float(np.max(np.abs(ref - other)) / scale)


class _TorchWithoutFloat32:
    """`torch` as seen by one HF module, with `torch.float32` meaning float64: HF GPT-Neo's own
    attention code then runs with its fp32 cast of q and k made a no-op (MODEL_NOTES 8.1)."""

    float32 = torch.float64

    def __getattr__(self, name):
        return getattr(torch, name)


def patch_out_gpt_neo_fp32_cast(monkeypatch) -> None:
    """Make GPT-Neo's eager attention skip `query/key.to(torch.float32)` for this test only."""
    from transformers.models.gpt_neo import modeling_gpt_neo

    src = inspect.getsource(modeling_gpt_neo.GPTNeoSelfAttention._attn)
    assert "torch.float32" in src, "HF GPT-Neo no longer casts q/k to float32: revisit this patch"
    monkeypatch.setattr(modeling_gpt_neo, "torch", _TorchWithoutFloat32())


def float64_rotary_table(model) -> None:
    """Rebuild GPT-J's rotary sin/cos buffer in float64 with HF's own function.

    `from_config(dtype=float64)` builds it exactly, but `from_pretrained(dir, dtype=float64)`
    (transformers 5.24) leaves it at fp32 precision in a float64 buffer (3.6e-8 off over 32
    positions, 5e-9 relative on tiny-model logits); MODEL_NOTES 8.3's fix is to overwrite it."""
    from transformers.models.gptj import modeling_gptj

    emb = model.transformer.rotary_emb
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        table = modeling_gptj.create_sinusoidal_positions(emb.max_positions, emb.pos_embd_dim)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        emb.embed_positions.copy_(table)

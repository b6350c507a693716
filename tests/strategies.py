"""Hypothesis strategies of gpt-parity: the one module that knows how to draw models and inputs.

Nouns, in the array-api-tests style (STYLE.md): `configs()` draws an HF-style config.json dict,
`token_batches()` a batch of inputs for a config, `seeds()` a weight seed; `weights_for()` turns a
config and a seed into float64 weights (a plain function: weights are a deterministic recipe, not a
search space, so shrinking acts on the seed). Tests draw with labels, e.g.

    raw = data.draw(configs(family="gptj"), label="config")
    cfg = reference.parse_config(raw)
    W = weights_for(cfg, data.draw(seeds(), label="seed"))
    ids, mask, pos = data.draw(token_batches(cfg), label="batch")

so that a failure prints as a recipe. Sizes stay tiny (width <= 48, vocab <= 64, positions <= 24)
because every property runs the float64 reference many times.

To extend: add a noun here (e.g. `scales()` of weights toward fp16 limits), keyed by the same
config dicts; keep each strategy a pure function of its arguments.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from hypothesis import strategies as st

import reference
from parity.recipes import init_tensor
from reference.config import ModelConfig

FAMILIES = reference.FAMILIES

# Head dims include non-powers of two (3, 5, 6, 12) so that 1/sqrt(hd) is not exact, and 1.
HEAD_DIMS = (1, 2, 3, 4, 5, 6, 8, 12)
MIN_WIDTH, MAX_WIDTH = 4, 48
ACTIVATIONS = {
    "openai-gpt": ("gelu", "relu", "silu"),  # OpenAI GPT's "afn" ("gelu" is the tanh form)
    "gpt2": ("gelu_new", "gelu", "gelu_fast", "relu"),
    "gptmeg": ("gelu_megatron", "gelu_new"),
    "gpt_neo": ("gelu_new", "gelu", "silu"),
    "gptj": ("gelu_new", "gelu"),
}


def families() -> st.SearchStrategy[str]:
    return st.sampled_from(FAMILIES)


def seeds() -> st.SearchStrategy[int]:
    """Weight seeds (any seed is as good as another; small ones shrink to readable recipes)."""
    return st.integers(min_value=0, max_value=2**16 - 1)


@st.composite
def configs(draw, family: str | None = None, max_layers: int = 3, min_layers: int = 1,
            layer_kinds: st.SearchStrategy[str] | None = None, min_positions: int = 4,
            max_positions: int = 24) -> dict:
    """An HF-style config.json dict of a tiny model of `family` (drawn when None).

    Covers: one head and many heads, head dims that are not powers of two, n_inner given or
    None, tied and untied heads (GPT-J is always untied: its head has a bias), GPT-2/GPTMeg
    `scale_attn_weights` and `scale_attn_by_inverse_layer_idx`, GPT-J partial and full
    `rotary_dim`, GPT-Neo per-layer global/local kinds (`layer_kinds` overrides the drawn
    kinds, e.g. `st.just("local")`) with windows that may be shorter than the sequence.
    """
    family = family or draw(families())
    n_layer = draw(st.integers(min_layers, max_layers))
    hd = draw(st.sampled_from([h for h in HEAD_DIMS if family != "gptj" or h >= 2]))
    # at least MIN_WIDTH features: LayerNorm over 1 feature is a constant (the model would
    # ignore its input) and over 2 features nearly so
    n_head = draw(st.integers(-(-MIN_WIDTH // hd), min(6, MAX_WIDTH // hd)))
    d = hd * n_head
    vocab = draw(st.integers(2, 64))
    positions = draw(st.integers(min_positions, max_positions))
    inner = draw(st.one_of(st.none(), st.integers(1, 2 * d)))
    act = draw(st.sampled_from(ACTIVATIONS[family]))
    eps = draw(st.sampled_from((1e-5, 1e-6)))
    tied = False if family == "gptj" else draw(st.booleans())
    raw: dict = {"model_type": family, "vocab_size": vocab, "layer_norm_epsilon": eps,
                 "tie_word_embeddings": tied}
    if family == "gpt_neo":
        kinds = [draw(st.sampled_from(("global", "local")) if layer_kinds is None else layer_kinds) for _ in range(n_layer)]
        raw.update(hidden_size=d, num_layers=n_layer, num_heads=n_head,
                   max_position_embeddings=positions, intermediate_size=inner,
                   activation_function=act, attention_types=[[[k], 1] for k in kinds],
                   # small windows often, so that windows shorter than the sequence are common
                   window_size=draw(st.one_of(st.integers(1, 4), st.integers(1, positions))))
        return raw
    raw.update(n_embd=d, n_layer=n_layer, n_head=n_head, n_positions=positions)
    if family == "openai-gpt":
        raw["afn"] = act  # OpenAI GPT has no n_inner: its MLP is always 4d
        return raw
    raw.update(n_inner=inner, activation_function=act)
    if family in ("gpt2", "gptmeg"):
        raw.update(scale_attn_weights=draw(st.booleans()),
                   scale_attn_by_inverse_layer_idx=draw(st.booleans()))
    if family == "gptmeg":
        raw["n_ctx"] = positions
    if family == "gptj":
        raw["rotary_dim"] = 2 * draw(st.integers(1, hd // 2))
    return raw


def as_config(cfg: ModelConfig | dict) -> ModelConfig:
    return cfg if isinstance(cfg, ModelConfig) else reference.parse_config(cfg)


def weights_for(cfg: ModelConfig | dict, seed: int) -> dict[str, np.ndarray]:
    """Float64 weights of `cfg` by the same per-tensor recipe as `parity checkpoint make`
    (LayerNorm gains near 1, small non-zero biases, N(0, 1/fan_in) matrices)."""
    cfg = as_config(cfg)
    return {name: np.asarray(init_tensor(cfg.family, name, shape, seed), dtype=np.float64)
            for name, shape in reference.param_shapes(cfg).items()}


class TokenBatch(NamedTuple):
    """Inputs of one forward: attention_mask and position_ids may be None (HF defaults)."""

    input_ids: np.ndarray  # (B, T) int64
    attention_mask: np.ndarray | None  # (B, T) int64, 1 = real token, left padding
    position_ids: np.ndarray | None  # (B, T) int64; real tokens of each row count from 0


def token_ids(vocab_size: int) -> st.SearchStrategy[int]:
    """Token ids with the edges 0 and V-1 drawn often (embedding-row off-by-ones show there)."""
    return st.one_of(st.sampled_from((0, vocab_size - 1)), st.integers(0, vocab_size - 1))


@st.composite
def token_batches(draw, cfg: ModelConfig | dict, min_len: int = 1, max_len: int = 12,
                  max_batch: int = 3, padding: bool | None = None) -> TokenBatch:
    """A batch of rows of length T <= min(max_len, n_positions).

    padding=None draws one of: no mask, an all-ones mask, or left padding (each row a drawn
    number of real tokens, at least one, preceded by arbitrary pad ids with mask 0, and
    position_ids counting each row's real tokens from 0, pads at 1 as HF's generate() does).
    padding=True forces at least one padded row when T > 1; padding=False gives no mask.
    Without padding, position_ids are None or the explicit default 0..T-1.
    """
    cfg = as_config(cfg)
    max_len = min(max_len, cfg.n_positions)
    t = draw(st.integers(min_len, max_len))
    b = draw(st.integers(1, max_batch))
    ids = np.array(draw(st.lists(st.lists(token_ids(cfg.vocab_size), min_size=t, max_size=t),
                                 min_size=b, max_size=b)), dtype=np.int64)
    mode = ("padded" if padding else "none") if padding is not None else draw(
        st.sampled_from(("none", "ones", "padded")))
    if mode == "none" or (mode == "padded" and t == 1):
        explicit = draw(st.booleans())
        pos = np.broadcast_to(np.arange(t), (b, t)).copy() if explicit else None
        return TokenBatch(ids, None, pos)
    if mode == "ones":
        return TokenBatch(ids, np.ones((b, t), dtype=np.int64), None)
    lengths = draw(st.lists(st.integers(1, t), min_size=b, max_size=b))
    if padding and all(n == t for n in lengths):
        lengths[0] = draw(st.integers(1, t - 1))
    mask = np.array([[0] * (t - n) + [1] * n for n in lengths], dtype=np.int64)
    pos = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1).astype(np.int64)
    return TokenBatch(ids, mask, pos)

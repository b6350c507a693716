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
from parity.checkpoints.recipes import init_tensor
from reference.config import ModelConfig

FAMILIES = reference.FAMILIES

# Head dims include non-powers of two (3, 5, 6, 12) so that 1/sqrt(hd) is not exact, and 1.
# 16 is the one head dim that reaches VERDICT_MIN_WIDTH alone: without it the verdict-grade
# models (width >= 16) could never have a single head.
HEAD_DIMS = (1, 2, 3, 4, 5, 6, 8, 12, 16)
MIN_WIDTH, MAX_WIDTH = 4, 48
NEOX_PCTS = (0.25, 0.5, 1.0)
# GPT-NeoX head dims with an even, non-zero int(hd * rotary_pct) for some drawn pct
NEOX_HEAD_DIMS = tuple(h for h in HEAD_DIMS if any(int(h * p) >= 2 and int(h * p) % 2 == 0
                                                    for p in NEOX_PCTS))
ACTIVATIONS = {
    "openai-gpt": ("gelu", "relu", "silu"),  # OpenAI GPT's "afn" ("gelu" is the tanh form)
    "gpt2": ("gelu_new", "gelu", "gelu_fast", "relu"),
    "gptmeg": ("gelu_megatron", "gelu_new"),
    "gpt_neo": ("gelu_new", "gelu", "silu"),
    "gpt_neox": ("gelu", "gelu_new", "gelu_fast"),
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
            max_positions: int = 24, min_width: int = MIN_WIDTH, min_inner: int = 1) -> dict:
    """An HF-style config.json dict of a tiny model of `family` (drawn when None).

    Covers: one head and many heads, head dims that are not powers of two, n_inner given or
    None, tied and untied heads (GPT-J is always untied: its head has a bias), GPT-2/GPTMeg
    `scale_attn_weights` and `scale_attn_by_inverse_layer_idx`, GPT-J partial and full
    `rotary_dim`, GPT-Neo per-layer global/local kinds (`layer_kinds` overrides the drawn
    kinds, e.g. `st.just("local")`) with windows that may be shorter than the sequence.
    `min_width` / `min_inner` raise the smallest hidden and MLP widths (see `verdict_configs`).
    """
    family = family or draw(families())
    n_layer = draw(st.integers(min_layers, max_layers))
    hd = draw(st.sampled_from([h for h in HEAD_DIMS if family != "gptj" or h >= 2]
                              if family != "gpt_neox" else NEOX_HEAD_DIMS))
    # at least MIN_WIDTH features: LayerNorm over 1 feature is a constant (the model would
    # ignore its input) and over 2 features nearly so. Up to 6 heads, more when min_width
    # needs them (many heads of a small head_dim)
    lo = -(-min_width // hd)
    n_head = draw(st.integers(lo, min(max(6, lo), MAX_WIDTH // hd)))
    d = hd * n_head
    vocab = draw(st.integers(2, 64))
    positions = draw(st.integers(min_positions, max_positions))
    inner = draw(st.one_of(st.none(), st.integers(min_inner, max(min_inner, 2 * d))))
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
    if family == "gpt_neox":  # rotary_pct with an even, non-zero int(hd * pct); both residuals
        pct = draw(st.sampled_from([p for p in NEOX_PCTS
                                    if int(hd * p) >= 2 and int(hd * p) % 2 == 0]))
        raw.pop("layer_norm_epsilon")
        raw.update(hidden_size=d, num_hidden_layers=n_layer, num_attention_heads=n_head,
                   max_position_embeddings=positions, intermediate_size=inner, hidden_act=act,
                   layer_norm_eps=eps, rotary_pct=pct,
                   use_parallel_residual=draw(st.booleans()))
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
                  max_batch: int = 3, padding: bool | None = None,
                  min_real: int = 1, min_batch: int = 1) -> TokenBatch:
    """A batch of rows of length T <= min(max_len, n_positions).

    padding=None draws one of: no mask, an all-ones mask, or left padding (each row a drawn
    number of real tokens, at least one, preceded by arbitrary pad ids with mask 0, and
    position_ids counting each row's real tokens from 0, pads at 1 as HF's generate() does).
    padding=True forces at least one padded row when T > 1; padding=False gives no mask.
    Without padding, position_ids are None or the explicit default 0..T-1. `min_real` is the
    fewest real tokens of a padded row (at most min_len). `min_batch` is the fewest rows.
    """
    cfg = as_config(cfg)
    max_len = min(max_len, cfg.n_positions)
    t = draw(st.integers(min_len, max_len))
    b = draw(st.integers(min_batch, max(min_batch, max_batch)))
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
    least = max(1, min(min_real, t - 1 if padding else t))
    lengths = draw(st.lists(st.integers(least, t), min_size=b, max_size=b))
    if padding and all(n == t for n in lengths):
        lengths[0] = draw(st.integers(least, t - 1))
    mask = np.array([[0] * (t - n) + [1] * n for n in lengths], dtype=np.int64)
    pos = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1).astype(np.int64)
    return TokenBatch(ids, mask, pos)


# ------------------------------------------------------------------------------- verdict-grade models
# The verdict budgets judge a floor *ratio*: two rounding-error norms. Over a handful of elements
# that ratio is noise (measured: 12x on a 4-element mlp.act with n_inner=1, 12x on a one-element
# attention score of a 1-token batch), so properties that assert "within budget" draw models and
# batches whose every compared site holds enough elements for the ratio to mean something.
VERDICT_MIN_WIDTH = 16  # hidden and MLP widths
VERDICT_MIN_TOKENS = 4  # real tokens per row (scores then hold >= 10 visible pairs per head)


def verdict_configs(family: str | None = None, **kw) -> st.SearchStrategy[dict]:
    """`configs()` with at least VERDICT_MIN_WIDTH hidden features and MLP units: one to three
    heads of 16 dims, or up to 16 heads of 1..12 dims (non-power-of-two head dims still drawn),
    depth 1..4."""
    kw.setdefault("min_width", VERDICT_MIN_WIDTH)
    kw.setdefault("min_inner", VERDICT_MIN_WIDTH)
    kw.setdefault("min_positions", VERDICT_MIN_TOKENS)
    kw.setdefault("max_layers", 4)
    return configs(family=family, **kw)


def verdict_batches(cfg: ModelConfig | dict, **kw) -> st.SearchStrategy[TokenBatch]:
    """`token_batches()` whose rows hold at least VERDICT_MIN_TOKENS real tokens (when the
    length allows: a forced padded row keeps one pad), up to the model's positions long."""
    kw.setdefault("max_len", as_config(cfg).n_positions)
    kw.setdefault("min_len", VERDICT_MIN_TOKENS)
    kw.setdefault("min_real", VERDICT_MIN_TOKENS)
    return token_batches(cfg, **kw)


# ------------------------------------------------------------------------------- search space
def recipe_seeds(shard: int = 0, shards: int = 1) -> st.SearchStrategy[int]:
    """Weight seeds of `parity checkpoint make` in shard `shard` (0-based) of `shards`: the
    seeds s with s % shards == shard, so that shards never draw the same checkpoint."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} outside [0, {shards})")
    top = (2**16 - 1 - shard) // shards
    return st.integers(0, top).map(lambda k: shard + shards * k)


def scales(max_log2: int = 8) -> st.SearchStrategy[dict]:
    """Power-of-two scales of the weight groups of `parity.commands.search.SCALE_GROUPS` (embeddings:
    the residual stream; q/k projections: the scores, squared; first MLP projection: the
    pre-activations), each 2^k with k in [0, max_log2]. A power of two is exact in every float
    dtype, so scaling moves magnitudes toward the dtype's limits without rounding anything.
    Shrinks toward no scaling."""
    from parity.commands.search import SCALE_GROUPS

    k = st.integers(0, max_log2)
    return st.fixed_dictionaries({g: k.map(lambda e: 2**e) for g in SCALE_GROUPS})


# ------------------------------------------------------------------------------- text
# Texts for the tokenizer checks (issue 8): `texts()` draws a string built from pieces that each
# aim at one rule of GPT-2's pre-split pattern or of BERT's basic tokenization; `vocab_texts()`
# draws over a given alphabet (for round-trip promises that need every character known).
# Tests draw them labelled, e.g. `data.draw(texts(added=("<|endoftext|>",)), label="text")`.

# whitespace runs: \s of the GPT-2 pattern (Unicode White_Space) and near misses
# (U+001C..U+001F are str.isspace() but not White_Space; U+200B is no space at all)
TEXT_WHITESPACE = (" ", "  ", "   ", "\n", "\n\n", "\t", "\r\n", " \n ", "\u00a0", "\u3000",
                   "\u2009", "\u2028", "\u2029", "\x0b", "\x0c", "\x85", "\u1680", "\x1c",
                   "\x1f", "\u200b", "\u202f")
# GPT-2's contractions are case-sensitive: 'S, 'T, 'RE are not contractions to it
TEXT_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'T", "'Re", "'VE",
                     "'M", "'LL", "'D", "'", "''", "'x", "'st", "'dd")
# numbers of every N* category: ASCII, Arabic-Indic and fullwidth digits (Nd), Roman numerals
# (Nl), superscripts, fractions and circled numbers (No)
TEXT_DIGITS = "0123456789\u0660\u0663\u06f5\u0967\uff11\uff19\u2167\u216b\u00b2\u00b3\u00bd\u2153\u2460\u2473"
TEXT_PUNCTUATION = "!\"#$%&()*+,-./:;<=>?@[\\]^_`{|}~\u00a1\u00bf\u2014\u2013\u2026\u201c\u201d\u00ab\u00bb\u3002\uff0c\u060c"
# emoji: single code points, skin-tone modifiers, ZWJ sequences, flags, keycaps, VS16
TEXT_EMOJI = ("\U0001f600", "\U0001f44d\U0001f3fd", "\U0001f468\u200d\U0001f469\u200d\U0001f467",
              "\U0001f1ef\U0001f1f5", "1\ufe0f\u20e3", "\u2764\ufe0f", "\U0001f970",
              "\U0001fae0", "\u2603")
TEXT_COMBINING = "\u0300\u0301\u0302\u0308\u0327\u0316\u0345\u05b0\u0903\u093f\u20d0\u1ab0\u1dc0"


def text_words() -> st.SearchStrategy[str]:
    """Latin words in lower, Title and UPPER case (so 's vs 'S both follow letters)."""
    word = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8)
    return st.tuples(word, st.sampled_from(("lower", "title", "upper"))).map(
        lambda t: getattr(t[0], t[1])())


def text_numbers() -> st.SearchStrategy[str]:
    return st.text(alphabet=TEXT_DIGITS, min_size=1, max_size=6) | st.integers(0, 10**9).map(str)


def text_marked() -> st.SearchStrategy[str]:
    """A base character followed by combining marks (accents to strip, marks to reorder)."""
    return st.tuples(st.sampled_from("aeiouAEIOUnc\u0915\u05d0 "),
                     st.text(alphabet=TEXT_COMBINING, min_size=1, max_size=3)).map("".join)


def text_unicode() -> st.SearchStrategy[str]:
    """Characters of every general category, unassigned and private-use included (surrogates
    excluded: they cannot be UTF-8 encoded)."""
    return st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=4)


def text_pieces(added: tuple[str, ...] = ()) -> st.SearchStrategy[str]:
    """One piece of a text; with `added` tokens, also those tokens whole and cut short
    (an unfinished token must stay plain text)."""
    pieces = [text_words(), text_words(), text_numbers(), text_marked(), text_unicode(),
              st.sampled_from(TEXT_WHITESPACE), st.sampled_from(TEXT_WHITESPACE),
              st.sampled_from(TEXT_CONTRACTIONS),
              st.text(alphabet=TEXT_PUNCTUATION, min_size=1, max_size=3),
              st.sampled_from(TEXT_EMOJI),
              st.text(st.characters(min_codepoint=0x4E00, max_codepoint=0x4FFF), min_size=1,
                      max_size=3)]
    if added:
        whole = st.sampled_from(added)
        pieces += [whole, whole, st.tuples(whole, st.integers(1, 64)).map(
            lambda t: t[0][:max(1, len(t[0]) - t[1] % len(t[0]))])]
    return st.one_of(pieces)


def texts(added: tuple[str, ...] = (), max_pieces: int = 16) -> st.SearchStrategy[str]:
    """A text of up to `max_pieces` pieces (`text_pieces`), empty text included."""
    return st.lists(text_pieces(added), max_size=max_pieces).map("".join)


def vocab_texts(alphabet: str, max_size: int = 40) -> st.SearchStrategy[str]:
    """Text over `alphabet` and single spaces only (every character known to a vocabulary)."""
    return st.text(alphabet=alphabet + " ", max_size=max_size)


# ------------------------------------------------------------------------------- subjects
def subject_specs(min_size: int = 1, max_size: int = 3):
    """Distinct fast-path subjects: every preset of `parity.subjects.knobs.PRESETS` in fp16 and bf16
    (`fp32` runs in float32 whatever is asked, so it is one subject). Properties that cannot
    afford all of them per example draw a few; over the examples every one is drawn."""
    from parity.engine.compare import Subject
    from parity.subjects.knobs import PRESETS

    specs = [Subject(variant=p, dtype=d) for p in PRESETS if p != "fp32"
             for d in ("float16", "bfloat16")]
    specs.append(Subject(variant="fp32", dtype="float32"))
    return st.lists(st.sampled_from(specs), min_size=min_size, max_size=max_size, unique=True)

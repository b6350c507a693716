"""Model configuration parsed from a Hugging Face `config.json` dict (pure Python).

One frozen dataclass for all five families; odd defaults carry their reason. Parsing follows the
HF config classes: attribute aliases, None meaning 4*d for the inner size, GPT-Neo's
`attention_types` expanded per layer, OpenAI GPT's `afn`.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

FAMILIES = ("openai-gpt", "gpt2", "gpt_neo", "gptj", "gptmeg")


class ConfigError(ValueError):
    """A config.json that cannot describe a supported model."""


@dataclass(frozen=True)
class ModelConfig:
    family: str  # the HF model_type
    vocab_size: int
    n_positions: int  # max sequence length (learned positions, or GPT-J's rotary table size)
    d_model: int
    n_layer: int
    n_head: int
    d_inner: int
    activation: str
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = True
    # GPT-2 / GPTMeg attention scaling
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    # GPT-Neo
    attention_layers: tuple[str, ...] = ()
    window_size: int = 256
    # GPT-J
    rotary_dim: int | None = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def layer_kind(self, i: int) -> str:
        """'global' or 'local' (GPT-Neo); 'global' for everyone else."""
        return self.attention_layers[i] if self.attention_layers else "global"

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True).encode()).hexdigest()


def _get(d: dict, *names, default=None):
    for n in names:
        if n in d and d[n] is not None:
            return d[n]
    return default


def _int(d: dict, names: tuple[str, ...], default=None) -> int:
    v = _get(d, *names, default=default)
    if v is None:
        raise ConfigError(f"missing field {names[0]!r}")
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConfigError(f"field {names[0]!r} must be a positive integer, got {v!r}")
    return v


def _opt_int(d: dict, name: str):
    """An optional positive int (None means the family default, e.g. 4*d for n_inner)."""
    v = d.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConfigError(f"field {name!r} must be a positive integer or null, got {v!r}")
    return v


def _bool(d: dict, name: str, default: bool) -> bool:
    v = d.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ConfigError(f"field {name!r} must be true or false, got {v!r}")
    return v


def expand_attention_types(attention_types) -> tuple[str, ...]:
    """GPT-Neo: [[["global", "local"], 12]] -> ("global", "local", ...) 24 entries."""
    out: list[str] = []
    try:
        for pattern, n in attention_types:
            for _ in range(int(n)):
                out.extend(pattern)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"attention_types is malformed: {attention_types!r}") from e
    bad = [k for k in out if k not in ("global", "local")]
    if bad:
        raise ConfigError(f"attention_types has unknown kinds {sorted(set(bad))}")
    return tuple(out)


def parse_config(d: dict) -> ModelConfig:
    """Build a ModelConfig from a config.json dict, with the defaults of each HF config class."""
    if not isinstance(d, dict):
        raise ConfigError("config is not a JSON object")
    family = d.get("model_type")
    if family not in FAMILIES:
        raise ConfigError(f"unsupported model_type {family!r} (supported: {', '.join(FAMILIES)})")
    eps = float(_get(d, "layer_norm_epsilon", default=1e-5))

    if family in ("openai-gpt", "gpt2", "gptmeg"):
        defaults = {"openai-gpt": (40478, 512), "gpt2": (50257, 1024), "gptmeg": (50257, 1024)}
        v0, p0 = defaults[family]
        d_model = _int(d, ("n_embd", "hidden_size"), 768)
        inner = _opt_int(d, "n_inner")  # None means 4*d (OpenAI GPT has no field)
        if family == "openai-gpt":
            act = _get(d, "afn", default="gelu")
            # OpenAI GPT's own table maps "gelu" to the tanh form (MODEL_NOTES section 1)
            act = {"gelu": "gelu_new"}.get(act, act)
        elif family == "gptmeg":
            # GPTMeg exists for Megatron numerics; its gelu is Megatron's unless the config says
            # otherwise (our choice, documented in the README)
            act = _get(d, "activation_function", default="gelu_megatron")
        else:
            act = _get(d, "activation_function", default="gelu_new")
        cfg = dict(
            vocab_size=_int(d, ("vocab_size",), v0),
            n_positions=_int(d, ("n_positions", "max_position_embeddings"), p0),
            d_model=d_model,
            n_layer=_int(d, ("n_layer", "num_hidden_layers"), 12),
            n_head=_int(d, ("n_head", "num_attention_heads"), 12),
            d_inner=inner if inner is not None else 4 * d_model,
            activation=act,
            tie_word_embeddings=_bool(d, "tie_word_embeddings", True),
        )
        if family != "openai-gpt":
            cfg.update(
                scale_attn_weights=_bool(d, "scale_attn_weights", True),
                scale_attn_by_inverse_layer_idx=_bool(d, "scale_attn_by_inverse_layer_idx", False),
                reorder_and_upcast_attn=_bool(d, "reorder_and_upcast_attn", False),
            )
    elif family == "gpt_neo":
        d_model = _int(d, ("hidden_size", "n_embd"), 2048)
        n_layer = _int(d, ("num_layers", "num_hidden_layers", "n_layer"), 24)
        layers = expand_attention_types(
            _get(d, "attention_types", default=[[["global", "local"], 12]])
        )
        if len(layers) != n_layer:
            raise ConfigError(
                f"attention_types expands to {len(layers)} layers but num_layers is {n_layer}"
            )
        inner = _opt_int(d, "intermediate_size")
        cfg = dict(
            vocab_size=_int(d, ("vocab_size",), 50257),
            n_positions=_int(d, ("max_position_embeddings", "n_positions"), 2048),
            d_model=d_model,
            n_layer=n_layer,
            n_head=_int(d, ("num_heads", "num_attention_heads", "n_head"), 16),
            d_inner=inner if inner is not None else 4 * d_model,
            activation=_get(d, "activation_function", default="gelu_new"),
            tie_word_embeddings=_bool(d, "tie_word_embeddings", True),
            attention_layers=layers,
            window_size=_int(d, ("window_size",), 256),
        )
    else:  # gptj
        d_model = _int(d, ("n_embd", "hidden_size"), 4096)
        inner = _opt_int(d, "n_inner")
        cfg = dict(
            vocab_size=_int(d, ("vocab_size",), 50400),  # 50257 used + 143 TPU padding rows
            n_positions=_int(d, ("n_positions", "max_position_embeddings"), 2048),
            d_model=d_model,
            n_layer=_int(d, ("n_layer", "num_hidden_layers"), 28),
            n_head=_int(d, ("n_head", "num_attention_heads"), 16),
            d_inner=inner if inner is not None else 4 * d_model,
            activation=_get(d, "activation_function", default="gelu_new"),
            tie_word_embeddings=_bool(d, "tie_word_embeddings", False),
            rotary_dim=_get(d, "rotary_dim", default=64),
        )
    c = ModelConfig(family=family, layer_norm_epsilon=eps, raw=dict(d), **cfg)
    _validate(c)
    return c


def _validate(c: ModelConfig) -> None:
    from .ops import ACTIVATIONS

    if c.d_model % c.n_head:
        raise ConfigError(f"hidden size {c.d_model} is not divisible by {c.n_head} heads")
    if c.activation not in ACTIVATIONS:
        raise ConfigError(
            f"unsupported activation {c.activation!r} (supported: {', '.join(sorted(ACTIVATIONS))})"
        )
    if c.family == "gptj":
        r = c.rotary_dim
        if r is None:
            raise ConfigError("rotary_dim None is not supported (HF's own handling is broken)")
        if not isinstance(r, int) or r <= 0 or r % 2 or r > c.head_dim:
            raise ConfigError(f"rotary_dim {r!r} must be even and within the head dim {c.head_dim}")
    if not (c.layer_norm_epsilon > 0):
        raise ConfigError(f"layer_norm_epsilon must be positive, got {c.layer_norm_epsilon}")

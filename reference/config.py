"""Model configuration parsed from a Hugging Face `config.json` dict (pure Python).

One frozen dataclass for all five families; odd defaults carry their reason. Parsing follows the
HF config classes: attribute aliases, None meaning 4*d for the inner size, `attention_types`
expanded per layer (windowed families), OpenAI GPT's `afn`. Which keys and defaults each family
has are facts of the family registry (`reference.families`).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from .families import FAMILIES, family


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
    # GPT-J, GPT-NeoX
    rotary_dim: int | None = None
    rotary_base: float = 10000.0
    # the block kind: the family's, or what config.json switches it to (NeoX's
    # use_parallel_residual false -> "pre")
    block: str = ""
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def block_sites(self) -> tuple[str, ...]:
        """The site kinds of one block under this config's block kind."""
        return family(self.family).sites_for(self.block)

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
    """Build a ModelConfig from a config.json dict, with the defaults of each HF config class
    (`reference.families`: which keys hold each field, the class defaults, the activation)."""
    if not isinstance(d, dict):
        raise ConfigError("config is not a JSON object")
    name = d.get("model_type")
    if name not in FAMILIES:
        raise ConfigError(f"unsupported model_type {name!r} (supported: {', '.join(FAMILIES)})")
    fam = family(name)
    keys, dflt = fam.config_keys, fam.defaults
    eps = float(_get(d, *keys["eps"], default=1e-5))

    d_model = _int(d, keys["d_model"], dflt["d_model"])
    n_layer = _int(d, keys["n_layer"], dflt["n_layer"])
    cfg = {}
    if fam.windowed:  # [[["global", "local"], 12]] expanded to one kind per layer
        layers = expand_attention_types(
            _get(d, "attention_types", default=[[["global", "local"], 12]])  # HF default
        )
        if len(layers) != n_layer:
            raise ConfigError(
                f"attention_types expands to {len(layers)} layers but {keys['n_layer'][0]} is "
                f"{n_layer}"
            )
        cfg.update(attention_layers=layers, window_size=_int(d, ("window_size",), 256))
    inner = _opt_int(d, keys["d_inner"][0])  # None means 4*d
    act = _get(d, *keys["activation"], default=fam.activation)
    if fam.scale == "config":  # GPT-2's attention-scaling options
        cfg.update(
            scale_attn_weights=_bool(d, "scale_attn_weights", True),
            scale_attn_by_inverse_layer_idx=_bool(d, "scale_attn_by_inverse_layer_idx", False),
            reorder_and_upcast_attn=_bool(d, "reorder_and_upcast_attn", False),
        )
    if fam.rotary and fam.rotary_config == "rotary_dim":
        if "rotary_dim" in d and d["rotary_dim"] is None:
            raise ConfigError(
                "rotary_dim is null: transformers then rotates the whole head with a sin/cos "
                "table sized for the full hidden width, which no released checkpoint uses and "
                "this tool does not follow; supported: an even rotary_dim from 2 to the head "
                f"dim (here {d_model // _int(d, keys['n_head'], dflt['n_head'])})")
        cfg.update(rotary_dim=_get(d, "rotary_dim", default=int(fam.rotary_default)))
    elif fam.rotary:  # a fraction of the head: v5's rope_parameters, or the older spelling
        rope = d.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"rope_parameters must be an object, got {rope!r}")
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(f"rope_type {rope.get('rope_type')!r} is not supported (default only)")
        pct = _get(rope, "partial_rotary_factor", default=_get(
            d, "partial_rotary_factor", "rotary_pct", default=fam.rotary_default))
        base = _get(rope, "rope_theta", default=_get(d, "rope_theta", "rotary_emb_base",
                                                     default=10000.0))
        hd = d_model // _int(d, keys["n_head"], dflt["n_head"])
        if isinstance(pct, bool) or not isinstance(pct, (int, float)) or not 0 < pct <= 1:
            raise ConfigError(f"partial_rotary_factor {pct!r} must be in (0, 1]")
        if isinstance(base, bool) or not isinstance(base, (int, float)) or not base > 0:
            raise ConfigError(f"rope_theta {base!r} must be a positive number")
        cfg.update(rotary_dim=int(hd * pct), rotary_base=float(base))
    block = fam.block
    if fam.block_switch:
        key, default = fam.block_switch
        block = fam.block if _bool(d, key, default) else "pre"
    c = ModelConfig(
        family=name,
        vocab_size=_int(d, ("vocab_size",), dflt["vocab_size"]),
        n_positions=_int(d, keys["n_positions"], dflt["n_positions"]),
        d_model=d_model,
        n_layer=n_layer,
        n_head=_int(d, keys["n_head"], dflt["n_head"]),
        d_inner=inner if inner is not None else 4 * d_model,
        activation=fam.activation_aliases.get(act, act),
        layer_norm_epsilon=eps,
        tie_word_embeddings=_bool(d, "tie_word_embeddings", fam.tie_default),
        block=block,
        raw=dict(d),
        **cfg,
    )
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
    if family(c.family).rotary:
        r = c.rotary_dim
        if r is None:
            raise ConfigError("rotary_dim None is not supported (HF's own handling is broken)")
        if not isinstance(r, int) or r <= 0 or r % 2 or r > c.head_dim:
            said = "rotary_dim" if "rotary_dim" in c.raw else "the default rotary_dim"
            raise ConfigError(f"{said} {r!r} is not supported: it must be even and at most the "
                              f"head dim {c.head_dim} (hidden {c.d_model} / {c.n_head} heads)")
    if not (c.layer_norm_epsilon > 0):
        raise ConfigError(f"layer_norm_epsilon must be positive, got {c.layer_norm_epsilon}")

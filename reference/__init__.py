"""gpt-parity's float64 truth: pure NumPy references of the five GPT families.

    from reference import forward, parse_config
    trace = forward(cfg, weights, input_ids)   # -> Trace (ordered site -> float64 array)

Imports neither torch nor transformers.
"""
from __future__ import annotations

from importlib import import_module

from .config import ConfigError, ModelConfig, parse_config
from .families import FAMILIES, Family, UnknownFamily, family
from .model import forward as _drive
from .sites import site_names
from .trace import Trace

# family name -> its reference module (the registry names the module)
MODULES = {name: import_module(f"{__name__}.{family(name).module}") for name in FAMILIES}


def family_module(name: str):
    return MODULES[family(name).name]


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical weight names (HF keys without the `transformer.` prefix) and their shapes."""
    return MODULES[cfg.family].param_shapes(cfg)


def forward(cfg: ModelConfig, weights, input_ids, attention_mask=None, position_ids=None,
            past=None, sites=None, floor: str | None = None, floor_sites=None) -> Trace:
    """Run the float64 reference (or, with floor="float16"/"bfloat16", the rounding floor:
    the same math with every weight, matmul output and site output rounded to that dtype;
    `floor_sites` maps site names to another dtype where the implementation being measured keeps
    that site wider, e.g. {"blocks.0.attn.scores": "float32"} for upcast attention scores)."""
    return _drive(MODULES[cfg.family], cfg, weights, input_ids, attention_mask, position_ids,
                  past, sites, floor, floor_sites)


__all__ = ["FAMILIES", "ConfigError", "Family", "ModelConfig", "Trace", "UnknownFamily", "family",
           "family_module", "forward", "param_shapes", "parse_config", "site_names"]

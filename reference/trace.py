"""`Trace`: the named activations of one forward pass, in execution order."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Trace:
    """Ordered mapping site -> array (with the dtype that produced it) plus the inputs and the
    present key/value cache.

    Shapes: hidden sites (B, T, d); attn.q/k/v (B, H, T, hd) for the new tokens; attn.scores and
    attn.probs (B, H, T, T_past + T); attn.context (B, T, d) (heads merged, before out_proj);
    mlp.fc_in / mlp.act (B, T, d_inner); logits (B, T, V).
    Masked score entries hold -inf in the reference.
    """

    family: str
    sites: dict[str, np.ndarray] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)
    input_ids: np.ndarray | None = None
    attention_mask: np.ndarray | None = None  # (B, T_past + T), 1 = real token
    position_ids: np.ndarray | None = None
    cache: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # per layer (k, v)
    meta: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, site: str) -> np.ndarray:
        return self.sites[site]

    def __contains__(self, site: str) -> bool:
        return site in self.sites

    def __iter__(self):
        return iter(self.sites)

    def __len__(self) -> int:
        return len(self.sites)

    @property
    def logits(self) -> np.ndarray:
        return self.sites["logits"]


class Recorder:
    """Keeps the sites selected by glob patterns; `None` keeps every site."""

    def __init__(self, trace: Trace, patterns=None, dtype: str = "float64"):
        self.trace = trace
        if isinstance(patterns, str):
            patterns = [p for p in patterns.split(",") if p]
        self.patterns = patterns
        self.dtype = dtype

    def wants(self, site: str) -> bool:
        if self.patterns is None:
            return True
        return any(fnmatch.fnmatchcase(site, p) for p in self.patterns)

    def __call__(self, site: str, x):
        if self.wants(site):
            self.trace.sites[site] = x
            self.trace.dtypes[site] = self.dtype
        return x

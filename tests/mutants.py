"""Deliberately broken fast-path models, for tests only: each plants one bug in one layer.

A comparison must flag every one of them and pin the first divergence (in `local` mode) on the
planted layer, at a site of the planted op. Each mutant is a `FastModel` subclass that changes
exactly one thing in layer `layer` and defers to the healthy code everywhere else; `factory`
turns one into the `model_factory` that `parity.compare.compare` accepts.

The bugs are the ones people make when porting these models:
  WrongScale      scores scaled by 1/head_dim instead of 1/sqrt(head_dim) (GPT-Neo: scaled at
                  all, which its checkpoints were never trained with)
  MaskOffByOne    the causal mask lets query i see key i+1
  NoUpcast        q.k^T computed and stored in the half dtype where the family upcasts (GPT-Neo)
  WrongLnEps      LayerNorm epsilon far from the config's
  WrongGelu       tanh gelu with 2/pi where sqrt(2/pi) belongs
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F

from parity.fast import FastModel


class Mutant(FastModel):
    """A FastModel with one bug in layer `layer`."""

    layer = 1

    def __init__(self, *args, layer: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if layer is not None:
            self.layer = layer


class WrongScale(Mutant):
    """Layer `layer` scales its scores by 1/hd (GPT-Neo: by 1/sqrt(hd)); other layers healthy."""

    def attend(self, ctx, i, q, k, v):
        if i != self.layer:
            return super().attend(ctx, i, q, k, v)
        healthy = self.layout

        def wrong(cfg, j):
            hd = cfg.head_dim
            return (hd ** -0.5, math.sqrt(hd)) if healthy.scale(cfg, j) is None else (1 / hd, hd)

        self.layout = dataclasses.replace(healthy, scale=wrong)
        try:
            return super().attend(ctx, i, q, k, v)
        finally:
            self.layout = healthy


class MaskOffByOne(Mutant):
    """Layer `layer` lets query i see key i+1 (one future token)."""

    def visible(self, ctx, i):
        vis = super().visible(ctx, i)
        if i != self.layer:
            return vis
        # shift the healthy mask one key to the right and add it: j <= i + 1
        ahead = F.pad(vis[..., :-1], (1, 0), value=False)
        return vis | ahead


class NoUpcast(Mutant):
    """Layer `layer` forgets the fp32 upcast of q and k (and of the softmax): the family's
    unscaled / large scores are computed and stored in the half dtype."""

    def attend(self, ctx, i, q, k, v):
        if i != self.layer:
            return super().attend(ctx, i, q, k, v)
        healthy = self.knobs
        self.knobs = dataclasses.replace(healthy, attn_upcast=False, softmax="half")
        try:
            return super().attend(ctx, i, q, k, v)
        finally:
            self.knobs = healthy


class WrongLnEps(Mutant):
    """ln_1 of layer `layer` (every family has one) uses epsilon `eps` instead of the config's
    1e-5. The error is about eps / (2 var): an epsilon off by less than ~1e-3 of the stream's
    variance is below the fp16 rounding floor, and truly harmless."""

    eps = 1e-1

    def layer_norm(self, x, prefix):
        if prefix != f"h.{self.layer}.ln_1":
            return super().layer_norm(x, prefix)
        return self.num.layer_norm(x, self.w(prefix + ".weight"), self.w(prefix + ".bias"),
                                   self.eps, fp32=self.knobs.layernorm == "fp32")


class WrongGelu(Mutant):
    """The MLP activation of layer `layer` is the tanh gelu with 2/pi in place of sqrt(2/pi)
    (computed in fp32, rounded once: every rounding is healthy, only the constant is wrong)."""

    def mlp(self, ctx, i, x):
        if i != self.layer:
            return super().mlp(ctx, i, x)
        num = self.num

        def wrong_gelu(a, form, activation):
            a32 = num.upcast(a)
            c = 2.0 / math.pi
            return num.r(0.5 * a32 * (1.0 + torch.tanh(c * (a32 + 0.044715 * a32 ** 3))))

        num.gelu = wrong_gelu  # instance attribute shadows the method for this call only
        try:
            return super().mlp(ctx, i, x)
        finally:
            del num.gelu


def factory(cls, layer: int):
    """`model_factory` for `compare`: builds `cls` with its bug in `layer`."""
    return functools.partial(cls, layer=layer)

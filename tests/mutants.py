"""Deliberately broken fast-path models, for tests only: each plants one bug in one layer.

A comparison must flag every one of them and pin the first divergence (in `local` mode) on the
planted layer, at a site of the planted op. Each mutant is a `FastModel` subclass that changes
exactly one thing in layer `layer` (or in the head, for the LM-head bug) and defers to the
healthy code everywhere else; `factory` turns one into the `model_factory` that
`parity.engine.compare.compare` and the checks of `parity.engine.consistency` accept.

The bugs are the ones people make when porting these models. `CATALOGUE` (bottom of the file)
lists them as data: which families each applies to, which layer it is planted in, where local
mode must pin it, and which check is expected to catch it (`parity detection` measures all of
this and writes the detection-power table).

  WrongScale          scores scaled by 1/head_dim instead of 1/sqrt(head_dim) (GPT-Neo: scaled at
                      all); the union of ScaleTwice and NeoScaled, kept for older tests
  ScaleMissing        no 1/sqrt(head_dim) at all
  ScaleTwice          the scale applied twice (1/head_dim)
  NeoScaled           GPT-Neo's scores scaled by 1/sqrt(head_dim), which its checkpoints never were
  SoftmaxWrongAxis    softmax over the query axis instead of the key axis
  MaskOffByOne        the causal mask lets query i see key i+1
  WindowOffByOne      a GPT-Neo local layer sees window_size + 1 keys
  RotateHalf          GPT-J rotary by rotate-half (NeoX/LLaMA) instead of interleaved pairs
  RotaryWrongDims     GPT-J rotary on the last rotary_dim dims of each head instead of the first
  WrongLnEps          LayerNorm epsilon far from the config's
  UnbiasedLnVariance  LayerNorm with the unbiased (1/(d-1)) variance
  WrongGelu           tanh gelu with 2/pi where sqrt(2/pi) belongs
  NoUpcast            q.k^T computed and stored in the half dtype where the family upcasts
  ParallelSequential  GPT-J's parallel block made sequential (the MLP sees h + attn)
  OpenAIPreLN         an OpenAI GPT block computed pre-LN like GPT-2
  LmHeadBiasDropped   GPT-J's LM-head bias dropped
  CacheForgets        the KV cache loses its most recent entry when new tokens arrive
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from parity.subjects.fast import FastModel, _rotate_every_two


class Mutant(FastModel):
    """A FastModel with one bug in layer `layer`."""

    layer = 1

    def __init__(self, *args, layer: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if layer is not None:
            self.layer = layer


# ----------------------------------------------------------------------------- scaling
class ScaleMutant(Mutant):
    """Layer `layer` scales its scores by `wrong(healthy (multiplier, divisor) or None, hd)`."""

    def wrong(self, healthy, hd):  # pragma: no cover - every subclass overrides it
        raise NotImplementedError

    def scale(self, i):
        healthy = super().scale(i)
        return healthy if i != self.layer else self.wrong(healthy, self.cfg.head_dim)


class WrongScale(ScaleMutant):
    """Layer `layer` scales its scores by 1/hd (GPT-Neo: by 1/sqrt(hd)); other layers healthy."""

    def wrong(self, healthy, hd):
        return (hd ** -0.5, math.sqrt(hd)) if healthy is None else (1 / hd, hd)


class ScaleMissing(ScaleMutant):
    """The 1/sqrt(hd) (and any inverse-layer factor) left out: raw q.k^T into the softmax."""

    def wrong(self, healthy, hd):
        return None


class ScaleTwice(ScaleMutant):
    """The family's scale applied twice (e.g. divided in the GEMM's alpha and again after)."""

    def wrong(self, healthy, hd):
        return None if healthy is None else (healthy[0] ** 2, healthy[1] ** 2)


class NeoScaled(ScaleMutant):
    """GPT-Neo's scores scaled by 1/sqrt(hd) like GPT-2's: its checkpoints were never trained so."""

    def wrong(self, healthy, hd):
        return (hd ** -0.5, math.sqrt(hd))


# ----------------------------------------------------------------------------- softmax and masks
class SoftmaxWrongAxis(Mutant):
    """Layer `layer` normalises its probabilities over the queries (dim=-2), not the keys."""

    def attend(self, ctx, i, q, k, v):
        if i != self.layer:
            return super().attend(ctx, i, q, k, v)
        num = self.num
        num.softmax = lambda s, dt: num.r(torch.softmax(s, dim=-2), dt)
        try:
            return super().attend(ctx, i, q, k, v)
        finally:
            del num.softmax


class MaskOffByOne(Mutant):
    """Layer `layer` lets query i see key i+1 (one future token)."""

    def visible(self, ctx, i):
        vis = super().visible(ctx, i)
        if i != self.layer:
            return vis
        # shift the healthy mask one key to the right and add it: j <= i + 1
        ahead = F.pad(vis[..., :-1], (1, 0), value=False)
        return vis | ahead


class WindowOffByOne(Mutant):
    """GPT-Neo local layer `layer` sees keys with i - j <= window_size (one too many): the
    `<` of the window rule written as `<=`."""

    def visible(self, ctx, i):
        vis = super().visible(ctx, i)
        if i != self.layer or self.cfg.layer_kind(i) != "local":
            return vis
        tk = ctx.past_len + ctx.ids.shape[1]
        j = torch.arange(tk, device=vis.device)[None, :]
        extra = (ctx.q_index[:, None] - j == self.cfg.window_size)[None, None]
        if ctx.key_mask is not None:
            extra = extra & ctx.key_mask[:, None, None, :]
        return vis | extra


class CacheForgets(Mutant):
    """With a past cache, layer `layer` loses the cache's most recent entry (a length counter
    one short): the new tokens cannot attend to the token just before them. Without a cache the
    layer is healthy, so only a check that decodes with the cache can see it."""

    def visible(self, ctx, i):
        vis = super().visible(ctx, i)
        if i != self.layer or not ctx.past_len:
            return vis
        vis = vis.clone()
        vis[..., ctx.past_len - 1] = False
        return vis


class PadsLeak(Mutant):
    """Every layer lets real tokens see the left padding (the key mask dropped, causality
    kept): only a padded batch shows it. Used by the batch checks' can-fail tests, not the
    detection catalogue (no layer argument)."""

    def visible(self, ctx, i):
        vis = super().visible(ctx, i)
        causal = torch.arange(vis.shape[-1])[None, :] <= ctx.q_index[:, None]
        return vis | causal[None, None]


# ----------------------------------------------------------------------------- rotary (GPT-J)
class RotaryMutant(Mutant):
    """Knows which layer's attention is running, so that `rotary` can break in one layer."""

    _now: int | None = None

    def attention(self, ctx, i, x):
        self._now = i
        try:
            return super().attention(ctx, i, x)
        finally:
            self._now = None

    def rotary(self, ctx, x):
        if self._now != self.layer:
            return super().rotary(ctx, x)
        return self.wrong_rotary(ctx, x)

    def wrong_rotary(self, ctx, x):  # pragma: no cover - every subclass overrides it
        raise NotImplementedError


class RotateHalf(RotaryMutant):
    """Layer `layer` rotates (first half, second half) pairs with NeoX/LLaMA's rotate_half and a
    half-split sin/cos table, where GPT-J rotates interleaved pairs (x0, x1), (x2, x3), ...
    Same rounding points as HF's native rotary: sin/cos in x's dtype, each product rounded."""

    def wrong_rotary(self, ctx, x):
        R, num = self.cfg.rotary_dim, self.num
        sin, cos = self._sincos(ctx)  # (B, T, 1, R), interleaved duplicates
        sin, cos = (torch.cat([z[..., 0::2], z[..., 0::2]], dim=-1) for z in (sin, cos))
        rot, rest = x[..., :R], x[..., R:]
        half = torch.cat([-rot[..., R // 2:], rot[..., :R // 2]], dim=-1)
        y = num.r(num.r(rot * cos) + num.r(half * sin))
        return torch.cat([y, rest], dim=-1)


class RotaryWrongDims(RotaryMutant):
    """Layer `layer` rotates the last rotary_dim dims of each head instead of the first."""

    def wrong_rotary(self, ctx, x):
        R, num = self.cfg.rotary_dim, self.num
        sin, cos = self._sincos(ctx)
        keep, rot = x[..., :-R], x[..., -R:]
        y = num.r(num.r(rot * cos) + num.r(_rotate_every_two(rot) * sin))
        return torch.cat([keep, y], dim=-1)


# ----------------------------------------------------------------------------- layer norm
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


class UnbiasedLnVariance(Mutant):
    """ln_1 of layer `layer` divides the squared deviations by d - 1 (torch.var's default)
    instead of d: the output shrinks by sqrt((d-1)/d), a relative error of about 1/(2d). Computed
    in fp32 and rounded once, like the healthy kernel."""

    def layer_norm(self, x, prefix):
        if prefix != f"h.{self.layer}.ln_1":
            return super().layer_norm(x, prefix)
        num = self.num
        x32 = num.upcast(x)
        mu = x32.mean(dim=-1, keepdim=True)
        var = x32.var(dim=-1, unbiased=True, keepdim=True)
        y = (x32 - mu) / torch.sqrt(var + self.cfg.layer_norm_epsilon)
        y = y * num.upcast(self.w(prefix + ".weight")) + num.upcast(self.w(prefix + ".bias"))
        return num.r(y)


# ----------------------------------------------------------------------------- MLP and head
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


class LmHeadBiasDropped(Mutant):
    """GPT-J's LM head without its bias (a port that assumes every head is bias-free)."""

    def _has(self, name):
        return name != "lm_head.bias" and super()._has(name)


# ----------------------------------------------------------------------------- attention upcast
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


# ----------------------------------------------------------------------------- block wiring
class ParallelSequential(Mutant):
    """GPT-J block `layer` made sequential: the MLP is fed ln_1(h + attn) instead of ln_1(h)
    (GPT-J has one LayerNorm per block, so the port reuses it)."""

    def block(self, ctx, i, h):
        if i != self.layer:
            return super().block(ctx, i, h)
        h = self._stream(h)
        s, p, r = f"blocks.{i}.", f"h.{i}.", self.num.r
        x = ctx.site(s + "ln_1", self.layer_norm(h, p + "ln_1"))
        h = r(self.attention(ctx, i, x) + h)
        m = self.mlp(ctx, i, self.layer_norm(h, p + "ln_1"))
        return ctx.site(s + "resid_post", r(h + m))


class OpenAIPreLN(Mutant):
    """OpenAI GPT block `layer` computed pre-LN like GPT-2: h + attn(ln_1(h)), then
    + mlp(ln_2(.)), with no LayerNorm on the output (the sites keep their post-LN names: ln_1
    records the pre-attention norm, ln_2 the un-normalised block output)."""

    def block(self, ctx, i, h):
        if i != self.layer:
            return super().block(ctx, i, h)
        h = self._stream(h)
        s, p, r = f"blocks.{i}.", f"h.{i}.", self.num.r
        x = self.layer_norm(h, p + "ln_1")
        n = ctx.site(s + "resid_mid", r(h + self.attention(ctx, i, x)))
        ctx.site(s + "ln_1", x)
        out = ctx.site(s + "resid_post", r(n + self.mlp(ctx, i, self.layer_norm(n, p + "ln_2"))))
        return ctx.site(s + "ln_2", out)


def factory(cls, layer: int):
    """`model_factory` for `compare`: builds `cls` with its bug in `layer`."""
    return functools.partial(cls, layer=layer)


# ----------------------------------------------------------------------------- the catalogue
ALL = ("openai-gpt", "gpt2", "gpt_neo", "gptj", "gptmeg")
# mutants of the shared attention code also run on GPT-NeoX (its conversion mutants are
# checkpoint-level: tests/test_gpt_neox.py)
ATTN_ALL = ALL + ("gpt_neox",)
SCALED = ("openai-gpt", "gpt2", "gptj", "gptmeg")  # families whose scores carry 1/sqrt(hd)


def middle_layer(cfg) -> int:
    """Not the first layer (so healthy layers precede the bug) and, with 3+ layers, not the
    last (so healthy layers follow it): layer 2 of the 4-layer tiny checkpoints."""
    return min(2, cfg.n_layer - 1)


def local_layer(cfg) -> int:
    """The first GPT-Neo local layer after layer 0 (layer 1 of the tiny checkpoint)."""
    return next(i for i in range(1, cfg.n_layer) if cfg.layer_kind(i) == "local")


@dataclass(frozen=True)
class Spec:
    """One catalogue entry.

    check: the check expected to catch it (parity.engine.consistency / parity.commands.detection): `layers`
    (a layer-by-layer comparison on the tiny checkpoint), `cache` (decoding with the KV cache
    against the full forward) or `stress` (the comparison on the stress checkpoint, where
    magnitudes are real-sized: a missing upcast is harmless until the values need the range
    it buys).
    dtypes: where the bug is a bug. A missing fp32 upcast is an *equivalent mutant* in bf16:
    bf16 has fp32's range, and rounding the scores costs no more than rounding q and k already
    did (measured floor ratio 1.03 at GPT-Neo's scores, fp16 and bf16 alike), so there is
    nothing to detect; in fp16 it overflows where the scores pass 65504.
    sites: site kinds (of the planted layer; `logits` for the head) where local mode must pin it.
    """

    name: str
    cls: type
    bug: str
    families: tuple[str, ...]
    sites: tuple[str, ...]
    check: str = "layers"
    layer: Callable = middle_layer
    dtypes: tuple[str, ...] = ("float16", "bfloat16")

    def planted(self, cfg) -> int | None:
        """The layer the bug goes into (None: the head)."""
        return None if self.sites == ("logits",) else self.layer(cfg)

    def expected_sites(self, cfg) -> set[str]:
        n = self.planted(cfg)
        return set(self.sites) if n is None else {f"blocks.{n}.{s}" for s in self.sites}

    def factory(self, cfg):
        n = self.planted(cfg)
        return factory(self.cls, 0 if n is None else n)


CATALOGUE: tuple[Spec, ...] = (
    Spec("scale-missing", ScaleMissing, "attention scores not scaled by 1/sqrt(head_dim)",
         SCALED, ("attn.scores",)),
    Spec("scale-twice", ScaleTwice, "attention scale applied twice (1/head_dim)", SCALED,
         ("attn.scores",)),
    Spec("neo-scaled", NeoScaled, "GPT-Neo scores scaled by 1/sqrt(head_dim)", ("gpt_neo",),
         ("attn.scores",)),
    Spec("softmax-wrong-axis", SoftmaxWrongAxis, "softmax over the query axis", ATTN_ALL,
         ("attn.probs",)),
    # the extra visible key is masked in the reference, so scores there are not compared; the
    # probability that leaks into it is
    Spec("causal-mask-off-by-one", MaskOffByOne, "causal mask lets query i see key i+1", ATTN_ALL,
         ("attn.probs",)),
    Spec("window-off-by-one", WindowOffByOne, "GPT-Neo local window one key too wide",
         ("gpt_neo",), ("attn.probs",), layer=local_layer),
    Spec("rotate-half", RotateHalf, "GPT-J rotary by rotate_half instead of interleaved pairs",
         ("gptj",), ("attn.q",)),
    Spec("rotary-wrong-dims", RotaryWrongDims, "GPT-J rotary on the last rotary_dim dims",
         ("gptj",), ("attn.q",)),
    Spec("ln-eps-wrong", WrongLnEps, "LayerNorm epsilon 1e-1 instead of 1e-5", ALL, ("ln_1",)),
    Spec("ln-unbiased-variance", UnbiasedLnVariance, "LayerNorm with unbiased variance", ALL,
         ("ln_1",)),
    Spec("gelu-constant", WrongGelu, "tanh gelu with 2/pi instead of sqrt(2/pi)", ALL,
         ("mlp.act",)),
    Spec("missing-upcast", NoUpcast, "GPT-Neo q.k^T and softmax in fp16 (no fp32 upcast)",
         ("gpt_neo",), ("attn.scores",), check="stress", dtypes=("float16",)),
    Spec("parallel-made-sequential", ParallelSequential, "GPT-J MLP fed ln_1(h + attn)",
         ("gptj",), ("mlp.fc_in",)),
    Spec("openai-pre-ln", OpenAIPreLN, "OpenAI GPT block computed pre-LN", ("openai-gpt",),
         ("attn.q",)),
    Spec("lm-head-bias-dropped", LmHeadBiasDropped, "GPT-J LM head without its bias",
         ("gptj",), ("logits",)),
    Spec("cache-forgets-one", CacheForgets, "KV cache loses its most recent entry", ATTN_ALL,
         ("attn.scores",), check="cache"),
)

BY_NAME = {s.name: s for s in CATALOGUE}


def cases(dtypes=("float16",)):
    """(spec, family, dtype) for every applicable combination, in catalogue order."""
    return [(s, f, d) for s in CATALOGUE for f in s.families for d in dtypes if d in s.dtypes]

"""The fast path (`--impl fast`): one torch implementation of the five families, with knobs.

It is what people run, reproduced knob by knob (`parity/subjects/knobs.py`), over the same weights and
the same sites as the float64 reference. Three ways to run the same code:

- CUDA: the real kernels in the model dtype.
- CPU emulation of CUDA half precision (default for fp16/bf16 on a CPU): tensors are physically
  float32 holding values exactly representable in the half dtype; every op computes in fp32 and
  its output is rounded (round to nearest even) exactly where a CUDA kernel writes its output.
- native CPU half (`emulate=False`): torch's own CPU fp16/bf16 kernels.

The one rule that makes this work is `Numerics.r(op(...), dtype)`: "this op writes its output in
`dtype`". On real kernels the op already wrote that dtype and `r` is a no-op; under emulation
`r` rounds. The op-by-op semantics are in `parity/subjects/EMULATION.md`.

Per-layer API (mirrors the reference, so that a lockstep comparison can feed the reference's
stream, rounded to the subject dtype, into one subject block):
    model = FastModel(ckpt, knobs, "float16", "cpu")
    ctx = model.prepare(inputs, past=None, sites=None)
    h = model.embed(ctx);  h = model.block(ctx, i, h);  model.head(ctx, h)
    trace = model.finish(ctx)          # or simply model.forward(inputs)
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

import reference
from reference import dtypes
from reference.ops import round_to
from reference.sites import site_names
from reference.trace import Recorder, Trace

from parity.devices import resolve_device
from parity.errors import ParityError
from parity.subjects import compiled as C
from parity.subjects.knobs import TANH_GELUS, Knobs, parse_variant

HALF = (torch.float16, torch.bfloat16)
TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
                "bfloat16": torch.bfloat16}
# the gelu constants, stated once in the reference (TorchScript copies below need literals)
SQRT_2_OVER_PI = reference.ops.SQRT_2_OVER_PI
MEGATRON_SQRT_2_OVER_PI = reference.ops.MEGATRON_SQRT_2_OVER_PI
GELU_CUBIC = reference.ops.GELU_CUBIC
FUSION_NODES = ("prim::TensorExprGroup", "prim::TensorExprDynamicGroup", "prim::FusionGroup",
                "prim::CudaFusionGroup")


def dtype_name(dtype) -> str:
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    d = dtypes.canonical(dtype)
    if d not in TORCH_DTYPES:
        raise ParityError(f"unknown dtype {dtype!r} (choose from {', '.join(TORCH_DTYPES)})")
    return d


# ----------------------------------------------------------------------------- the Megatron gelu
def megatron_gelu_form(x: torch.Tensor, c: float) -> torch.Tensor:
    """Megatron's op order, x 0.5 (1 + tanh(c x (1 + 0.044715 x x))), in whatever dtype x has."""
    return x * 0.5 * (1.0 + torch.tanh(c * x * (1.0 + GELU_CUBIC * x * x)))


# Scripted copies (TorchScript needs the constants in the source). Megatron's
# `fused_bias_gelu.py` is `@torch.jit.script` over exactly this expression.
def _gelu_megatron_const(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1.0 + 0.044715 * x * x)))


def _gelu_full_const(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5 * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


_SCRIPTED: dict[bool, Callable] = {}


def scripted_gelu(megatron_constant: bool) -> Callable:
    """torch.jit.script of the Megatron gelu, made on first use (scripting costs ~0.1 s)."""
    if megatron_constant not in _SCRIPTED:
        fn = _gelu_megatron_const if megatron_constant else _gelu_full_const
        with warnings.catch_warnings():  # deprecated in torch 2.x; it is what Megatron runs
            warnings.simplefilter("ignore", DeprecationWarning)
            _SCRIPTED[megatron_constant] = torch.jit.script(fn)
    return _SCRIPTED[megatron_constant]


def graph_is_fused(graph) -> bool:
    """Did the TorchScript executor put the ops in a fusion group (NNC / nvFuser / legacy)?"""
    text = str(graph)
    return any(k in text for k in FUSION_NODES)


HEAD_CHUNK_ELEMENTS = 1 << 24  # LM-head weight elements converted at once (bounded memory)


# ----------------------------------------------------------------------------- numerics
class Numerics:
    """Where results get rounded; see the module docstring and EMULATION.md."""

    def __init__(self, dtype="float16", device="cpu", emulate: bool | None = None):
        self.dtype = TORCH_DTYPES[dtype_name(dtype)]
        self.device = torch.device(resolve_device(device))
        half = self.dtype in HALF
        self.emulate = half and (self.device.type == "cpu" if emulate is None else bool(emulate))
        self.phys = torch.float32 if self.emulate else self.dtype  # physical dtype of a tensor
        self.up = torch.float64 if self.dtype == torch.float64 else torch.float32  # never down
        self._warm: set = set()
        self.jit_fused: bool | None = None  # AND over the scripted-gelu calls made so far
        self.compiled = False  # traced by torch.compile: no TorchScript, no host syncs

    # -- rounding and dtypes
    def r(self, x: torch.Tensor, dt: torch.dtype | None = None) -> torch.Tensor:
        """The op that produced x writes its output in logical dtype `dt` (default: the model
        dtype). Emulated halves are rounded (RNE) and kept as float32; otherwise a cast, which is
        a no-op when the kernel already wrote that dtype."""
        dt = dt or self.dtype
        if self.emulate:
            return x.to(dt).to(torch.float32) if dt in HALF else x.to(torch.float32)
        return x.to(dt)

    def upcast(self, x: torch.Tensor) -> torch.Tensor:
        """An explicit `.float()` (or nothing, in float64): exact."""
        return x.to(torch.float32 if self.emulate else self.up)

    def c(self, value: float, dt: torch.dtype | None = None) -> float:
        """A Python scalar as the kernel sees it: CUDA (and CPU) elementwise kernels of fp16,
        bf16 and fp32 compute in fp32 ("opmath") and convert the scalar to fp32 once."""
        dt = dt or self.dtype
        return value if dt == torch.float64 else float(np.float32(value))

    def tensor(self, a, dt: torch.dtype | None = None) -> torch.Tensor:
        """Bring an array (NumPy or torch, any float dtype) into the subject: correctly rounded
        to `dt` (default the model dtype), in the physical dtype, on the device. float64 goes
        through `round_to` because torch converts float64 to half via float32 (two roundings)."""
        dt = dt or self.dtype
        t = torch.as_tensor(a)
        if not t.is_floating_point():
            return t.to(self.device)
        if t.dtype == torch.float64 and dt in HALF:
            t = torch.from_numpy(round_to(t.cpu().numpy(), dtype_name(dt)))
        t = t.to(device=self.device)
        return self.r(t.to(dt) if dt in HALF else t, dt)

    # -- GEMMs: half inputs, fp32 accumulation, one rounding of the output
    def linear(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
               dt: torch.dtype | None = None) -> torch.Tensor:
        """x (..., K) @ w (K, N) (+ bias), as HF's Conv1D `addmm(bias, x, W)` and nn.Linear
        (`addmm(bias, x, W^T)` for contiguous input): the bias joins the fp32 accumulator before
        the single rounding (cuBLAS epilogue / beta=1)."""
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.addmm(bias, x2, w) if bias is not None else torch.mm(x2, w)
        return self.r(y, dt).reshape(*x.shape[:-1], w.shape[-1])

    def matmul(self, a: torch.Tensor, b: torch.Tensor, dt: torch.dtype | None = None):
        return self.r(torch.matmul(a, b), dt)

    def baddbmm(self, q: torch.Tensor, kT: torch.Tensor, alpha: float,
                dt: torch.dtype | None = None) -> torch.Tensor:
        """baddbmm(empty, q, k^T, beta=0, alpha) in q's dtype: alpha multiplies the fp32
        accumulator before the one rounding (cuBLAS: D = alpha * acc)."""
        dt = dt or self.dtype
        if self.emulate:
            return self.r(torch.matmul(q, kT) * self.c(alpha, torch.float32), dt)
        b, h, t, hd = q.shape
        tk = kT.shape[-1]
        buf = torch.empty(b * h, t, tk, dtype=q.dtype, device=q.device)
        s = torch.baddbmm(buf, q.reshape(b * h, t, hd), kT.reshape(b * h, hd, tk),
                          beta=0, alpha=alpha)
        return self.r(s.view(b, h, t, tk), dt)

    def div(self, x: torch.Tensor, divisor: float, dt: torch.dtype | None = None):
        """x / python_float. CUDA turns a division by a CPU scalar into a multiplication by its
        fp32 reciprocal (`BinaryDivTrueKernel.cu`); the emulation does exactly that."""
        dt = dt or self.dtype
        if self.emulate:
            inv = float(np.float32(1.0) / np.float32(divisor))
            return self.r(x * inv, dt)
        return self.r(x / divisor, dt)

    # -- reductions: fp32 inside, one rounding of the output
    def layer_norm(self, x, w, b, eps: float, fp32: bool = False):
        """nn.LayerNorm; `fp32` = Megatron/GPTMeg's upcast LN (x, gamma, beta in fp32, result
        cast back). CUDA's half LayerNorm is fp32 inside too, so both round once."""
        d = (x.shape[-1],)
        if fp32 and not self.emulate and self.dtype in HALF:
            return self.r(F.layer_norm(x.float(), d, w.float(), b.float(), eps))
        return self.r(F.layer_norm(x, d, w, b, eps))

    def softmax(self, s: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        return self.r(torch.softmax(s, dim=-1), dt)

    # -- elementwise pieces that need care
    def pow3(self, x: torch.Tensor) -> torch.Tensor:
        """torch.pow(x, 3.0). For half, CUDA's kernel evaluates `base * base * base` in Half
        arithmetic (`PowKernel.cu`): two roundings."""
        if self.emulate:
            return self.r(self.r(x * x) * x)
        return self.r(torch.pow(x, 3.0))

    def gelu(self, x: torch.Tensor, form: str, activation: str) -> torch.Tensor:
        """The activation of the MLP, evaluated the way `form` (the gelu knob) says."""
        r, c = self.r, self.c
        if activation == "relu":
            return r(F.relu(x))
        if activation in ("silu", "swish"):
            return r(F.silu(x))
        if form == "erf":
            return r(F.gelu(x))
        if form == "torch_tanh":
            return r(F.gelu(x, approximate="tanh"))
        if form == "jit":
            return self.jit_gelu(x, activation == "gelu_megatron")
        # eager composite: every op writes a half tensor, in the source's op order
        if activation == "gelu_megatron":  # Megatron's formula run eagerly
            a = r(x * c(0.5))
            inner = r(r(c(GELU_CUBIC) * x) * x)
            inner = r(r(c(MEGATRON_SQRT_2_OVER_PI) * x) * r(1.0 + inner))
            return r(a * r(1.0 + r(torch.tanh(inner))))
        if activation == "gelu_fast":  # HF FastGELU: 0.5 x (1 + tanh(x 0.7978845608 (1 + 0.044715 x x)))
            a = r(c(0.5) * x)
            inner = r(r(x * c(reference.ops.GELU_FAST_C)) * r(1.0 + r(r(c(GELU_CUBIC) * x) * x)))
            return r(a * r(1.0 + r(torch.tanh(inner))))
        # HF NewGELU (gelu_new, and 'tanh' forced on any tanh-form model):
        # 0.5 * input * (1.0 + tanh(sqrt(2/pi) * (input + 0.044715 * pow(input, 3.0))))
        a = r(c(0.5) * x)
        inner = r(c(SQRT_2_OVER_PI) * r(x + r(c(0.044715) * self.pow3(x))))
        return r(a * r(1.0 + r(torch.tanh(inner))))

    def jit_gelu(self, x: torch.Tensor, megatron_constant: bool) -> torch.Tensor:
        """The scripted Megatron gelu. Fused (NNC / nvFuser on CUDA) it computes in fp32 and
        rounds once; the emulation does that. Real runs warm the profiling executor up on each
        new input signature (the first calls run unfused, pytorch #80606) and record whether a
        fusion group was really used."""
        const = MEGATRON_SQRT_2_OVER_PI if megatron_constant else SQRT_2_OVER_PI
        if self.emulate or self.compiled:  # compiled: Inductor fuses the same expression
            return self.r(megatron_gelu_form(x, self.c(const, torch.float32)))
        fn = scripted_gelu(megatron_constant)
        key = (tuple(x.shape), x.dtype, str(x.device), megatron_constant)
        if key not in self._warm:
            for _ in range(3):
                fn(x)
            self._warm.add(key)
        y = fn(x)
        fused = graph_is_fused(torch.jit.last_executed_optimized_graph())
        self.jit_fused = fused if self.jit_fused is None else (self.jit_fused and fused)
        return self.r(y)


# ----------------------------------------------------------------------------- score scales
def _scale_gpt2(cfg, i):
    """(multiplier, divisor) of the scores; HF v5 multiplies by head_dim**-0.5 / (layer + 1)."""
    mul, div = 1.0, 1.0
    if cfg.scale_attn_weights:
        mul, div = cfg.head_dim ** -0.5, math.sqrt(cfg.head_dim)
    if cfg.scale_attn_by_inverse_layer_idx:
        mul, div = mul / float(i + 1), div * (i + 1)
    return (mul, div) if (cfg.scale_attn_weights or cfg.scale_attn_by_inverse_layer_idx) else None


def _scale_sqrt(cfg, i):
    return cfg.head_dim ** -0.5, math.sqrt(cfg.head_dim)


def _scale_none(cfg, i):
    return None  # GPT-Neo: no scaling at all


# the score-scale rules of the registry (`Family.scale`)
SCALES: dict[str, Callable] = {"config": _scale_gpt2, "inv_sqrt_hd": _scale_sqrt,
                               "none": _scale_none}


# ----------------------------------------------------------------------------- context
@dataclass
class FastContext:
    """Per-forward state: inputs on the device, masks, past/present cache, the trace."""

    trace: Trace
    rec: Recorder
    ids: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T)
    q_index: torch.Tensor  # (T,) absolute indices of the new tokens
    key_mask: torch.Tensor | None  # (B, T_past + T) bool, or None
    past: list | None  # per layer (k, v) subject tensors (B, H, T_past, hd)
    to_numpy: Callable
    present: dict = field(default_factory=dict)
    logits: torch.Tensor | None = None
    _visible: dict = field(default_factory=dict)
    _wants: dict = field(default_factory=dict)
    _sincos: tuple | None = None

    def wants(self, name: str) -> bool:
        if name not in self._wants:
            self._wants[name] = self.rec.wants(name)
        return self._wants[name]

    def site(self, name: str, x: torch.Tensor, dt: torch.dtype | None = None) -> torch.Tensor:
        """Record a float64 copy of the subject's value (if the site is selected)."""
        if self.wants(name):
            self.trace.sites[name] = self.to_numpy(x)
            self.trace.dtypes[name] = dtype_name(dt) if dt is not None else self.trace.meta["dtype"]
        return x

    @property
    def past_len(self) -> int:
        return 0 if not self.past else int(self.past[0][0].shape[2])


@dataclass
class GraphContext:
    """What one compiled block (or head) sees of a FastContext: the same masks, rotary table and
    cache, every host-side decision already made, and sites kept as tensors (`out`): a site
    becomes a graph output, never a NumPy copy inside the graph. `past` is keyed by the layer
    index the graph was traced with."""

    wanted: frozenset
    ids: torch.Tensor
    position_ids: torch.Tensor
    q_index: torch.Tensor
    key_mask: torch.Tensor | None
    past: dict | None
    past_len: int
    _visible: dict
    _sincos: tuple | None
    out: dict = field(default_factory=dict)
    present: dict = field(default_factory=dict)
    logits: torch.Tensor | None = None

    def wants(self, name: str) -> bool:
        return name in self.wanted

    def site(self, name: str, x: torch.Tensor, dt: torch.dtype | None = None) -> torch.Tensor:
        if name in self.wanted:
            self.out[name] = x
        return x


# ----------------------------------------------------------------------------- the model
class FastModel:
    """One torch implementation of the five families, numerics chosen by `knobs`."""

    def __init__(self, ckpt, knobs: Knobs | str | None = None, dtype="float16", device="cpu",
                 emulate: bool | None = None, cache_weights: bool = True,
                 variant: str | None = None, compile: str | None = "off"):
        self.ckpt, self.cfg = ckpt, ckpt.config
        self.family = self.cfg.family
        try:
            # where the family keeps its weights and how its block is wired
            self.fam = reference.family(self.family)
        except reference.UnknownFamily as e:
            raise ParityError(f"fast path: {e}") from None
        if knobs is None or isinstance(knobs, str):
            variant = variant or knobs or "hf"
            knobs = parse_variant(variant, self.family, self.cfg)
        self.knobs = knobs
        self.variant = variant or knobs.describe()
        dtype = knobs.force_dtype or dtype_name(dtype)
        self.compile = C.parse(compile)
        C.check_emulate(self.compile, emulate)
        if self.compile != "off":
            emulate = False  # Inductor's own kernels in the real dtype
        self.num = Numerics(dtype, torch.device(resolve_device(device)), emulate)
        self.num.compiled = self.compile != "off"
        if self.num.device.type == "cpu" and knobs.sdpa_backend in ("efficient", "cudnn"):
            raise ParityError(f"variant: sdpa_backend={knobs.sdpa_backend} has no CPU kernel (on "
                              f"a CPU: default, math, flash)")
        self.dtype = self.num.dtype
        self.cache_weights = cache_weights
        self._w: dict[str, torch.Tensor] = {}
        self._rotary_table: dict = {}
        self._fills: dict = {}
        self._present: dict = {}
        self._graph_fns: dict = {}  # "block" / "head" -> the torch.compile'd callable
        # what a compiled block returns besides its output: "outputs" = nothing (every block
        # output and the logits, as an uncaptured compiled model computes them), "all" = every
        # site as a graph output, which changes what Inductor fuses (benchmarks/README.md)
        self.compile_capture = "outputs"
        self._layer_weights: dict = {}

    # -- weights: read lazily from the checkpoint, converted to the subject dtype
    def w(self, name: str) -> torch.Tensor:
        if name in self._w:
            return self._w[name]
        t = self.num.tensor(self.ckpt.tensor(name))
        if self.cache_weights:
            self._w[name] = t
        return t

    def _has(self, name: str) -> bool:
        if name not in self._present:
            self._present[name] = self.ckpt.has(name)
        return self._present[name]

    # -- inputs
    def prepare(self, inputs, past=None, sites=None) -> FastContext:
        """Inputs (parity.checkpoints.inputs.Inputs or anything with input_ids / attention_mask /
        position_ids) and an optional past cache in the reference layout (per layer (k, v)
        float64 arrays (B, H, T_past, hd)) -> the context the per-layer methods use."""
        ids = np.asarray(getattr(inputs, "input_ids", inputs), dtype=np.int64)
        if ids.ndim != 2:
            raise ParityError(f"input_ids must be [B, T], got shape {list(ids.shape)}")
        b, t = ids.shape
        past_t = None
        if past:
            if len(past) != self.cfg.n_layer:
                raise ParityError(f"past has {len(past)} layers, the model {self.cfg.n_layer}")
            past_t = [(self.num.tensor(k), self.num.tensor(v)) for k, v in past]
        past_len = 0 if not past_t else int(past_t[0][0].shape[2])
        pos = getattr(inputs, "position_ids", None)
        if pos is None:
            pos = np.broadcast_to(np.arange(past_len, past_len + t), (b, t))
        pos = np.asarray(pos, dtype=np.int64)
        if pos.shape != (b, t):
            raise ParityError(f"position_ids has shape {list(pos.shape)}, expected {[b, t]}")
        if pos.min() < 0 or pos.max() >= self.cfg.n_positions:
            raise ParityError(f"position ids must lie in [0, {self.cfg.n_positions})")
        mask = getattr(inputs, "attention_mask", None)
        if mask is not None:
            mask = np.asarray(mask, dtype=np.int64)
            if mask.shape != (b, past_len + t):
                raise ParityError(f"attention_mask has shape {list(mask.shape)}, expected "
                                  f"{[b, past_len + t]} (past plus new tokens)")
        pos = np.array(pos, dtype=np.int64)  # a writable copy (broadcast views are read-only)
        trace = Trace(family=self.family, input_ids=ids, attention_mask=mask,
                      position_ids=pos, meta=self.meta())
        dev = self.num.device
        return FastContext(
            trace=trace,
            rec=Recorder(trace, sites),
            ids=torch.as_tensor(ids, device=dev),
            position_ids=torch.as_tensor(pos, device=dev),
            q_index=torch.arange(past_len, past_len + t, device=dev),
            key_mask=None if mask is None else torch.as_tensor(mask != 0, device=dev),
            past=past_t,
            to_numpy=self.to_numpy,
        )

    @staticmethod
    def to_numpy(x: torch.Tensor) -> np.ndarray:
        """float64 copy of a subject tensor (exact: every subject value is a float64 value).
        NumPy's cast is ~4x faster than torch's `.to(float64)` here, which matters for the
        cost of capturing every site."""
        x = x.detach()
        if x.device.type != "cpu":
            x = x.cpu()
        if x.dtype == torch.bfloat16:  # NumPy has no bfloat16; the widening is exact
            x = x.float()
        return x.numpy().astype(np.float64)

    def meta(self) -> dict[str, str]:
        num = self.num
        dev = str(num.device)
        if num.device.type == "cuda":
            dev += f" ({torch.cuda.get_device_name(num.device)})"
        return {
            "impl": "fast",
            "producer": f"gpt-parity fast ({self.variant}, {dtype_name(self.dtype)}, "
                        f"{num.device}{', emulated' if num.emulate else ''}"
                        f"{', compiled ' + self.compile if num.compiled else ''})",
            "variant": self.variant,
            "knobs": self.knobs.describe(),
            "dtype": dtype_name(self.dtype),
            "device": dev,
            "emulate": "on" if num.emulate else "off",
            "jit_fused": self._jit_state(),
            "torch": torch.__version__,
            **C.meta(self.compile, num.device),
        }

    def _jit_state(self) -> str:
        if self.knobs.gelu != "jit" or self.cfg.activation not in TANH_GELUS:
            return "n.a."
        if self.num.emulate:
            return "emulated"
        if self.num.compiled:
            return "inductor"
        return "n.a." if self.num.jit_fused is None else str(self.num.jit_fused).lower()

    # -- masks
    def visible(self, ctx: FastContext, i: int) -> torch.Tensor:
        """Bool (B or 1, 1, T, T_k): causal, GPT-Neo's window on local layers, real keys only.
        A query row that sees nothing (a padded query) is opened to every key, so that it stays
        finite; such rows are never compared (the reference gives them probabilities 0)."""
        kind = self.cfg.layer_kind(i)
        if kind not in ctx._visible:
            tk = ctx.past_len + ctx.ids.shape[1]
            qi = ctx.q_index[:, None]
            j = torch.arange(tk, device=qi.device)[None, :]
            vis = j <= qi
            if kind == "local":
                vis = vis & ((qi - j) < self.cfg.window_size)
            vis = vis[None, None]
            if ctx.key_mask is not None:
                vis = vis & ctx.key_mask[:, None, None, :]
            vis = vis | ~vis.any(dim=-1, keepdim=True)
            ctx._visible[kind] = vis
        return ctx._visible[kind]

    def _causal_only(self, ctx: FastContext, i: int) -> bool:
        """sdpa may use is_causal=True: no padding, no past, not a windowed layer (decided
        once per context and layer kind: a host-side decision)."""
        key = ("causal", self.cfg.layer_kind(i))
        if key not in ctx._visible:
            ctx._visible[key] = (ctx.key_mask is None or bool(ctx.key_mask.all())) \
                and not ctx.past and self.cfg.layer_kind(i) == "global"
        return ctx._visible[key]

    def fill(self, dt: torch.dtype) -> float:
        """The masked-score value of the mask_fill knob, as the scores' dtype holds it."""
        if dt not in self._fills:
            f = self.knobs.mask_fill
            v = torch.finfo(dt).min if f == "finfo_min" else {"-1e4": -1e4, "-1e9": -1e9,
                                                                "-inf": -math.inf}[f]
            self._fills[dt] = float(torch.tensor(v, dtype=torch.float64).to(dt))
        return self._fills[dt]

    # -- pieces
    def layer_norm(self, x, prefix: str):
        return self.num.layer_norm(x, self.w(prefix + ".weight"), self.w(prefix + ".bias"),
                                   self.cfg.layer_norm_epsilon,
                                   fp32=self.knobs.layernorm == "fp32")

    def proj(self, x, prefix: str, bias: bool = True):
        """Conv1D (weight [in, out]) or nn.Linear (weight [out, in]) of this family."""
        w = self.w(prefix + ".weight")
        return self.num.linear(x, w if self.fam.conv1d else w.t(),
                               self.w(prefix + ".bias") if bias else None)

    def lookup(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Embedding lookup. Without the weight cache (the gate's bounded-memory mode) only the
        rows the ids use are read from the checkpoint; the values are the same."""
        if self.cache_weights or name in self._w:
            return F.embedding(ids, self.w(name))
        uniq, inv = torch.unique(ids.cpu(), return_inverse=True)
        rows = self.num.tensor(self.ckpt.rows(name, uniq.numpy()))
        return F.embedding(inv.to(self.num.device), rows)

    def embed(self, ctx: FastContext, ids=None) -> torch.Tensor:
        ids = ctx.ids if ids is None else torch.as_tensor(np.asarray(ids), device=ctx.ids.device)
        tok, *pos = self.fam.embeddings
        h = self.lookup(tok, ids)
        if pos:
            h = self.num.r(h + self.lookup(pos[0], ctx.position_ids))
        return ctx.site("embed", h)

    def _stream(self, h) -> torch.Tensor:
        if isinstance(h, torch.Tensor) and h.dtype == self.num.phys and h.device == self.num.device:
            return h
        return self.num.tensor(h)

    def block(self, ctx: FastContext, i: int, h) -> torch.Tensor:
        """One block. `h` may be a subject tensor or any array (e.g. the reference's float64
        stream), which is rounded to the subject dtype first."""
        if self.num.compiled and isinstance(ctx, FastContext):
            return self._compiled_block(ctx, i, h)
        h = self._stream(h)
        s, p, r = f"blocks.{i}.", f"h.{i}.", self.num.r
        kind = self.cfg.block  # the family's, or what its config switches it to
        if kind == "pre":
            a = self.attention(ctx, i, ctx.site(s + "ln_1", self.layer_norm(h, p + "ln_1")))
            h = ctx.site(s + "resid_mid", r(a + h))  # HF: attn_output + residual
            m = self.mlp(ctx, i, ctx.site(s + "ln_2", self.layer_norm(h, p + "ln_2")))
            return ctx.site(s + "resid_post", r(h + m))  # HF: residual + feed_forward
        if kind == "post":
            a = self.attention(ctx, i, h)
            n = ctx.site(s + "resid_mid", r(h + a))
            n = ctx.site(s + "ln_1", self.layer_norm(n, p + "ln_1"))
            m = self.mlp(ctx, i, n)
            h = ctx.site(s + "resid_post", r(n + m))
            return ctx.site(s + "ln_2", self.layer_norm(h, p + "ln_2"))
        assert kind == "parallel", kind
        x = ctx.site(s + "ln_1", self.layer_norm(h, p + "ln_1"))  # one LN feeds both branches
        a = self.attention(ctx, i, x)
        if len(self.fam.ln) == 2:  # NeoX: a second LN of the same h feeds the MLP
            x = ctx.site(s + "ln_2", self.layer_norm(h, p + "ln_2"))
        m = self.mlp(ctx, i, x)
        # HF: attn + ff + residual (GPT-J), mlp + attn + residual (NeoX): one rounding each
        return ctx.site(s + "resid_post", r(r(a + m) + h))

    def mlp(self, ctx: FastContext, i: int, x) -> torch.Tensor:
        s, p = f"blocks.{i}.mlp.", f"h.{i}."
        a = ctx.site(s + "fc_in", self.proj(x, p + self.fam.fc_in))
        a = ctx.site(s + "act", self.num.gelu(a, self.knobs.gelu, self.cfg.activation))
        return ctx.site(s + "out", self.proj(a, p + self.fam.fc_out))

    def attention(self, ctx: FastContext, i: int, x) -> torch.Tensor:
        cfg, fam, p = self.cfg, self.fam, f"h.{i}."
        b, t, d = x.shape
        H, hd = cfg.n_head, cfg.head_dim
        if fam.fused_qkv and fam.qkv_layout == "per_head":  # [q_h0 | k_h0 | v_h0 | q_h1 ...]
            qkv = self.proj(x, p + fam.qkv[0], bias=fam.qkv_bias).reshape(b, t, H, 3 * hd)
            q, k, v = qkv.split(hd, dim=-1)
        else:
            if fam.fused_qkv:
                q, k, v = self.proj(x, p + fam.qkv[0], bias=fam.qkv_bias).split(d, dim=-1)
            else:
                q, k, v = (self.proj(x, p + name, bias=fam.qkv_bias) for name in fam.qkv)
            q, k, v = (z.reshape(b, t, H, hd) for z in (q, k, v))
        if fam.rotary:
            q, k = self.rotary(ctx, q), self.rotary(ctx, k)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (B, H, T, hd)
        if fam.rotary == "rotate_half" and not self.num.emulate:
            # HF rotates q and k in (B, H, T, hd) and concatenates: contiguous there. Native half
            # kernels sum in an order that depends on the layout (ATen's own fp16 GEMM, used
            # where oneDNN is not), so the real kernels are fed HF's layout
            q, k = q.contiguous(), k.contiguous()
        context = self.attend(ctx, i, q, k, v)
        return ctx.site(f"blocks.{i}.attn.out",
                        self.proj(context, p + fam.out_proj, bias=fam.out_bias))

    def attend(self, ctx: FastContext, i: int, q, k, v) -> torch.Tensor:
        """Scores, mask, softmax, P.V under the knobs; records q/k/v/scores/probs/context and
        returns the merged context (B, T, d)."""
        kn, num, pre = self.knobs, self.num, f"blocks.{i}.attn."
        ctx.site(pre + "q", q)
        ctx.site(pre + "k", k)
        ctx.site(pre + "v", v)
        if ctx.past:
            pk, pv = ctx.past[i]
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        ctx.present[i] = (k, v)
        scale = self.scale(i)  # (multiplier, divisor) or None
        vis = self.visible(ctx, i)
        if kn.attn_scores == "sdpa":
            out = self._sdpa(ctx, i, q, k, v, 1.0 if scale is None else scale[0], vis)
        else:
            qs, ks, sdt = q, k, self.dtype
            if kn.attn_upcast:
                qs, ks, sdt = num.upcast(q), num.upcast(k), num.up
            kT = ks.transpose(-1, -2)
            if kn.attn_scores == "baddbmm":
                alpha = 1.0 if scale is None else scale[0]
                if kn.qk_layer_scaling:
                    alpha = alpha / float(i + 1)
                s = num.baddbmm(qs, kT, alpha, sdt)
            else:
                s = num.matmul(qs, kT, sdt)
                if scale is not None:
                    s = (num.div(s, scale[1], sdt) if kn.scale_op == "div"
                         else num.r(s * num.c(scale[0], sdt), sdt))
            if kn.qk_layer_scaling:  # FusedScaleMaskSoftmax: fp32, times the layer number
                s, sdt = num.r(num.upcast(s) * float(i + 1), num.up), num.up
            s = torch.where(vis, s, self.fill(sdt))
            ctx.site(pre + "scores", s, sdt)
            if kn.softmax == "fp32" and sdt in HALF:
                s, sdt = num.upcast(s), num.up
            probs = num.r(num.softmax(s, sdt), self.dtype)  # then cast to v's dtype
            ctx.site(pre + "probs", probs)
            out = num.matmul(probs, v)
        b, h, t, hd = out.shape
        return ctx.site(pre + "context", out.transpose(1, 2).reshape(b, t, h * hd))

    def scale(self, i: int):
        """(multiplier, divisor) of layer i's scores under the family's scale rule, or None."""
        return SCALES[self.fam.scale](self.cfg, i)

    def _sdpa(self, ctx, i, q, k, v, scale: float, vis) -> torch.Tensor:
        """torch's fused attention. Emulated: scores and probabilities stay fp32 (never rounded),
        the output is rounded once. Real kernels: the kernel's output; the scores/probs sites
        (if asked for) are recomputed in fp32, which is what the fused kernel holds inside."""
        num, pre = self.num, f"blocks.{i}.attn."
        want = ctx.wants(pre + "scores") or ctx.wants(pre + "probs")
        out = None
        if not num.emulate:
            causal = self._causal_only(ctx, i)
            with sdpa_backend(self.knobs.sdpa_backend):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else vis,
                                                     is_causal=causal, scale=scale)
            out = num.r(out)
        if num.emulate or want:
            qs, ks, vs = num.upcast(q), num.upcast(k), num.upcast(v)
            s = torch.matmul(qs, ks.transpose(-1, -2)) * num.c(scale, num.up)
            s = torch.where(vis, s, -math.inf)
            ctx.site(pre + "scores", s, num.up)
            probs = torch.softmax(s, dim=-1)
            ctx.site(pre + "probs", probs, num.up)
            if out is None:
                out = num.r(torch.matmul(probs, vs))
        return out

    def rotary(self, ctx: FastContext, x: torch.Tensor) -> torch.Tensor:
        """Rotary on the first rotary_dim dims of each head, GPT-J's interleaved pairs or NeoX's
        rotate-half (the registry's `rotary` style). x: (B, T, H, hd).
        native (HF): sin/cos cast to x's dtype, (x*cos) + (rotate(x)*sin), each op rounded;
        fp32: computed in fp32, rounded once."""
        R, num = self.cfg.rotary_dim, self.num
        sin, cos = self._sincos(ctx)  # (B, T, 1, R) in the compute precision
        rot, rest = x[..., :R], x[..., R:]
        turn = _rotate_half if self.fam.rotary == "rotate_half" else _rotate_every_two
        if self.knobs.rotary == "fp32":
            ru = num.upcast(rot)
            y = num.r(ru * cos + turn(ru) * sin)
        else:
            y = num.r(num.r(rot * cos) + num.r(turn(rot) * sin))
        return torch.cat([y, rest], dim=-1)

    def _sincos(self, ctx: FastContext):
        if ctx._sincos is None:
            sin, cos = self.rotary_table()
            pos = ctx.position_ids.cpu()
            sin, cos = sin[pos], cos[pos]  # (B, T, R/2)
            if self.knobs.rotary == "native":  # HF: embed_positions[pos].to(x.dtype)
                sin, cos = self.num.tensor(sin), self.num.tensor(cos)
            else:
                sin, cos = (z.to(self.num.device, self.num.phys if self.dtype == torch.float64
                                 else torch.float32) for z in (sin, cos))
            if self.fam.rotary == "rotate_half":  # [f0..f_{R/2-1} | f0..f_{R/2-1}]
                sin, cos = (torch.cat([z, z], dim=-1)[:, :, None, :] for z in (sin, cos))
            else:  # each frequency twice, interleaved
                sin, cos = (torch.repeat_interleave(z[:, :, None, :], 2, dim=3)
                            for z in (sin, cos))
            ctx._sincos = (sin, cos)
        return ctx._sincos

    def rotary_table(self):
        """HF's `create_sinusoidal_positions` (GPT-J) / rotary_emb (NeoX, base rope_theta), in
        fp32 (float64 when the model runs in float64, where it must be exact): rows = positions,
        columns = R/2 frequencies."""
        if not self._rotary_table:
            n, R, base = self.cfg.n_positions, self.cfg.rotary_dim, self.cfg.rotary_base
            if self.dtype == torch.float64:
                s, c = reference.ops.rotary_half_sin_cos(np.arange(n), R, base)
                sin, cos = (torch.from_numpy(z[:, :R // 2].copy()) for z in (s, c))
            elif base != 10000.0:  # NeoX: base ** (arange(0, R, 2, float) / R), all in fp32
                inv_freq = 1.0 / (base ** (torch.arange(0, R, 2, dtype=torch.float) / R))
                inp = torch.arange(n, dtype=torch.int64).float()[:, None] * inv_freq
                sin, cos = torch.sin(inp), torch.cos(inp)
            else:
                inv_freq = 1.0 / (10000 ** (torch.arange(0, R, 2, dtype=torch.int64) / R))
                inp = torch.arange(n, dtype=torch.int64).float()[:, None] * inv_freq
                sin, cos = torch.sin(inp), torch.cos(inp)
            self._rotary_table.update(sin=sin, cos=cos)
        return self._rotary_table["sin"], self._rotary_table["cos"]

    def head(self, ctx: FastContext, h) -> torch.Tensor:
        if self.num.compiled and isinstance(ctx, FastContext):
            return self._compiled_head(ctx, h)
        h = self._stream(h)
        if self.fam.ln_f:
            h = ctx.site("ln_f", self.layer_norm(h, "ln_f"))
        tied = self.cfg.tie_word_embeddings
        name = self.fam.tok + ".weight" if tied else self.fam.lm_head + ".weight"
        bias_name = self.fam.lm_head + ".bias"
        bias = self.w(bias_name) if self._has(bias_name) else None
        if self.cache_weights or name in self._w:
            logits = self.num.linear(h, self.w(name).t(), bias)
        else:  # bounded memory: the vocabulary in chunks, each output element computed alike
            stored = self.ckpt.tensor(name)
            step = max(1, HEAD_CHUNK_ELEMENTS // stored.shape[1])
            logits = torch.cat([
                self.num.linear(h, self.num.tensor(stored[a:a + step]).t(),
                                None if bias is None else bias[a:a + step])
                for a in range(0, stored.shape[0], step)], dim=-1)
        ctx.logits = ctx.site("logits", logits)
        return ctx.logits

    def finish(self, ctx: FastContext) -> Trace:
        """Logits last, the present cache as float64 arrays, the final meta."""
        tr = ctx.trace
        tr.sites.pop("logits", None)
        tr.sites["logits"] = self.to_numpy(ctx.logits)
        tr.dtypes["logits"] = dtype_name(self.dtype)
        tr.cache = [tuple(self.to_numpy(z) for z in ctx.present[i]) for i in sorted(ctx.present)]
        tr.meta.update(self.meta())
        return tr

    # -- compiled subjects: one compiled graph per block shape, reused across layers
    def _canonical(self, i: int) -> int:
        """The first layer that computes like layer i (same layer kind, same score scale; with
        Megatron's layer scaling every layer is its own): its compiled graph serves layer i,
        fed layer i's weights under its names."""
        if self.knobs.qk_layer_scaling:
            return i
        kind, scale = self.cfg.layer_kind(i), self.scale(i)
        return next(j for j in range(i + 1)
                    if self.cfg.layer_kind(j) == kind and self.scale(j) == scale)

    def _graph(self, name: str):
        if name not in self._graph_fns:
            fn = self._graph_block if name == "block" else self._graph_head
            self._graph_fns[name] = C.compile_fn(fn, self.compile)
        return self._graph_fns[name]

    def _graph_block(self, gctx: GraphContext, j: int, h: torch.Tensor):
        out = self.block(gctx, j, h)
        return out, gctx.out, gctx.present

    def _graph_head(self, gctx: GraphContext, h: torch.Tensor):
        logits = self.head(gctx, h)
        return logits, gctx.out

    def _graph_context(self, ctx: FastContext, wanted, past=None) -> GraphContext:
        return GraphContext(wanted=frozenset(wanted), ids=ctx.ids, position_ids=ctx.position_ids,
                            q_index=ctx.q_index, key_mask=ctx.key_mask, past=past,
                            past_len=ctx.past_len, _visible=ctx._visible, _sincos=ctx._sincos)

    def _layer_names(self, i: int) -> list[str]:
        if i not in self._layer_weights:
            pre = f"h.{i}."
            self._layer_weights[i] = [n for n in reference.param_shapes(self.cfg)
                                      if n.startswith(pre)]
        return self._layer_weights[i]

    def _compiled_block(self, ctx: FastContext, i: int, h) -> torch.Tensor:
        """Layer i through the compiled graph of its canonical layer j. Host-side decisions
        (masks, sdpa's causal flag, rotary table, fill values) are made eagerly first; the
        graph returns the block output and the new cache rows (and, with compile_capture
        "all", every wanted site). Sites inside the block are not exposed by default: making
        one a graph output changes what Inductor fuses, hence the logits."""
        h = self._stream(h)
        j = self._canonical(i)
        self.visible(ctx, i)
        self._causal_only(ctx, i)
        if self.fam.rotary:
            self._sincos(ctx)
        for dt in (self.dtype, self.num.up):
            self.fill(dt)
        pre_i, pre_j = f"blocks.{i}.", f"blocks.{j}."
        out_kind = self.fam.block_output
        kinds = [s[len(pre_i):] for s in self.site_names() if s.startswith(pre_i)
                 and ctx.wants(s) and (self.compile_capture == "all"
                                       or s[len(pre_i):] == out_kind)]
        weights = {f"h.{j}." + n[len(f"h.{i}."):]: self.w(n) for n in self._layer_names(i)}
        gctx = self._graph_context(ctx, (pre_j + k for k in kinds),
                                   {j: ctx.past[i]} if ctx.past else None)
        saved, self._w = self._w, weights
        try:
            out, sites, present = C.call(self._graph("block"), (gctx, j, h),
                                         f"the fast path's block {j} ({self.variant})")
        finally:
            self._w = saved
        ctx.present[i] = present[j]
        t = ctx.ids.shape[1]
        cached = {"attn.k": present[j][0][:, :, -t:], "attn.v": present[j][1][:, :, -t:]}
        for k in (s[len(pre_i):] for s in self.site_names() if s.startswith(pre_i)):
            # the new cache rows are graph outputs anyway: exposing them changes nothing
            x = sites.get(pre_j + k, cached.get(k))
            if x is not None and ctx.wants(pre_i + k):
                ctx.site(pre_i + k, x, x.dtype)
        return out

    def _compiled_head(self, ctx: FastContext, h) -> torch.Tensor:
        """ln_f and the LM head as one compiled graph. The head matrix is held whole here (not
        in vocabulary chunks): the compiled gate is flat in depth, not in vocabulary size."""
        h = self._stream(h)
        tok = self.fam.tok + ".weight"
        names = [tok if self.cfg.tie_word_embeddings else self.fam.lm_head + ".weight"]
        if self._has(self.fam.lm_head + ".bias"):
            names.append(self.fam.lm_head + ".bias")
        if self.fam.ln_f:
            names += ["ln_f.weight", "ln_f.bias"]
        weights = {n: self.w(n) for n in names}
        gctx = self._graph_context(ctx, [s for s in ("ln_f", "logits") if ctx.wants(s)])
        saved, self._w = self._w, weights
        try:
            logits, sites = C.call(self._graph("head"), (gctx, h),
                                   f"the fast path's head ({self.variant})")
        finally:
            self._w = saved
        if "ln_f" in sites:
            ctx.site("ln_f", sites["ln_f"])
        ctx.logits = ctx.site("logits", logits)
        return ctx.logits

    @torch.no_grad()
    def forward(self, inputs, sites=None, past=None) -> Trace:
        ctx = self.prepare(inputs, past=past, sites=sites)
        h = self.embed(ctx)
        for i in range(self.cfg.n_layer):
            h = self.block(ctx, i, h)
        self.head(ctx, h)
        return self.finish(ctx)

    def site_names(self) -> list[str]:
        return site_names(self.family, self.cfg.n_layer, self.cfg.block)


SDPA_BACKENDS = {"math": "MATH", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "cudnn": "CUDNN_ATTENTION"}


def sdpa_backend(name: str):
    """The sdpa_backend knob as torch's context manager (nothing for `default`). Under the CPU
    emulation the knob does not apply: the emulation computes a fused kernel's fp32 math."""
    import contextlib

    if name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[name])])


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1 | x2] -> [-x2 | x1] (halves of the rotary dims): exact."""
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): exact (negation and moves only)."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def run(ckpt, inputs, variant: str | None = "hf", dtype="float16", device="cpu",
        emulate: bool | None = None, sites=None, past=None, compile: str | None = "off") -> Trace:
    """Entry point used by `parity.subjects.run` / `parity trace --impl fast`."""
    model = FastModel(ckpt, variant or "hf", dtype=dtype, device=device, emulate=emulate,
                      compile=compile)
    return model.forward(inputs, sites=sites, past=past)

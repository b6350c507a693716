"""Numerics knobs of the fast path (DESIGN.md "Numerics knobs"): a variant is a set of knobs.

A knob moves a rounding point or an upcast, never the math: in float64 every variant computes the
reference's function (the one exception is `gelu=erf|torch_tanh` forced onto a model whose config
says otherwise, which changes the function on purpose). What each knob does to the arithmetic is
written down op by op in `parity/subjects/EMULATION.md`.

Variant syntax (`--variant`):  PRESET[+KNOB=VALUE[,KNOB=VALUE...]]
    hf                         the family's Hugging Face eager numerics
    meg+gelu=tanh              Megatron numerics with the eager (unfused) gelu
    hf+attn_scores=baddbmm,layernorm=fp32
    attn_upcast=on             knobs alone start from `hf`
Booleans take on/off (also true/false, 1/0). A knob that does not apply to a family (rotary on
GPT-2, gelu on a relu model) is accepted and ignored.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from parity.errors import ParityError

PRESETS = ("hf", "meg", "meg-parallel", "sdpa", "naive-half", "fp32")

# knob -> allowed values (booleans listed as (False, True))
CHOICES: dict[str, tuple] = {
    "attn_scores": ("matmul", "baddbmm", "sdpa"),
    "attn_upcast": (False, True),
    "scale_op": ("mul", "div"),
    "qk_layer_scaling": (False, True),
    "softmax": ("fp32", "half"),
    "mask_fill": ("finfo_min", "-1e4", "-1e9", "-inf"),
    "gelu": ("tanh", "jit", "torch_tanh", "erf"),
    "layernorm": ("fp32", "native"),
    "rotary": ("native", "fp32"),
    # which fused kernel runs attn_scores=sdpa on real kernels (torch.nn.attention.sdpa_kernel):
    # default = torch's choice (the CPU flash kernel on a CPU); on a CPU only math and flash run
    "sdpa_backend": ("default", "math", "flash", "efficient", "cudnn"),
}
MASK_FILL_VALUES = {"-1e4": -1e4, "-1e9": -1e9, "-inf": float("-inf")}  # finfo_min: per dtype

# activations whose gelu knob means something: the tanh forms (evaluated eagerly op by op, by a
# fused scripted kernel, or by torch's one-kernel gelu) and the exact erf form
TANH_GELUS = ("gelu_new", "gelu_fast", "gelu_megatron", "gelu_pytorch_tanh")


@dataclass(frozen=True)
class Knobs:
    """One numerics recipe. Defaults are HF GPT-2 eager."""

    attn_scores: str = "matmul"  # matmul: q@k^T rounded, then scaled; baddbmm: scale inside the GEMM
    attn_upcast: bool = False  # q and k cast to fp32 before the score GEMM (scores stay fp32)
    scale_op: str = "mul"  # matmul path: multiply by the precomputed scale (v5) or divide by 1/scale
    qk_layer_scaling: bool = False  # Megatron: alpha = scale/layer_number, then x layer_number in fp32
    softmax: str = "half"  # half: softmax in the scores' own dtype; fp32: scores upcast first
    mask_fill: str = "finfo_min"  # value written into masked score entries (in the scores' dtype)
    gelu: str = "tanh"  # tanh: eager composite; jit: scripted Megatron form; torch_tanh; erf
    layernorm: str = "native"  # fp32: x, gamma, beta upcast and the result cast back
    rotary: str = "native"  # GPT-J: native = in q's dtype with the table in the model dtype
    sdpa_backend: str = "default"  # attn_scores=sdpa on real kernels: torch's choice, or forced
    force_dtype: str | None = None  # the fp32 preset runs in float32 whatever --dtype says

    def describe(self) -> str:
        """'attn_scores=matmul,attn_upcast=off,...' (round-trips through parse_knobs)."""
        parts = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "force_dtype":
                if v is not None:
                    parts.append(f"force_dtype={v}")
                continue
            if f.name == "sdpa_backend" and v == "default":
                continue  # named only when forced (older traces and goldens read the same)
            parts.append(f"{f.name}={_show(v)}")
        return ",".join(parts)

    def diff(self, other: "Knobs") -> dict[str, tuple]:
        """Knobs that differ: name -> (self value, other value)."""
        return {f.name: (getattr(self, f.name), getattr(other, f.name))
                for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(other, f.name)}

    def __str__(self) -> str:
        return self.describe()


def _show(v) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    return str(v)


# ----------------------------------------------------------------------------- per-family hf
def _family(name: str):
    from reference.families import UnknownFamily, family

    try:
        return family(name)
    except UnknownFamily:
        raise ParityError(f"no fast-path numerics for family {name!r}") from None


def _hf_gelu(activation: str) -> str:
    """How HF evaluates the config's activation: gelu_new / gelu_fast (and, for GPTMeg, the
    Megatron formula) as eager composites; gelu_pytorch_tanh and erf gelu as one kernel each."""
    if activation == "gelu_pytorch_tanh":
        return "torch_tanh"
    if activation == "gelu":
        return "erf"
    return "tanh"  # also the default for relu / silu, where the knob is ignored


def _hf(family: str, cfg=None) -> Knobs:
    """Each family's HF (transformers v5) eager numerics, read from its modeling file and kept
    as registry facts (`hf_attn_upcast`, `hf_scale_op`, `hf_mask_fill`):

    - gpt2 / gptmeg: scores = matmul(q, k^T) * scale (fp16 GEMM rounded, then multiplied by the
      precomputed hd^-0.5), additive 0 / finfo(dtype).min mask, softmax in the scores' dtype.
      With `reorder_and_upcast_attn`: q, k in fp32, baddbmm(alpha=scale), fp32 softmax.
      GPTMeg has no HF model in v5: `hf` means stock GPT-2 code running this config (its gelu
      evaluated eagerly); `meg` is the Megatron recipe.
    - openai-gpt: matmul, then a true division by sqrt(hd); causal mask by replacement with -1e4.
    - gpt_neo: q, k cast to fp32 (scores fp32), no scaling at all, where(mask, s, finfo(fp32).min),
      softmax in fp32, probabilities cast to v's dtype.
    - gptj: q, k cast to fp32, matmul * hd^-0.5 in fp32, fp32 softmax; rotary in q's dtype with
      the fp32 sin/cos table cast to the model dtype.
    - gpt_neox: matmul(q, k^T) * hd^-0.5 in the model dtype, additive finfo.min mask,
      softmax(dtype=float32) cast back to q's dtype (`hf_softmax_fp32`); rotate-half rotary in
      q's dtype with the fp32 cos/sin cast to the model dtype.
    """
    fam = _family(family)
    gelu = _hf_gelu(cfg.activation if cfg is not None else fam.activation)
    if cfg is not None and cfg.reorder_and_upcast_attn:  # a GPT-2 config option
        return Knobs(attn_scores="baddbmm", attn_upcast=True, softmax="fp32", gelu=gelu)
    return Knobs(attn_scores="matmul", attn_upcast=fam.hf_attn_upcast, scale_op=fam.hf_scale_op,
                 softmax="fp32" if fam.hf_attn_upcast or fam.hf_softmax_fp32 else "half",
                 mask_fill=fam.hf_mask_fill,
                 gelu=gelu)


def _meg_gelu(activation: str) -> str:
    """Megatron runs the tanh gelu as a jit-scripted fused kernel; an erf model keeps erf (so the
    preset computes the config's function)."""
    return "jit" if activation in TANH_GELUS else _hf_gelu(activation)


def resolve(preset: str, family: str, cfg=None) -> Knobs:
    """The knobs of a named preset for a family (`cfg`, a reference ModelConfig, refines the
    gelu from its activation and GPT-2's reorder_and_upcast_attn)."""
    if preset not in PRESETS:
        raise ParityError(f"unknown variant preset {preset!r} (choose from {', '.join(PRESETS)})")
    act = cfg.activation if cfg is not None else _family(family).activation
    hf = _hf(family, cfg)
    if preset == "hf":
        return hf
    if preset == "fp32":
        return dataclasses.replace(hf, force_dtype="float32")
    if preset == "sdpa":
        return dataclasses.replace(hf, attn_scores="sdpa")
    if preset == "naive-half":
        # no upcast anywhere: half scores (GPT-Neo's unscaled ones included), half softmax,
        # plain LayerNorm, eager gelu; scale applied the family's way
        return Knobs(attn_scores="matmul", attn_upcast=False, scale_op=hf.scale_op,
                     softmax="half", mask_fill="finfo_min",
                     gelu="tanh" if act in TANH_GELUS else _hf_gelu(act),
                     layernorm="native", rotary="native")
    if preset == "meg":
        # GPTMeg's apply_overrides (MODEL_NOTES section 5): baddbmm(beta=0, alpha=scale) written
        # in q's dtype, torch.where fill -1e4, softmax in the input dtype, fp32 LayerNorm,
        # jit-scripted gelu
        return Knobs(attn_scores="baddbmm", attn_upcast=False, softmax="half", mask_fill="-1e4",
                     gelu=_meg_gelu(act), layernorm="fp32", rotary="native")
    # meg-parallel: Megatron ParallelAttention with apply_query_key_layer_scaling (the default):
    # alpha = scale / layer_number, FusedScaleMaskSoftmax in fp32 multiplies by layer_number,
    # fills -10000, softmax fp32, casts back
    return Knobs(attn_scores="baddbmm", attn_upcast=False, qk_layer_scaling=True, softmax="fp32",
                 mask_fill="-1e4", gelu=_meg_gelu(act), layernorm="fp32", rotary="native")


# ----------------------------------------------------------------------------- parsing
_TRUE = {"on", "true", "1", "yes"}
_FALSE = {"off", "false", "0", "no"}


def parse_knobs(spec: str, base: Knobs | None = None) -> Knobs:
    """Apply 'knob=value,knob=value' overrides to `base` (default: Knobs())."""
    base = base if base is not None else Knobs()
    changes = {}
    for item in (p.strip() for p in spec.split(",")):
        if not item:
            continue
        if "=" not in item:
            raise ParityError(f"variant: {item!r} is not KNOB=VALUE")
        name, value = (s.strip() for s in item.split("=", 1))
        if name == "force_dtype":
            changes[name] = None if value.lower() in ("", "none") else value
            continue
        if name not in CHOICES:
            raise ParityError(f"variant: unknown knob {name!r} (knobs: {', '.join(CHOICES)})")
        allowed = CHOICES[name]
        if allowed == (False, True):
            low = value.lower()
            if low not in _TRUE | _FALSE:
                raise ParityError(f"variant: knob {name} takes on/off, got {value!r}")
            changes[name] = low in _TRUE
        else:
            if value not in allowed:
                raise ParityError(
                    f"variant: knob {name} takes {' | '.join(allowed)}, got {value!r}")
            changes[name] = value
    return dataclasses.replace(base, **changes)


def parse_variant(variant: str | None, family: str, cfg=None) -> Knobs:
    """'meg', 'hf+gelu=jit', 'attn_scores=sdpa' (knobs alone start from hf) -> Knobs."""
    variant = (variant or "hf").strip()
    preset, _, overrides = variant.partition("+")
    if "=" in preset:  # knobs only
        preset, overrides = "hf", variant
    return parse_knobs(overrides, resolve(preset.strip(), family, cfg))

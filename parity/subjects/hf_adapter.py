"""The transformers adapter (`--impl hf`, extra `hf`): a checkpoint run by Hugging Face
`transformers` itself, its activations captured with forward hooks under the site names of
DESIGN.md.

    trace = run(ckpt, inputs, dtype="float16", attn_implementation="eager")
    model, impl = load(ckpt, "float32"); trace = capture(model, ckpt.config, inputs)  # reuse

What it does, and why:
- Loads the whole model (`from_pretrained`, `local_files_only=True`) in the requested dtype,
  device and attention implementation (default "eager", the only one that exposes scores and
  probabilities). A weight the file lacks is an error, never a random init.
- GPTMeg (model_type "gptmeg") is not in transformers. It is loaded as GPT-2 (the registry's
  `hf_stand_in`) from the same
  config.json, with the parts of the GPTMeg branch (HF PR #14084, MODEL_NOTES section 5) that can
  be installed without touching transformers' code:
    (a) LayerNorm computed on fp32 copies of x, gain and bias and cast back, for fp16 inputs only
        (every LayerNorm of the model, ln_f included);
    (b) Megatron's gelu x*0.5*(1+tanh(0.79788456*x*(1+0.044715*x*x))) as the MLP activation when
        the config says "gelu_megatron". TorchScript is deprecated here and runs unfused on a CPU
        anyway, so it is evaluated eagerly: op by op, each op rounded (no CUDA fusion);
    (c) the `baddbmm` attention of Megatron-DeepSpeed's `apply_overrides` (scores =
        baddbmm(beta=0, alpha=1/sqrt(hd)) in q's dtype, softmax in that dtype), registered through
        transformers' public AttentionInterface, only with attn_implementation="baddbmm". The
        default "eager" is GPT-2's matmul-then-scale, which is what the stored GPTMeg
        modeling_gptmeg.py `_attn` does. Masked entries hold v5's finfo.min, not GPTMeg's -1e4:
        visible probabilities are the same (both underflow to exactly 0).
- Sites are read where transformers materialises them (table `TAPS`): module outputs and inputs,
  the new rows of the KV cache the model returns (attn.k / attn.v; for GPT-J that is k after
  rotary), and the input of the attention's softmax (attn.scores, eager only), caught by a
  TorchFunctionMode that is active only inside the attention module. The table is derived from the
  family registry's names and wiring (`taps`); `HF_SITES[family]` lists what is exposed; GPT-J's q after rotary never leaves its attention function, so GPT-J has no
  attn.q. With attn_implementation "sdpa" there are no scores and no probabilities.
- Values are the HF tensors converted to float64 NumPy exactly; `trace.dtypes` keeps the dtype
  that produced each (GPT-Neo's and GPT-J's scores are float32 in a half model: HF upcasts them).
  Masked score entries keep HF's fill value (finfo.min), not -inf; they never count.
- Inputs pass through unchanged: attention_mask (an all-ones mask when none is given, which also
  keeps v5 from reading explicit position ids as packed sequences), position_ids, and `past` in
  the reference layout (per layer (k, v), (B, H, T_past, hd)) as a DynamicCache.
  `trace.cache` comes back in the same layout. OpenAI GPT has no cache in transformers: its
  `trace.cache` is built from its c_attn output, and a `past` is refused.
- fp16 / bf16 on a CPU are torch's native CPU half kernels, which are not CUDA's (pow, GEMM
  accumulation): benchmarks/README.md "transformers adapter" measures the gap to the fast path's
  CPU emulation of CUDA.
"""
from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from reference.families import FAMILIES, family
from reference.sites import site_names
from reference.trace import Recorder, Trace

from parity.errors import ParityError
from parity.devices import normalize_dtype
from parity.subjects import compiled as C

INSTALL_HINT = "install the 'hf' extra: pip install gpt-parity[hf]"
NOTE = "loads the whole model"
GPTMEG_BADDBMM = "gpt_parity_gptmeg_baddbmm"  # the name registered with transformers

# How a site is read off a module: its output (first element of a tuple), its first input, its
# second output (attention weights), q / k / v thirds of a fused c_attn output split into heads,
# an output split into heads, the input of the softmax inside it, or the new rows of the cache.
OUT, IN, WEIGHTS, HEADS, SOFTMAX_IN = "out", "in", "weights", "heads", "softmax_in"
QKV = ("qkv0", "qkv1", "qkv2")
CACHE_K, CACHE_V = ("", "cache_k"), ("", "cache_v")



def taps(fam, block: str | None = None) -> dict[str, tuple[str, str]]:
    """Where each block site of a family is read: site kind -> (module path inside block i, how),
    module paths as transformers names them (the registry's `hf_names`). Derived from the
    registry's names and wiring (`reference.families`); `block` is the config's block kind."""
    t = _taps(fam, block or fam.block)
    return {k: (fam.hf_name(path) if path else path, how) for k, (path, how) in t.items()}


def _taps(fam, block: str) -> dict[str, tuple[str, str]]:
    attn = fam.attn_module
    t = {"ln_1": ("ln_1", OUT)}
    if fam.fused_qkv and fam.rotary:  # q after rotary never leaves the attention function
        pass
    elif fam.fused_qkv:  # q (and, without a cache, k and v) are thirds of the fused output
        t["attn.q"] = (fam.qkv[0], QKV[0])
    elif not fam.rotary:  # q after rotary never leaves the attention function
        t["attn.q"] = (fam.qkv[0], HEADS)
    if fam.hf_cache:  # k (after rotary) and v: the new rows of the returned cache
        t["attn.k"], t["attn.v"] = CACHE_K, CACHE_V
    else:
        t["attn.k"], t["attn.v"] = (fam.qkv[0], QKV[1]), (fam.qkv[0], QKV[2])
    t.update({
        "attn.scores": (attn, SOFTMAX_IN),
        "attn.probs": (attn, WEIGHTS),
        "attn.context": (fam.out_proj, IN),
        "attn.out": (fam.out_proj, OUT),
        "mlp.fc_in": (fam.fc_in, OUT),
        "mlp.act": (fam.fc_out, IN),
        "mlp.out": (fam.fc_out, OUT),
        "resid_post": ("", OUT),
    })
    if block == "pre":
        t.update({"resid_mid": ("ln_2", IN), "ln_2": ("ln_2", OUT)})
    elif block == "post":  # the LayerNorms follow the residual sums
        t.update({"resid_mid": ("ln_1", IN), "ln_1": ("ln_1", OUT),
                  "resid_post": ("ln_2", IN), "ln_2": ("", OUT)})
    elif "ln_2" in fam.ln:  # parallel with two LNs (NeoX): ln_2 feeds the MLP
        t["ln_2"] = ("ln_2", OUT)
    return t


TAPS: dict[str, dict[str, tuple[str, str]]] = {f: taps(family(f)) for f in FAMILIES}
# The block sites the adapter exposes per family with eager attention, in execution order.
HF_SITES = {f: tuple(k for k in family(f).block_sites if k in TAPS[f]) for f in FAMILIES}


def hf_sites(name: str, block: str | None = None) -> tuple[str, ...]:
    """HF_SITES under the config's block kind (a family whose config switches it: NeoX)."""
    fam = family(name)
    if block in (None, fam.block):
        return HF_SITES[name]
    t = taps(fam, block)
    return tuple(k for k in fam.sites_for(block) if k in t)


def blocks_of(model, fam):
    """The transformer body of an HF causal LM and its list of blocks (registry names)."""
    body = getattr(model, fam.hf_body)
    return body, getattr(body, fam.hf_name("h"))
EAGER_ONLY = ("attn.scores", "attn.probs")  # need the softmax and the weights of eager attention
EAGER_LIKE = ("eager", "baddbmm")


def exposed_sites(family: str, n_layer: int, attn_implementation: str = "eager",
                  block: str | None = None) -> list[str]:
    """The site names a trace from this adapter can hold, in order (embed, blocks, ln_f, logits)."""
    kinds = set(hf_sites(family, block))
    if attn_implementation not in EAGER_LIKE:
        kinds -= set(EAGER_ONLY)
    return [s for s in site_names(family, n_layer, block) if not s.startswith("blocks.")
            or s.split(".", 2)[2] in kinds]


# ------------------------------------------------------------------------------------- loading
def import_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ParityError(f"--impl hf needs transformers, which is not installed ({e}); "
                          f"{INSTALL_HINT}") from None
    return transformers


def _version_tuple(v: str) -> tuple[int, int]:
    parts = (v.split(".") + ["0", "0"])[:2]
    return tuple(int("".join(ch for ch in p if ch.isdigit()) or 0) for p in parts)


def load(ckpt, dtype: str = "float32", device: str = "cpu", attn_implementation: str | None = None):
    """The checkpoint as a transformers causal LM in eval mode, on `device`, in `dtype`.
    Returns (model, attn_implementation actually used)."""
    transformers = import_transformers()
    fam = family(ckpt.config.family)
    impl = attn_implementation or "eager"
    if impl not in fam.hf_attn_implementations:
        raise ParityError(
            f"--impl hf: attention implementation {impl!r} is not available for {fam.name} in "
            f"this adapter (choose from {', '.join(fam.hf_attn_implementations)})")
    tdtype = getattr(torch, normalize_dtype(dtype))
    kw = {"dtype" if _version_tuple(transformers.__version__) >= (4, 56) else "torch_dtype": tdtype}
    kw.update(local_files_only=True, output_loading_info=True,
              attn_implementation=GPTMEG_BADDBMM if impl == "baddbmm" else impl)
    try:
        with _quiet(transformers):
            if fam.hf_stand_in:  # not in transformers: run as the class it stands in for
                if impl == "baddbmm":
                    _register_gptmeg_attention(transformers)
                config_cls, model_cls = fam.hf_stand_in
                config = getattr(transformers, config_cls)(**_stand_in_fields(ckpt.config))
                model, info = getattr(transformers, model_cls).from_pretrained(
                    str(ckpt.path), config=config, **kw)
            else:
                auto = transformers.AutoModelForCausalLM
                model, info = auto.from_pretrained(str(ckpt.path), **kw)
    except ParityError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers' own message, on one line
        first = str(e).splitlines()[0] if str(e) else ""
        raise ParityError(f"{ckpt.path}: transformers {transformers.__version__} cannot load it "
                          f"({type(e).__name__}: {first})") from None
    missing = [k for k in info.get("missing_keys", ()) if not _tied(model, k)]
    bad = list(info.get("mismatched_keys", ()))
    if missing or bad:
        raise ParityError(f"{ckpt.path}: transformers would run with weights it did not load "
                          f"(missing {missing[:4]}, mismatched {bad[:4]})")
    if fam.megatron:
        install_gptmeg(model, ckpt.config)
    return model.to(device).eval(), impl


@contextlib.contextmanager
def _quiet(transformers):
    """No loading progress bar on the terminal of a `parity trace`."""
    log = transformers.utils.logging
    was = log.is_progress_bar_enabled()
    log.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            log.enable_progress_bar()


def _tied(model, key: str) -> bool:
    return key.startswith("lm_head.") and bool(getattr(model.config, "tie_word_embeddings", True))


def _stand_in_fields(cfg) -> dict:
    """A config.json as fields of the stand-in config class (GPTMeg's: GPT2Config, which the
    GPTMeg branch copied); Megatron's gelu is installed afterwards (transformers has no
    'gelu_megatron')."""
    d = {k: v for k, v in cfg.raw.items() if k not in ("model_type", "architectures", "auto_map")}
    d["activation_function"] = "gelu_new" if cfg.activation == "gelu_megatron" else cfg.activation
    d["architectures"] = [family(cfg.family).hf_stand_in[1]]
    return d


def install_gptmeg(model, cfg) -> None:
    """GPTMeg's module overrides (a) and (b) on a GPT-2 model (module docstring)."""
    for block in model.transformer.h:
        if cfg.activation == "gelu_megatron":
            block.mlp.act = MegatronGelu()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.LayerNorm:
                setattr(parent, name, Fp32LayerNorm.wrap(child))


def gptmeg_overrides(model, attn_implementation: str) -> str:
    """What of GPTMeg a loaded model reproduces, for trace.meta (module docstring)."""
    parts = []
    if all(isinstance(b.mlp.act, MegatronGelu) for b in model.transformer.h):
        parts.append("Megatron gelu (eager ops)")
    parts.append("fp32 LayerNorm for fp16")
    parts.append("baddbmm attention" if attn_implementation == "baddbmm"
                 else f"GPT-2 {attn_implementation} attention")
    return ", ".join(parts)


class MegatronGelu(nn.Module):
    """Megatron's gelu, constant 0.79788456 (MODEL_NOTES section 5b), evaluated op by op."""

    def forward(self, x):
        return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1.0 + 0.044715 * x * x)))


class Fp32LayerNorm(nn.LayerNorm):
    """GPTMeg's upcast LayerNorm: an fp16 input is normalised as fp32 copies of x, gain and bias,
    and the result rounded to fp16 once; any other dtype is a plain LayerNorm."""

    @classmethod
    def wrap(cls, ln: nn.LayerNorm) -> "Fp32LayerNorm":
        new = cls.__new__(cls)
        new.__dict__.update(ln.__dict__)  # the same parameters, shape and eps
        return new

    def forward(self, x):
        if x.dtype != torch.float16:
            return super().forward(x)
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def _register_gptmeg_attention(transformers) -> None:
    """GPTMeg's baddbmm attention under our own name, with the eager mask (public HF API)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    transformers.AttentionInterface.register(GPTMEG_BADDBMM, _gptmeg_attention)
    AttentionMaskInterface.register(GPTMEG_BADDBMM, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def _gptmeg_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      **kwargs):
    """MODEL_NOTES section 5c: scores = baddbmm(empty in q's dtype, Q, K^T, beta=0,
    alpha=1/sqrt(hd)), then /(layer_idx+1) if configured, mask, softmax in the scores' dtype."""
    b, h, tq, hd = query.shape
    tk = key.shape[2]
    buf = torch.empty(b * h, tq, tk, dtype=query.dtype, device=query.device)
    q, kt = query.reshape(b * h, tq, hd), key.transpose(-1, -2).reshape(b * h, hd, tk)
    s = torch.baddbmm(buf, q, kt, beta=0, alpha=1.0 / math.sqrt(hd)).view(b, h, tq, tk)
    if getattr(module, "scale_attn_by_inverse_layer_idx", False):
        s = s / float(module.layer_idx + 1)
    if attention_mask is not None:
        s = s + attention_mask
    p = F.softmax(s, dim=-1).to(value.dtype)
    return torch.matmul(p, value).transpose(1, 2), p


# ------------------------------------------------------------------------------------- capture
def run(ckpt, inputs, dtype: str = "float32", device: str = "cpu", sites=None,
        attn_implementation: str | None = None, past=None, compile: str | None = "off") -> Trace:
    """Load the checkpoint with transformers and return the trace of one forward pass."""
    if C.is_compiled(compile):
        return CompiledHF(ckpt, dtype, device, attn_implementation, compile).capture(
            inputs, sites=sites, past=past)
    model, impl = load(ckpt, dtype=dtype, device=device, attn_implementation=attn_implementation)
    return capture(model, ckpt.config, inputs, sites=sites, past=past, attn_implementation=impl)


def capture(model, cfg, inputs, sites=None, past=None, attn_implementation: str = "eager") -> Trace:
    """One forward pass of a loaded model (from `load`), with the requested sites captured."""
    transformers = import_transformers()

    fam = family(cfg.family)
    ids = np.asarray(inputs.input_ids, dtype=np.int64)
    b, t = ids.shape
    if past is not None and not fam.hf_cache:
        raise ParityError(f"--impl hf: {fam.hf_class} has no key/value cache in transformers")
    past_len = past[0][0].shape[2] if past else 0
    mask = inputs.attention_mask
    mask = np.ones((b, past_len + t), np.int64) if mask is None else np.asarray(mask, np.int64)
    if mask.shape != (b, past_len + t):
        raise ParityError(f"attention_mask has shape {list(mask.shape)}, expected "
                          f"{[b, past_len + t]} (past plus new tokens)")
    pos = inputs.position_ids
    pos = (np.broadcast_to(np.arange(past_len, past_len + t), (b, t)) if pos is None
           else np.asarray(pos, np.int64)).copy()

    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    device = next(model.parameters()).device
    trace = Trace(family=fam.name, input_ids=ids, attention_mask=mask, position_ids=pos,
                  meta={"producer": f"transformers {transformers.__version__} "
                                    f"{type(model).__name__} ({attn_implementation})",
                        "impl": "hf", "transformers": transformers.__version__,
                        "attn_implementation": attn_implementation, "dtype": dtype,
                        "device": str(device), "note": NOTE})
    if fam.megatron:
        trace.meta["gptmeg"] = gptmeg_overrides(model, attn_implementation)
    rec = Recorder(trace, sites, dtype)
    tap = _Taps(model, cfg, rec, eager=attn_implementation in EAGER_LIKE)
    kw = dict(attention_mask=torch.as_tensor(mask, device=device),
              position_ids=torch.as_tensor(pos, device=device))
    if not fam.hf_cache:
        kw["output_attentions"] = tap.wants_kind("attn.probs")
    else:
        kw["use_cache"] = True
        kw[_cache_kwarg(model)] = _to_cache(past, model, device) if past else _empty_cache()
    try:
        with torch.no_grad():
            out = model(torch.as_tensor(ids, device=device), **kw)
    except RuntimeError as e:  # e.g. GPT-2's reorder_and_upcast_attn refuses float64
        raise ParityError(f"--impl hf: transformers {transformers.__version__} failed to run "
                          f"this {fam.name} model in {dtype}: {str(e).splitlines()[0]}") from None
    finally:
        tap.remove()
    if not fam.hf_cache:
        cache = tap.present
    else:
        cache = _cache_layers(getattr(out, "cache", None) or getattr(out, "past_key_values", None))
        for i, (k, v) in enumerate(cache):
            tap.record(f"blocks.{i}.attn.k", k[:, :, -t:])
            tap.record(f"blocks.{i}.attn.v", v[:, :, -t:])
    trace.cache = [(_np(k), _np(v)) for k, v in cache]
    tap.record("logits", out.logits, force=True)
    order = {s: n for n, s in enumerate(site_names(fam.name, cfg.n_layer, cfg.block))}
    trace.sites = dict(sorted(trace.sites.items(), key=lambda kv: order[kv[0]]))
    return trace


class CompiledHF:
    """A transformers model under `torch.compile(fullgraph=True)`, the whole model as one graph
    (what `torch.compile(model)` users run). The capture hooks are registered *before* compiling
    and keep tensors (graph outputs), so the whole forward, hooks included, is one graph or an
    error. Any capture changes the compiled logits here, block outputs included (a graph output
    changes what Inductor fuses across the block boundary; benchmarks/README.md), so with
    `capture="outputs"` (the default) two copies of the model are compiled: an uncaptured one,
    what `torch.compile(model)` users run, gives the logits and the new cache rows (attn.k /
    attn.v), and a captured one gives embed, every block output and ln_f; the metadata records
    how far the captured copy's logits are from the judged ones. Sites inside a block are not
    exposed. `capture="all"` (benchmarks) hooks every site in one model (attn.scores never:
    eager capture reads it with a TorchFunctionMode, not in a graph); "none" only the logits.
    Built once, called many times (the gate's determinism rerun calls the same compiled
    callables)."""

    def __init__(self, ckpt, dtype: str, device: str, attn_implementation: str | None, spec,
                 capture: str = "outputs"):
        self.cfg, self.fam, self.spec = ckpt.config, family(ckpt.config.family), C.parse(spec)
        self.model, self.impl = load(ckpt, dtype=dtype, device=device,
                                     attn_implementation=attn_implementation)
        self.stash: dict = {}
        # "none" (benchmarks: what an uncaptured compiled model computes): logits only
        everything = Recorder(Trace(family=self.fam.name),
                              ["logits"] if capture == "none" else None)
        self.taps = _Taps(self.model, self.cfg, everything,
                          eager=self.impl in EAGER_LIKE, stash=self.stash,
                          only=(self.fam.block_output,) if capture == "outputs" else None)
        self.fn = C.compile_fn(self._forward, self.spec)
        self.plain = self.fn_plain = None
        if capture == "outputs":  # the judged logits come from an uncaptured copy
            self.plain, _ = load(ckpt, dtype=dtype, device=device,
                                 attn_implementation=attn_implementation)
            self.plain_taps = _Taps(self.plain, self.cfg,
                                    Recorder(Trace(family=self.fam.name), ["logits"]),
                                    eager=self.impl in EAGER_LIKE, stash={})
            self.fn_plain = C.compile_fn(self._forward_plain, self.spec)

    # two entry points, two code objects: dynamo keeps its compiled graphs per code object
    def _forward(self, ids, mask, pos):
        return self._call_model(self.model, ids, mask, pos)

    def _forward_plain(self, ids, mask, pos):
        return self._call_model(self.plain, ids, mask, pos)

    def _call_model(self, model, ids, mask, pos):
        kw = dict(attention_mask=mask, position_ids=pos)
        if self.fam.hf_cache:
            kw["use_cache"] = True
        else:
            kw["output_attentions"] = self.impl in EAGER_LIKE
        out = model(ids, **kw)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        return out.logits, _cache_layers(cache)

    def _compiled_call(self, fn, args, transformers):
        with torch.no_grad():
            return C.call(fn, args, f"--impl hf: transformers {transformers.__version__}'s "
                                    f"{type(self.model).__name__} ({self.impl} attention)")

    def capture(self, inputs, sites=None, past=None) -> Trace:
        transformers = import_transformers()
        if past:
            raise ParityError("--impl hf --compile: a past cache is not supported (the compiled "
                              "graph is traced for one forward pass without a cache)")
        ids = np.asarray(inputs.input_ids, dtype=np.int64)
        b, t = ids.shape
        mask = inputs.attention_mask
        mask = np.ones((b, t), np.int64) if mask is None else np.asarray(mask, np.int64)
        if mask.shape != (b, t):
            raise ParityError(f"attention_mask has shape {list(mask.shape)}, expected {[b, t]}")
        pos = inputs.position_ids
        pos = (np.broadcast_to(np.arange(t), (b, t)) if pos is None
               else np.asarray(pos, np.int64)).copy()
        dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        device = next(self.model.parameters()).device
        trace = Trace(family=self.fam.name, input_ids=ids, attention_mask=mask, position_ids=pos,
                      meta={"producer": f"transformers {transformers.__version__} "
                                        f"{type(self.model).__name__} ({self.impl}, compiled "
                                        f"{self.spec})",
                            "impl": "hf", "transformers": transformers.__version__,
                            "attn_implementation": self.impl, "dtype": dtype,
                            "device": str(device), "note": NOTE,
                            **C.meta(self.spec, device)})
        if self.fam.megatron:
            trace.meta["gptmeg"] = gptmeg_overrides(self.model, self.impl)
        self.stash.clear()
        self.taps.present.clear()
        args = [torch.as_tensor(a, device=device) for a in (ids, mask, pos)]
        rec = Recorder(trace, sites, dtype)
        out = self.fam.block_output
        wanted = any(rec.wants(s) for s in ["embed", "ln_f"] + [
            f"blocks.{i}.{out}" for i in range(self.cfg.n_layer)])
        if self.plain is not None and not wanted:
            # only the logits (and cache) are asked for (a decoding step): the uncaptured copy
            # alone, whose logits are the judged ones anyway
            self.plain_taps.present.clear()
            logits, cache = self._compiled_call(self.fn_plain, args, transformers)
            return self._finish(trace, rec, {}, logits, cache, self.plain_taps.present, t)
        logits, cache = self._compiled_call(self.fn, args, transformers)
        present = self.taps.present
        if self.plain is not None:
            captured = _np(logits)
            self.plain_taps.present.clear()
            logits, cache = self._compiled_call(self.fn_plain, args, transformers)
            present = self.plain_taps.present
            judged = _np(logits)
            moved = np.linalg.norm(captured - judged) / max(np.linalg.norm(judged), 1e-300)
            trace.meta.update(
                compile_capture="logits and cache from the uncaptured compiled model; embed, "
                                "block outputs, ln_f from a second compiled copy with capture "
                                "hooks",
                compile_capture_logit_rel_l2=f"{moved:.3g}")
        return self._finish(trace, rec, dict(self.stash), logits, cache, present, t)

    def _finish(self, trace, rec, got, logits, cache, present, t) -> Trace:
        """The trace from one call's captured tensors (`got`), logits and cache."""
        if not self.fam.hf_cache:
            cache = list(present)
        for i, (k, v) in enumerate(cache):
            got[f"blocks.{i}.attn.k"], got[f"blocks.{i}.attn.v"] = k[:, :, -t:], v[:, :, -t:]
        trace.cache = [(_np(k), _np(v)) for k, v in cache]
        for site, x in got.items():
            if rec.wants(site):
                trace.sites[site] = _np(x)
                trace.dtypes[site] = str(x.dtype).removeprefix("torch.")
        trace.sites["logits"] = _np(logits)
        trace.dtypes["logits"] = str(logits.dtype).removeprefix("torch.")
        order = {s: n for n, s in enumerate(site_names(self.fam.name, self.cfg.n_layer,
                                                       self.cfg.block))}
        trace.sites = dict(sorted(trace.sites.items(), key=lambda kv: order[kv[0]]))
        return trace


def _np(x) -> np.ndarray:
    return x.detach().to(device="cpu", dtype=torch.float64, copy=True).numpy()


def _cache_kwarg(model) -> str:
    """transformers 5.x calls the argument `cache` (`past_key_values` before)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _empty_cache():
    from transformers import DynamicCache

    return DynamicCache()


def _to_cache(past, model, device):
    """Reference layout (per layer (k, v), (B, H, T_past, hd) float64) -> a DynamicCache in the
    model's dtype. Full layers for GPT-Neo's local attention too: it slices its window itself."""
    from transformers import DynamicCache

    dtype = next(model.parameters()).dtype
    cache = DynamicCache()
    for i, (k, v) in enumerate(past):
        cache.update(torch.as_tensor(np.asarray(k)).to(device, dtype),
                     torch.as_tensor(np.asarray(v)).to(device, dtype), i)
    return cache


def _cache_layers(cache) -> list:
    """(k, v) per layer from a transformers cache (v5 `layers`, 4.x `key_cache`, or tuples)."""
    if cache is None:
        return []
    if hasattr(cache, "layers"):
        return [(lay.keys, lay.values) for lay in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(k, v) for k, v, *_ in cache]


class _Taps:
    """The forward hooks of one capture; `remove()` takes every one of them off again."""

    def __init__(self, model, cfg, rec: Recorder, eager: bool = True, stash: dict | None = None,
                 only: tuple | None = None):
        self.cfg, self.rec, self.family = cfg, rec, cfg.family
        self.fam = family(cfg.family)
        self.skip = () if eager else EAGER_ONLY  # sdpa: no softmax, no weights
        # compiled capture: tensors kept as they are (graph outputs); no softmax spy in a graph
        self.stash = stash
        if stash is not None:
            self.skip = tuple(set(self.skip) | {"attn.scores"})
        self.handles: list = []
        self.present: list = []  # OpenAI GPT: (k, v) per layer from c_attn
        body, layers = blocks_of(model, self.fam)
        self.taps = taps(self.fam, cfg.block)
        self.sites = hf_sites(cfg.family, cfg.block)
        if only is not None:  # compiled capture: block sites limited to these kinds
            self.sites = tuple(k for k in self.sites if k in only)
        if rec.wants("embed"):
            self._hook(layers[0], IN, lambda x: self.record("embed", x))
        for i, block in enumerate(layers):
            self._block(i, block)
        if self.fam.ln_f and rec.wants("ln_f"):
            self._hook(getattr(body, self.fam.hf_name("ln_f")), OUT,
                       lambda x: self.record("ln_f", x))

    def wants_kind(self, kind: str) -> bool:
        return any(self.rec.wants(f"blocks.{i}.{kind}") for i in range(self.cfg.n_layer))

    def record(self, site: str, x, force: bool = False) -> None:
        if self.stash is not None:  # inside a compiled graph: keep the tensor
            self.stash[site] = x
            return
        if force or self.rec.wants(site):
            self.rec.trace.sites[site] = _np(x)
            self.rec.trace.dtypes[site] = str(x.dtype).removeprefix("torch.")

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    # -- installing
    def _block(self, i: int, block) -> None:
        taps, n_head = self.taps, self.cfg.n_head
        groups: dict[tuple[str, str], list[str]] = {}
        for kind in self.sites:
            path, how = taps[kind]
            site = f"blocks.{i}.{kind}"
            if how.startswith("cache_") or kind in self.skip or not self.rec.wants(site):
                continue
            groups.setdefault((path, how), []).append(site)
        if not self.fam.hf_cache:  # no cache in transformers: k and v are read off c_attn
            groups.setdefault((self.fam.qkv[0], "present"), [])
        for (path, how), names in groups.items():
            mod = block.get_submodule(path) if path else block
            if how in (OUT, IN, WEIGHTS):
                site = names[0]
                self._hook(mod, how, lambda x, s=site: self.record(s, x))
            elif how == HEADS:
                self._hook(mod, OUT, lambda x, s=names[0]: self.record(s, _heads(x, n_head)))
            elif how in QKV:
                j = QKV.index(how)
                self._hook(mod, OUT, lambda x, s=names[0], j=j: self.record(
                    s, _heads(_third(x, j), n_head)))
            elif how == "present":
                self._hook(mod, OUT, lambda x: self.present.append(
                    (_heads(_third(x, 1), n_head), _heads(_third(x, 2), n_head))))
            elif how == SOFTMAX_IN:
                self._softmax_spy(mod, names[0])

    def _hook(self, mod, how: str, fn: Callable) -> None:
        if how == IN:
            def pre(_m, args, kwargs):
                fn(args[0] if args else kwargs["hidden_states"])
            self.handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
            return
        index = 1 if how == WEIGHTS else 0

        def post(_m, _args, out):
            x = out[index] if isinstance(out, (tuple, list)) else out
            if x is not None:
                fn(x)
        self.handles.append(mod.register_forward_hook(post))

    def _softmax_spy(self, mod, site: str) -> None:
        """Record the input of the first softmax inside `mod`'s forward (eager attention)."""
        spy = SoftmaxSpy(lambda x: self.record(site, x))

        def enter(*_):
            spy.__enter__()

        def leave(*_):
            spy.__exit__(None, None, None)

        self.handles.append(mod.register_forward_pre_hook(enter))
        self.handles.append(mod.register_forward_hook(leave))
        self.handles.append(spy)  # its remove() leaves it if a forward raised inside `mod`


class SoftmaxSpy(TorchFunctionMode):
    """Active only inside one attention module: hands the input of its first softmax (the
    masked, scaled scores) to `sink`, and changes nothing."""

    FUNCS = (F.softmax, torch.softmax, torch.Tensor.softmax)

    def __init__(self, sink):
        super().__init__()
        self.sink, self.active, self.seen = sink, False, False

    def __enter__(self):
        self.active, self.seen = True, False
        return super().__enter__()

    def __exit__(self, *exc):
        self.active = False
        super().__exit__(*exc)

    def remove(self) -> None:
        if self.active:
            self.__exit__(None, None, None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if not self.seen and func in self.FUNCS:
            self.seen = True
            self.sink(args[0])
        return func(*args, **(kwargs or {}))


def _third(x, j: int):
    d = x.shape[-1] // 3
    return x[..., j * d:(j + 1) * d]


def _heads(x, n_head: int):
    """(B, T, d) -> (B, H, T, hd), head-major as in every family."""
    b, t, d = x.shape
    return x.reshape(b, t, n_head, d // n_head).permute(0, 2, 1, 3)

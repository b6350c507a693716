"""Compiled subjects (`--compile inductor`): the same subject run through `torch.compile`.

Inductor fuses elementwise chains and, inside a fused kernel, elides the downcast/upcast pair
between two half-precision ops (the intermediate stays fp32). A compiled half model therefore
rounds differently from eager, usually less often. `torch._inductor.config.emulate_precision_casts`
puts those roundings back where Inductor implements it (the Triton code generator); the variant
`inductor+emulate_precision_casts` runs it so that benign rounding elision can be told from a
real divergence (README "Compiled subjects" says what it does on a CPU).

A compiled subject runs in its real dtype on its device: Inductor's C++ kernels on a CPU (native
fp16/bf16, never the fast path's CUDA emulation), Triton on CUDA. Its trace metadata records the
backend, the torch version and every Inductor setting that changes numerics (`settings`).

Spec grammar (`--compile`, `Subject.compile`):
    off                              eager (default)
    inductor                         torch.compile(backend="inductor", fullgraph=True)
    inductor+emulate_precision_casts the same with the downcast/upcast pairs kept
"""
from __future__ import annotations

from parity.errors import ParityError

MODES = ("off", "inductor")
# what a compiled subject reports: tensors it materialises anyway (README "Compiled subjects")
EXPOSES = ("embed, block outputs, attn.k, attn.v, ln_f, logits; other sites are not exposed "
           "(a graph output changes what Inductor fuses)")
EPC = "emulate_precision_casts"
SPECS = ("off", "inductor", f"inductor+{EPC}")
# Inductor settings that change the numbers a compiled model computes (read at compile time)
NUMERICS_SETTINGS = (
    EPC,                                   # keep half roundings between fused ops
    "use_fast_math",                       # approximate transcendental functions
    "cpp.enable_unsafe_math_opt_flag",     # -ffast-math style reassociation (C++ backend)
    "cpp.enable_floating_point_contract_flag",  # FMA contraction in the C++ kernels
    "cpp.simdlen",                         # vector width: the order of vectorised reductions
    "triton.codegen_upcast_to_fp32",       # Triton computes half elementwise ops in fp32
    "max_autotune",                        # GEMM kernel choice by benchmark (CUDA)
    "freezing",                            # constant folding of weights
    "fallback_random",
)


def parse(spec) -> str:
    """None/'off' -> 'off'; 'inductor'; 'inductor+emulate_precision_casts'. Anything else is an
    error naming the option."""
    s = "off" if spec in (None, "", False) else str(spec).strip()
    if s not in SPECS:
        raise ParityError(f"--compile: unknown value {spec!r} (choose from {', '.join(SPECS)})")
    return s


def is_compiled(spec) -> bool:
    return parse(spec) != "off"


def check_emulate(spec, emulate) -> None:
    """A compiled subject runs natively: Inductor generates its own kernels, so the fast path's
    emulation of CUDA rounding cannot apply. `--emulate on` with `--compile` is refused."""
    if is_compiled(spec) and emulate:
        raise ParityError("--compile inductor runs the real half dtype (Inductor generates its "
                          "own kernels): --emulate on cannot apply; drop --emulate or use "
                          "--emulate off")


def options(spec) -> dict:
    """The Inductor options of one spec (passed to torch.compile, so nothing global changes)."""
    return {EPC: True} if parse(spec).endswith(EPC) else {}


def settings(spec) -> dict[str, str]:
    """The numerics-relevant Inductor settings a compile under `spec` uses, as strings."""
    import torch._inductor.config as cfg

    over = options(spec)
    out = {}
    for name in NUMERICS_SETTINGS:
        obj, attr = cfg, name
        if "." in name:
            head, attr = name.split(".", 1)
            obj = getattr(cfg, head, None)
        if obj is None or not hasattr(obj, attr):
            continue
        out[name] = str(over.get(name, getattr(obj, attr)))
    return out


def meta(spec, device) -> dict[str, str]:
    """Trace metadata of a compiled subject (empty for eager, which keeps its metadata as is)."""
    spec = parse(spec)
    if spec == "off":
        return {}
    import torch

    dev = str(device)
    out = {"compile": spec, "compile_backend": "inductor",
           "compile_codegen": "triton" if dev.startswith("cuda") else "cpp",
           "compile_torch": torch.__version__, "compile_fullgraph": "true",
           "compile_exposes": EXPOSES}
    if not dev.startswith("cuda"):
        try:
            from torch._inductor.cpu_vec_isa import pick_vec_isa

            out["compile_cpu_isa"] = str(pick_vec_isa()) or "none"
        except Exception:  # noqa: BLE001 - informative only
            pass
    out.update({f"inductor.{k}": v for k, v in settings(spec).items()})
    return out


_LIMITS_SET = False


def compile_fn(fn, spec):
    """torch.compile(fn) for `spec`, whole graph or an error (fullgraph=True: a graph break is
    never silently run eagerly), static shapes. Dynamo's recompile limit is raised and made an
    error when hit: past it dynamo would otherwise run the function *eagerly*, and an eager run
    reported as a compiled one is a false claim. Hooks are guarded (see below)."""
    import torch

    global _LIMITS_SET
    if not _LIMITS_SET:
        dc = torch._dynamo.config
        dc.recompile_limit = max(getattr(dc, "recompile_limit", 8), 4096)
        dc.accumulated_recompile_limit = max(getattr(dc, "accumulated_recompile_limit", 256),
                                             1 << 16)
        dc.fail_on_recompile_limit_hit = True
        # dynamo skips guards on nn.Module hooks by default: a second model whose capture hooks
        # differ would then run the first model's graph and capture the wrong sites
        dc.skip_nnmodule_hook_guards = False
        _LIMITS_SET = True
    return torch.compile(fn, backend="inductor", fullgraph=True, dynamic=False,
                         options=options(spec) or None)


def call(fn, args, what: str):
    """Call a compiled callable; a dynamo or Inductor failure (a graph break under fullgraph, a
    C++ compile error) becomes one ParityError line naming `what`, never a partly eager run."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - only dynamo's own exceptions are translated
        from torch._dynamo.exc import TorchDynamoException

        if not isinstance(e, TorchDynamoException):
            raise
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
        raise ParityError(f"--compile: {what} cannot be compiled as one graph by Inductor "
                          f"(fullgraph; a graph break would run part of it eagerly): "
                          f"{type(e).__name__}: {first[:300]}") from None


def variant_label(variant: str, spec) -> str:
    """The variant column of a compiled subject: 'hf+compile=inductor' (eager: the variant)."""
    spec = parse(spec)
    return variant if spec == "off" else f"{variant}+compile={spec}"


def split_label(label: str) -> tuple[str, str]:
    """'hf+compile=inductor' -> ('hf', 'inductor'); 'meg' -> ('meg', 'off')."""
    head, sep, spec = label.rpartition("+compile=")
    return (head, parse(spec)) if sep else (label, "off")

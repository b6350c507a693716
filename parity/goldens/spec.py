"""What a golden is: its identity (`Spec`), the plan of every golden per family, dtype and device
class, the sites each keeps, and which device classes this machine can make or check (CPU
fingerprint, CUDA compute capability)."""
from __future__ import annotations

import contextlib
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np


from parity.errors import ParityError


GENERATOR = "gpt-parity goldens"
GENERATOR_VERSION = 1
MANIFEST = "MANIFEST.json"
MANIFEST_FORMAT = "parity-golden-manifest/1"
DEFAULT_DIR = Path(__file__).resolve().parents[2] / "golden"
SIZE_BUDGET_BYTES = 5_000_000  # golden/ at most 5 MB in all: light to clone

FAST_PRESETS = ("hf", "meg")
HALF_DTYPES = ("float16", "bfloat16")
CPU_CLASSES = ("cpu-emulated", "cpu-native")
RECIPE = {"preset": "tiny", "seed": 0}
STEP1 = {"length": 8, "seed": 0, "pad": 3}  # parity.checkpoints.inputs.default_batch arguments
STEP2 = {"tokens": 3, "seed": 1}
STEP2_PREFIX = "step2/"
DETAIL_LAYER = 1  # the layer whose attention scores are kept (GPT-Neo: a local layer)
HALF_CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16",
                  "amx_fp16")


# ----------------------------------------------------------------------------- what a golden is
@dataclass(frozen=True, kw_only=True)
class Spec:
    """The identity of one golden file."""

    family: str
    impl: str  # reference | fast
    dtype: str
    variant: str | None = None  # fast-path preset
    device_class: str = "any"

    @property
    def path(self) -> str:
        if self.impl == "reference":
            return f"{self.family}/reference-{self.dtype}.safetensors"
        return f"{self.family}/fast-{self.variant}-{self.dtype}-{self.device_class}.safetensors"

    def fields(self) -> dict:
        return {"family": self.family, "impl": self.impl, "variant": self.variant,
                "dtype": self.dtype, "device_class": self.device_class}

    @classmethod
    def from_entry(cls, path: str, e: dict) -> "Spec":
        try:
            s = cls(family=e["family"], impl=e["impl"], dtype=e["dtype"],
                    variant=e.get("variant"), device_class=e["device_class"])
        except (KeyError, TypeError):
            raise ParityError(f"{MANIFEST}: entry {path!r} lacks family/impl/dtype/device_class")
        if s.path != path:
            raise ParityError(f"{MANIFEST}: entry {path!r} describes {s.path!r} "
                              "(tampered manifest)")
        return s


def plan(families=None, classes=None) -> list[Spec]:
    """Every golden of the given families and device classes (default: all families and every
    class this machine can produce)."""
    import reference

    families = list(families or reference.FAMILIES)
    unknown = [f for f in families if f not in reference.FAMILIES]
    if unknown:
        raise ParityError(f"unknown family {unknown[0]!r} (choose from "
                          f"{', '.join(reference.FAMILIES)})")
    classes = list(classes or local_classes())
    specs = []
    for fam in families:
        if "any" in classes:
            specs.append(Spec(family=fam, impl="reference", dtype="float64"))
        for cls in classes:
            if cls != "any":
                specs += [Spec(family=fam, impl="fast", dtype=dt, variant=p, device_class=cls)
                          for p in FAST_PRESETS for dt in HALF_DTYPES]
    return specs


def golden_sites(family: str, n_layer: int) -> list[str]:
    """The sites kept: the embedding, every block's output, the attention scores of one layer,
    the final LayerNorm and the logits: enough to say in which block a change enters, within the
    size budget (a layer's mlp.fc_in/act alone would cost as much as four block outputs)."""
    from reference.families import family as family_facts

    fam = family_facts(family)
    out = fam.block_output
    d = min(DETAIL_LAYER, n_layer - 1)
    names = ["embed"]
    for i in range(n_layer):
        if i == d:
            names.append(f"blocks.{i}.attn.scores")
        names.append(f"blocks.{i}.{out}")
    return names + (["ln_f"] if fam.ln_f else []) + ["logits"]


# ----------------------------------------------------------------------------- device classes
def cuda_class() -> str | None:
    """`cuda-sm90` on an H100, None without a CUDA device."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"cuda-sm{major}{minor}"


def local_classes() -> list[str]:
    cls = ["any", *CPU_CLASSES]
    c = cuda_class()
    return cls + ([c] if c else [])


def cpu_fingerprint() -> str:
    """What decides the bits of torch's CPU kernels: the architecture, the kernel level torch
    dispatches (DEFAULT / AVX2 / AVX512 ...) and the half-precision instructions present."""
    import torch

    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    have = [f for f in HALF_CPU_FLAGS if f in flags]
    return " ".join([platform.machine(), torch.backends.cpu.get_cpu_capability(), *have])


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_args(device_class: str) -> tuple[str, bool | None]:
    """(device, emulate) of the fast path for a device class."""
    if device_class == "cpu-emulated":
        return "cpu", True
    if device_class == "cpu-native":
        return "cpu", False
    if device_class.startswith("cuda-sm"):
        return "cuda", False
    raise ParityError(f"unknown device class {device_class!r}")


def unavailable(spec: Spec, golden_cpu: str | None) -> str | None:
    """Why this machine cannot check a golden (None when it can)."""
    c = spec.device_class
    if c in ("any", "cpu-emulated"):
        return None
    if c == "cpu-native":
        here = cpu_fingerprint()
        if golden_cpu and golden_cpu != here:
            return (f"needs a CPU like the one that made it ({golden_cpu}): torch's native half "
                    f"kernels differ by instruction set; this CPU is {here}")
        return None
    if c.startswith("cuda-sm"):
        here = cuda_class()
        if here != c:
            cc = c.removeprefix("cuda-sm")
            need = f"a CUDA GPU of compute capability {cc[:-1]}.{cc[-1]} ({c})"
            return f"needs {need}; this machine has {here or 'no CUDA device'}"
        return None
    return f"unknown device class {c!r}"


def torch_version() -> str:
    import torch

    return torch.__version__


def numpy_version() -> str:
    return np.__version__


DRIFT_LIB = {"reference": "numpy", "fast": "torch"}  # what computes each implementation
LIB_VERSION = {"numpy": lambda: numpy_version(), "torch": lambda: torch_version()}

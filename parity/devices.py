"""Where and in what subjects run: the one device resolver (`--device auto|cpu|cuda[:N]`) and
the one dtype normalizer (`--dtype fp16|float16|half|...`, from reference/dtypes.py)."""
from __future__ import annotations

from reference import dtypes

from parity.errors import ParityError


def normalize_dtype(dtype: str) -> str:
    """Any spelling of a supported dtype -> its canonical name; anything else is bad input."""
    d = dtypes.canonical(dtype)
    if d not in dtypes.DTYPES:
        raise ParityError(f"unknown dtype {dtype!r} (choose from {', '.join(dtypes.DTYPES)})")
    return d


def resolve_device(device) -> str:
    """'auto' -> 'cuda' when a CUDA device is available, else 'cpu'; 'cpu', 'cuda', 'cuda:N' as
    given (a torch.device too). Unknown names and CUDA without a device are bad input."""
    import torch

    name = str(device)
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ParityError(f"--device {name}: no CUDA device is available")
        return name
    raise ParityError(f"unknown --device {name!r} (auto, cpu or cuda)")


def emulated(meta: dict) -> bool:
    """Whether a subject's trace metadata says it ran the CPU emulation of CUDA half precision
    (`meta["emulate"]` is recorded as text: "True"/"on")."""
    return str(meta.get("emulate", "")).lower() in ("true", "on")

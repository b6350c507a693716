"""Reading and writing `parity-golden/1` files (DESIGN.md "Golden activation file").

A safetensors file: tensors `input_ids` (int64 [B, T], required), `logits` (float [B, T, V],
required), optional `attention_mask`, `position_ids`, and any site names; string metadata
`format` = "parity-golden/1" (required), `family`, `producer`, `dtype`, optional `device`,
`config_sha256`, `created`. Anyone can write one with nothing but safetensors.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from parity.errors import ParityError
from parity.files import replacing

FORMAT = "parity-golden/1"
INPUT_KEYS = ("input_ids", "attention_mask", "position_ids")
GOLDEN_DTYPES = ("float64", "float32", "float16", "bfloat16")


@dataclass
class Golden:
    path: Path
    meta: dict[str, str]
    input_ids: np.ndarray
    logits: np.ndarray
    attention_mask: np.ndarray | None = None
    position_ids: np.ndarray | None = None
    sites: dict[str, np.ndarray] = field(default_factory=dict)  # includes "logits"

    @property
    def dtype(self) -> str:
        return self.meta.get("dtype", "float32")


def write_golden(path: str | os.PathLike, trace, meta: dict[str, str], sites=None) -> Path:
    """Write a trace atomically (temporary file in the same folder, then rename)."""
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {"input_ids": torch.from_numpy(np.ascontiguousarray(trace.input_ids, np.int64))}
    if trace.attention_mask is not None:
        tensors["attention_mask"] = torch.from_numpy(
            np.ascontiguousarray(trace.attention_mask, np.int64))
    if getattr(trace, "explicit_positions", True) and trace.position_ids is not None:
        tensors["position_ids"] = torch.from_numpy(
            np.ascontiguousarray(trace.position_ids, np.int64))
    for name, a in trace.sites.items():
        if sites is not None and name != "logits" and name not in sites:
            continue
        t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
        tensors[name] = t.contiguous()
    md = {"format": FORMAT, **{k: str(v) for k, v in meta.items()}}
    with replacing(path) as tmp:
        save_file(tensors, tmp, metadata=md)
        os.chmod(tmp, 0o644)  # safetensors may write 0600; a golden is a shared artifact
    return path


def read_golden(path: str | os.PathLike) -> Golden:
    """Read and check a golden file; every problem is a ParityError naming the file."""
    import torch
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ParityError(f"{path}: no such golden file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ParityError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise ParityError(
            f"{path}: format tag is {meta.get('format')!r}, expected {FORMAT!r}")
    if "input_ids" not in tensors:
        raise ParityError(f"{path}: golden has no 'input_ids'")
    if "logits" not in tensors:
        raise ParityError(f"{path}: golden has no 'logits'")
    dt = meta.get("dtype", "float32")
    if dt not in GOLDEN_DTYPES:
        raise ParityError(f"{path}: dtype metadata {dt!r} is not one of {', '.join(GOLDEN_DTYPES)}")
    ids = tensors["input_ids"]
    if ids.dtype not in (torch.int64, torch.int32) or ids.ndim != 2:
        raise ParityError(f"{path}: input_ids must be int64 [B, T], got {ids.dtype} "
                          f"{list(ids.shape)}")
    b, t = ids.shape
    logits = tensors["logits"]
    if not logits.is_floating_point() or logits.ndim != 3 or tuple(logits.shape[:2]) != (b, t):
        raise ParityError(f"{path}: logits must be float [B, T, V] = [{b}, {t}, V], got "
                          f"{logits.dtype} {list(logits.shape)}")
    extra = {}
    for k in ("attention_mask", "position_ids"):
        if k in tensors:
            a = tensors[k]
            if tuple(a.shape) != (b, t) and not (k == "attention_mask" and a.ndim == 2
                                                 and a.shape[0] == b and a.shape[1] >= t):
                raise ParityError(f"{path}: {k} has shape {list(a.shape)}, input_ids {[b, t]}")
            extra[k] = a.to(torch.int64).numpy()
    label_check(path, dt, logits)
    names = site_order(meta.get("family"), [k for k in tensors if k not in INPUT_KEYS])
    sites = {k: tensors[k].to(torch.float64).numpy() for k in names}
    return Golden(path=path, meta=meta, input_ids=ids.to(torch.int64).numpy(),
                  logits=sites["logits"], attention_mask=extra.get("attention_mask"),
                  position_ids=extra.get("position_ids"), sites=sites)


def label_check(path: Path, dtype: str, logits) -> None:
    """The `dtype` label sets the tolerance, so it must be believable: logits computed in that
    dtype hold only values it can represent (an fp16 model's logits upcast to float32 still
    do). Logits the declared dtype cannot hold were computed at another precision: refused,
    never judged at the looser tolerance the label would pick. (Other sites may legitimately be
    kept wider than the model dtype, e.g. upcast attention scores.)"""
    import torch

    from reference.ops import round_to

    if dtype == "float64":
        return
    x = logits.to(torch.float64).numpy()
    fin = np.isfinite(x)
    with np.errstate(over="ignore"):
        off = fin & (round_to(np.where(fin, x, 0.0), dtype) != np.where(fin, x, 0.0))
    n = int(off.sum())
    if n:
        idx = tuple(int(i) for i in np.argwhere(off)[0])
        raise ParityError(
            f"{path}: dtype says {dtype} but the logits hold values {dtype} cannot represent "
            f"({n} of {x.size}, stored as {str(logits.dtype).removeprefix('torch.')}; e.g. "
            f"{x[idx]!r} at {idx}): label the golden with the precision its logits were "
            f"computed in")


def site_order(family: str | None, names: list[str]) -> list[str]:
    """Sites in execution order (a safetensors file keeps its keys sorted by name, so the order
    of the trace is lost on disk): the family's site scheme first, unknown names after it."""
    import reference

    if family not in reference.FAMILIES:
        return names
    layers = [int(n.split(".")[1]) for n in names
              if n.startswith("blocks.") and n.split(".")[1].isdigit()]
    rank = {s: i for i, s in enumerate(reference.site_names(family, max(layers, default=-1) + 1))}
    return sorted(names, key=lambda s: (s not in rank, rank.get(s, 0)))


def dtype_of(t) -> str:
    """A torch tensor's dtype by name ('float16')."""
    return str(t.dtype).removeprefix("torch.")

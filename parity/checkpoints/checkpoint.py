"""Checkpoint IO: Hugging Face-layout directories, read lazily, validated with clear errors.

Accepted layouts (DESIGN.md "Checkpoints"): `config.json` plus one of `model.safetensors`,
`model.safetensors.index.json` (shards), `pytorch_model.bin` (loaded only with
`weights_only=True`; pickled code is refused) or `pytorch_model.bin.index.json`.
Keys may carry the family's key prefix (`transformer.`) or not; the family's legacy buffers
(`attn.bias`, `attn.masked_bias`) are ignored; a tied LM head may be absent. Canonical names are
the HF keys without the prefix. The names are facts of the family registry (`reference.families`).
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import reference
from reference.config import ConfigError, ModelConfig

from parity.errors import CheckpointError, StructureError

FLOAT_DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64}
SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                      "F64": torch.float64}


def canonical_key(key: str, family: str) -> str:
    """A stored key without the family's key prefix."""
    return reference.family(family).canonical_key(key)


def is_legacy_buffer(name: str, family: str) -> bool:
    """A per-layer buffer old HF checkpoints carry (`h.3.attn.masked_bias`): not a weight."""
    m = re.fullmatch(r"h\.\d+\.(.+)", name)
    return m is not None and m.group(1) in reference.family(family).legacy_buffers


def read_config(path: Path) -> ModelConfig:
    f = path / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{f}: missing config.json")
    try:
        raw = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{f}: cannot read ({e.strerror or e})") from None
    try:
        return reference.parse_config(raw)
    except ConfigError as e:
        raise CheckpointError(f"{f}: {e}") from None
    except (TypeError, ValueError) as e:  # a field of the wrong type, e.g. "layer_norm_epsilon": "x"
        raise CheckpointError(f"{f}: a field has the wrong type ({e})") from None


@dataclass
class Entry:
    file: Path
    key: str  # key as stored in the file
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class Checkpoint:
    """A checkpoint directory: its config, and where each canonical tensor lives (read lazily)."""

    path: Path
    config: ModelConfig
    entries: dict[str, Entry]
    ignored: list[str] = field(default_factory=list)
    # a stored LM head under a config that ties it to the embedding: read only to check that it
    # equals the embedding (structure_problems)
    tied_head: Entry | None = None
    fmt: str = "safetensors"
    # keep safetensors files open (fast for many small reads). The gate turns this off: an open
    # memory map keeps every page it has served resident, so RSS would grow with depth.
    keep_open: bool = True
    _handles: dict = field(default_factory=dict, repr=False)
    _bin: dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ reading
    def has(self, name: str) -> bool:
        return name in self.entries

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor as stored (its own dtype), read from disk now."""
        e = self._entry(name)
        try:
            if self.fmt == "safetensors":
                t = self._handle(e.file).get_tensor(e.key)
                if not self.keep_open:
                    t = t.clone()  # own memory, so the map can go
                    self._handles.clear()
                return t
            return self._bin_state(e.file)[e.key]
        except CheckpointError:
            raise
        except Exception as ex:  # noqa: BLE001 - any reader failure is a bad file
            raise CheckpointError(f"{e.file}: cannot read tensor {e.key!r} ({ex})") from None

    def rows(self, name: str, index: np.ndarray) -> torch.Tensor:
        """Rows `index` of a 2-D tensor (embedding lookup), reading only what is needed where
        the format allows it."""
        e = self._entry(name)
        idx = np.asarray(index)
        if self.fmt != "safetensors":
            return self.tensor(name)[torch.as_tensor(idx)]
        try:
            lo, hi = int(idx.min()), int(idx.max()) + 1
            block = self._handle(e.file).get_slice(e.key)[lo:hi]
        except Exception as ex:  # noqa: BLE001 - any reader failure is a bad file
            raise CheckpointError(f"{e.file}: cannot read tensor {e.key!r} ({ex})") from None
        return block[torch.as_tensor(idx - lo)]

    def float64(self, name: str) -> np.ndarray:
        """A tensor as float64 NumPy, refusing non-finite values."""
        t = self.tensor(name)
        a = t.to(torch.float64).numpy()
        if not np.isfinite(a).all():
            bad = int((~np.isfinite(a)).sum())
            raise CheckpointError(
                f"{self.entries[name].file}: tensor {self.entries[name].key!r} has {bad} "
                "non-finite values"
            )
        return a

    def weights(self) -> "LazyWeights":
        return LazyWeights(self)

    def _entry(self, name: str) -> Entry:
        fam = reference.family(self.config.family)
        if name == fam.lm_head + ".weight" and name not in self.entries \
                and self.config.tie_word_embeddings:
            name = fam.tok + ".weight"  # a tied head is the token embedding
        if name not in self.entries:
            raise CheckpointError(f"{self.path}: no tensor {name!r}")
        return self.entries[name]

    def _handle(self, file: Path):
        from safetensors import safe_open

        if file not in self._handles:
            if not self.keep_open:
                self._handles.clear()  # drop the previous map (one file open at a time)
            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file]

    def _bin_state(self, file: Path) -> dict:
        if file not in self._bin:
            self._bin[file] = load_bin(file)
        return self._bin[file]

    # ------------------------------------------------------------------ validation
    def structure_problems(self) -> list[str]:
        """Everything structurally wrong, one sentence each: missing or unexpected keys, shapes
        that disagree with the config, non-float dtypes, and a stored LM head that differs from
        the embedding although the config ties them (transformers then uses the stored head,
        while a tied reading would drop it). Reads tensors one chunk at a time."""
        expected = reference.param_shapes(self.config)
        out = []
        missing = [k for k in expected if k not in self.entries]
        if missing:
            out.append(f"{self.path}: missing weights {_few(missing)} for {self.config.family} "
                       f"with {self.config.n_layer} layers")
        unexpected = [k for k in self.entries if k not in expected]
        if unexpected:
            out.append(f"{self.path}: unexpected weights {_few(unexpected)}")
        for name, shape in expected.items():
            e = self.entries.get(name)
            if e is None:
                continue
            if tuple(e.shape) != tuple(shape):
                out.append(f"{e.file}: tensor {e.key!r} has shape {list(e.shape)}, config.json "
                           f"implies {list(shape)}")
            elif e.dtype not in FLOAT_DTYPES:
                out.append(f"{e.file}: tensor {e.key!r} has dtype {e.dtype}, not float")
        if not out and self.tied_head is not None:
            why = self._tied_head_differs()
            if why:
                out.append(why)
        return out

    def _tied_head_differs(self) -> str | None:
        """The stored head of a tied config against the embedding, row chunk by row chunk."""
        head = self.tied_head
        emb = self._entry("lm_head.weight")  # resolves to the embedding
        where = f"{head.file}: {head.key!r} and {emb.key!r}"
        if tuple(head.shape) != tuple(emb.shape):
            return (f"{where}: the config ties the LM head to the embedding, but the stored head "
                    f"has shape {list(head.shape)}, the embedding {list(emb.shape)}")
        rows, step = head.shape[0], max(1, (1 << 22) // max(1, head.shape[1]))
        diff, n_diff = 0.0, 0
        for a in range(0, rows, step):
            idx = np.arange(a, min(rows, a + step))
            h = self._read_rows(head, idx).to(torch.float64)
            w = self.rows("lm_head.weight", idx).to(torch.float64)
            d = (h - w).abs()
            n_diff += int((d != 0).sum()) + int((torch.isnan(h) != torch.isnan(w)).sum())
            diff = max(diff, float(torch.nan_to_num(d, nan=math.inf).max()))
        if n_diff:
            return (f"{where} differ although the config ties them (tie_word_embeddings): "
                    f"{n_diff} values differ, max |diff| {diff:.3g}; transformers would use the "
                    f"stored head, a tied reading the embedding. Drop the stored head or set "
                    f"tie_word_embeddings to false")
        return None

    def _read_rows(self, e: Entry, idx: np.ndarray) -> torch.Tensor:
        if self.fmt != "safetensors":
            return self._bin_state(e.file)[e.key][torch.as_tensor(idx)]
        lo, hi = int(idx.min()), int(idx.max()) + 1
        return self._handle(e.file).get_slice(e.key)[lo:hi][torch.as_tensor(idx - lo)]

    def validate(self, check_values: bool = True) -> None:
        """Raise StructureError on missing/unexpected keys, wrong shapes or dtypes, a stored
        head that a tied config would ignore, and CheckpointError (with check_values) on
        non-finite values. Reads one tensor at a time."""
        problems = self.structure_problems()
        if problems:
            raise StructureError(problems[0] + (f" (and {len(problems) - 1} more problems)"
                                                if len(problems) > 1 else ""))
        if check_values:
            for name in reference.param_shapes(self.config):
                self.float64(name)

    def storage_dtypes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.entries.values():
            k = str(e.dtype).removeprefix("torch.")
            out[k] = out.get(k, 0) + 1
        return out


class LazyWeights(Mapping):
    """Canonical name -> float64 array, read from disk on access (kept only if `cache`)."""

    def __init__(self, ckpt: Checkpoint, cache: bool = True):
        self.ckpt, self.cache, self._memo = ckpt, cache, {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._memo:
            return self._memo[name]
        a = self.ckpt.float64(name)
        if self.cache:
            self._memo[name] = a
        return a

    def __iter__(self):
        return iter(reference.param_shapes(self.ckpt.config))

    def __len__(self) -> int:
        return len(reference.param_shapes(self.ckpt.config))


def _few(keys: list[str], n: int = 4) -> str:
    s = ", ".join(repr(k) for k in keys[:n])
    return s + (f" and {len(keys) - n} more" if len(keys) > n else "")


def load_bin(file: Path) -> dict:
    """torch.load with weights_only=True: tensors only, never pickled code."""
    try:
        try:
            sd = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            sd = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "Unpickler" in str(e):
            msg = "it holds pickled objects other than tensors (refused: weights_only=True)"
        raise CheckpointError(f"{file}: cannot load ({msg})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{file}: not a state dict of tensors")
    return sd


def _safetensors_entries(file: Path) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """Read and check a safetensors header without loading tensors."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{file}: truncated (no safetensors header)")
            n = int.from_bytes(head, "little")
            if n <= 0 or n > size - 8 or n > 100_000_000:
                raise CheckpointError(f"{file}: corrupt safetensors header length {n}")
            header = json.loads(f.read(n))
    except CheckpointError:
        raise
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header")
    data = size - 8 - n
    out = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dt, shape, (lo, hi) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: corrupt header entry for {key!r}") from None
        if hi > data or lo > hi:
            raise CheckpointError(
                f"{file}: truncated: tensor {key!r} ends at byte {hi} of a {data}-byte data section"
            )
        tdt = SAFETENSORS_DTYPES.get(dt)
        if tdt is None:
            tdt = getattr(torch, {"I64": "int64", "I32": "int32", "U8": "uint8", "BOOL": "bool",
                                  "I8": "int8", "I16": "int16"}.get(dt, "uint8"))
        numel = int(np.prod(shape)) if shape else 1
        if hi - lo != numel * torch.empty((), dtype=tdt).element_size():
            raise CheckpointError(
                f"{file}: tensor {key!r} claims shape {list(shape)} {dt} but holds {hi - lo} bytes"
            )
        out.append((key, shape, tdt))
    return out


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a checkpoint directory: read config and headers only (no tensor data)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    config = read_config(path)
    files: list[tuple[Path, list]] = []
    fmt = "safetensors"
    if (path / "model.safetensors").is_file():
        f = path / "model.safetensors"
        files.append((f, _safetensors_entries(f)))
    elif (path / "model.safetensors.index.json").is_file():
        for f in _shards(path / "model.safetensors.index.json"):
            files.append((f, _safetensors_entries(f)))
    elif (path / "pytorch_model.bin").is_file() or (path / "pytorch_model.bin.index.json").is_file():
        fmt = "bin"
        shard_files = ([path / "pytorch_model.bin"] if (path / "pytorch_model.bin").is_file()
                       else _shards(path / "pytorch_model.bin.index.json"))
        for f in shard_files:
            sd = load_bin(f)
            files.append((f, [(k, tuple(v.shape), v.dtype) for k, v in sd.items()]))
    else:
        raise CheckpointError(
            f"{path}: no weights (expected model.safetensors, model.safetensors.index.json or "
            "pytorch_model.bin)"
        )
    ckpt = Checkpoint(path=path, config=config, entries={}, fmt=fmt)
    head = reference.family(config.family).lm_head + ".weight"
    for f, items in files:
        for key, shape, dt in items:
            name = canonical_key(key, config.family)
            if is_legacy_buffer(name, config.family):
                ckpt.ignored.append(key)
                continue
            if name == head and config.tie_word_embeddings:
                ckpt.ignored.append(key)  # tied: the embedding is the head, if they agree
                ckpt.tied_head = Entry(f, key, shape, dt)
                continue
            if name in ckpt.entries:
                raise CheckpointError(f"{f}: tensor {name!r} appears twice")
            ckpt.entries[name] = Entry(f, key, shape, dt)
    return ckpt


def _shards(index: Path) -> list[Path]:
    try:
        wm = json.loads(index.read_text())["weight_map"]
        names = sorted(set(wm.values()))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index}: not a valid shard index ({e})") from None
    out = []
    root = index.parent.resolve()
    for n in names:
        f = index.parent / n
        if not isinstance(n, str) or root not in (f.resolve().parents):
            raise CheckpointError(f"{index}: shard {n!r} lies outside the checkpoint folder")
        if not f.is_file():
            raise CheckpointError(f"{index}: shard {n} is missing")
        out.append(f)
    return out


def load_checkpoint(path, check_values: bool = True) -> Checkpoint:
    ckpt = open_checkpoint(path)
    ckpt.validate(check_values=check_values)
    return ckpt

"""Model inputs: token ids from a string, a safetensors file or text, validated against a config."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reference.config import ModelConfig

from parity.errors import InputError, ParityError
from parity.checkpoints.tokenizer_check import load_tokenizer


@dataclass
class Inputs:
    input_ids: np.ndarray  # (B, T) int64
    attention_mask: np.ndarray | None = None  # (B, T) int64, 1 = real token
    position_ids: np.ndarray | None = None  # (B, T) int64

    @property
    def shape(self):
        return self.input_ids.shape

    def rows(self) -> list[list[int]]:
        """Each row's real tokens (padding dropped)."""
        if self.attention_mask is None:
            return [r.tolist() for r in self.input_ids]
        return [r[m == 1].tolist() for r, m in zip(self.input_ids, self.attention_mask)]


def parse_tokens(text: str) -> Inputs:
    """'464 3290 318' is one row; rows are separated by ';' and must have equal length."""
    rows = [r.replace(",", " ").split() for r in text.split(";")]
    rows = [r for r in rows if r]
    if not rows:
        raise ParityError("--tokens: no token ids given")
    try:
        ids = [[int(t) for t in r] for r in rows]
    except ValueError as e:
        raise ParityError(f"--tokens: not an integer ({e})") from None
    if len({len(r) for r in ids}) != 1:
        raise ParityError("--tokens: rows have different lengths (pad them and use --inputs)")
    return Inputs(np.asarray(ids, dtype=np.int64))


def load_inputs(path: str | Path) -> Inputs:
    """A safetensors file with `input_ids` and optional `attention_mask`, `position_ids`."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise ParityError(f"{path}: no such inputs file")
    try:
        d = load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise ParityError(f"{path}: not a readable safetensors file ({e})") from None
    if "input_ids" not in d:
        raise ParityError(f"{path}: has no 'input_ids' tensor")
    out = {}
    for k in ("input_ids", "attention_mask", "position_ids"):
        if k in d:
            a = d[k]
            if a.dtype.kind not in "iu":
                raise ParityError(f"{path}: {k!r} must be integer, got {a.dtype}")
            if a.ndim == 1:
                a = a[None]
            if a.ndim != 2:
                raise ParityError(f"{path}: {k!r} must be [B, T], got shape {list(a.shape)}")
            out[k] = a.astype(np.int64)
    ids = out["input_ids"]
    for k in ("attention_mask", "position_ids"):
        if k in out and out[k].shape != ids.shape:
            raise ParityError(
                f"{path}: {k!r} has shape {list(out[k].shape)}, input_ids {list(ids.shape)}")
    return Inputs(ids, out.get("attention_mask"), out.get("position_ids"))


PROMPTS_GRAMMAR = ("one prompt per line: `text: ...` or plain text is text; `ids: 464 3290 318` "
                   "is token ids (spaces or commas)")
_ID_LIKE = re.compile(r"[\d\s,;]+")


def read_prompts(path: str | Path) -> list[str | list[int]]:
    """A prompts file, one prompt per line (blank lines skipped), each kind explicit: a line
    `ids: 464 3290 318` is token ids, `text: ...` or any other line is text. A bare line of
    numbers (`1984`, `1 2 3; 4 5 6`) could be either, so it is refused with the two spellings
    to choose from. -> a list of texts (str) and id rows (list[int])."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ParityError(f"{p}: cannot read prompts ({e})") from None
    out: list[str | list[int]] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        head, sep, rest = line.partition(":")
        kind = head.strip().lower() if sep else ""
        if kind == "ids":
            toks = rest.replace(",", " ").split()
            if not toks or not all(t.isdigit() for t in toks):
                raise ParityError(f"{p}: line {n}: `ids:` takes token ids (non-negative "
                                  f"integers separated by spaces or commas), got {rest.strip()!r}")
            out.append([int(t) for t in toks])
        elif kind == "text":
            text = rest[1:] if rest.startswith(" ") else rest
            if not text:
                raise ParityError(f"{p}: line {n}: `text:` with no text")
            out.append(text)
        elif _ID_LIKE.fullmatch(line):
            raise ParityError(f"{p}: line {n} {line.strip()!r} is only numbers: write "
                              f"`ids: {line.strip()}` for token ids or `text: {line.strip()}` "
                              "for text")
        else:
            out.append(line)
    if not out:
        raise ParityError(f"{p}: no prompts ({PROMPTS_GRAMMAR})")
    return out


def prompt_texts(path: str | Path | None) -> list[str]:
    """The text prompts of a prompts file (`ids:` lines are not text): what the gate's
    tokenizer check also tokenizes. None -> []."""
    if path is None:
        return []
    return [t for t in read_prompts(path) if isinstance(t, str)]


def left_pad(rows: list[list[int]]) -> Inputs:
    """Rows of different lengths left-padded with id 0 (mask 0); the mask only when needed."""
    t = max(len(r) for r in rows)
    ids = np.zeros((len(rows), t), dtype=np.int64)
    mask = np.zeros((len(rows), t), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, t - len(r):] = r
        mask[i, t - len(r):] = 1
    return Inputs(ids, mask if (mask == 0).any() else None)


ACCEPTED_INPUTS = ("an Inputs; token ids as a 2-D integer array or tensor (B, T), one row of ids, "
                   "or a list of id lists (rows of different lengths are left-padded); a text "
                   "or a list of texts (tokenized with the checkpoint's tokenizer files)")


def as_inputs(obj, ckpt_dir: str | Path, source: str = "inputs") -> Inputs:
    """Whatever a notebook passes as model input, as Inputs (or InputError saying what is
    accepted). Texts are tokenized with the checkpoint's tokenizer; id rows of different
    lengths are left-padded with a mask and position ids counted from the first real token."""
    if isinstance(obj, Inputs):
        return obj
    if isinstance(obj, str) or (isinstance(obj, (list, tuple)) and obj
                                and all(isinstance(t, str) for t in obj)):
        texts = [obj] if isinstance(obj, str) else list(obj)
        return _positions(tokenize(ckpt_dir, texts))
    if hasattr(obj, "detach") and hasattr(obj, "cpu"):  # a torch tensor, without importing torch
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "iu":
            raise InputError(f"{source}: token ids must be integers, got an array of "
                             f"{obj.dtype} (expected {ACCEPTED_INPUTS})")
        if obj.ndim not in (1, 2):
            raise InputError(f"{source}: token ids must be 1-D or 2-D (B, T), got shape "
                             f"{list(obj.shape)}")
        return Inputs(np.atleast_2d(obj).astype(np.int64))
    if isinstance(obj, (list, tuple)):
        rows = [list(r) if isinstance(r, (list, tuple, np.ndarray)) else r for r in obj]
        if rows and not any(isinstance(r, list) for r in rows):
            rows = [rows]  # one row of ids
        for i, r in enumerate(rows):
            if not isinstance(r, list):
                raise InputError(f"{source}: row {i} is {type(r).__name__}, expected a list of "
                                 f"token ids (expected {ACCEPTED_INPUTS})")
            bad = [t for t in r if isinstance(t, (bool, np.bool_))
                   or not isinstance(t, (int, np.integer))]
            if bad:
                raise InputError(f"{source}: row {i} holds {bad[0]!r} ({type(bad[0]).__name__}); "
                                 f"token ids are integers (expected {ACCEPTED_INPUTS})")
            if not r:
                raise InputError(f"{source}: row {i} is empty (no tokens)")
        if not rows:
            raise InputError(f"{source}: no tokens")
        inp = left_pad([[int(t) for t in r] for r in rows])
        return _positions(inp)
    raise InputError(f"{source}: got {type(obj).__name__}, expected {ACCEPTED_INPUTS}")


def _positions(inp: Inputs) -> Inputs:
    """Position ids counted from each row's first real token (left padding)."""
    if inp.attention_mask is not None and inp.position_ids is None:
        inp.position_ids = np.maximum(np.cumsum(inp.attention_mask, axis=1) - 1, 0)
    return inp


def tokenize(ckpt_dir: str | Path, texts: list[str]) -> Inputs:
    """Tokenize with the checkpoint's tokenizer files (tokenizer.json, or vocab.json+merges.txt);
    rows of different lengths are left-padded (mask 0) with id 0."""
    ckpt_dir = Path(ckpt_dir)
    tok = load_tokenizer(ckpt_dir)
    rows = [tok.encode(t).ids for t in texts]
    if not rows or any(len(r) == 0 for r in rows):
        raise ParityError(f"{ckpt_dir}: a text encodes to no tokens")
    return left_pad(rows)


def validate_inputs(inp: Inputs, cfg: ModelConfig, source: str, past_len: int = 0) -> None:
    """Ids within the vocabulary, lengths within the model's positions, masks of 0/1."""
    ids = inp.input_ids
    if ids.size == 0 or ids.shape[-1] == 0:
        raise ParityError(f"{source}: empty input (no tokens)")
    if ids.min() < 0:
        raise ParityError(f"{source}: negative token id {int(ids.min())}")
    if ids.max() >= cfg.vocab_size:
        raise ParityError(
            f"{source}: token id {int(ids.max())} is out of range for vocab_size {cfg.vocab_size}")
    t = ids.shape[1] + past_len
    if t > cfg.n_positions:
        raise ParityError(
            f"{source}: sequence of {t} tokens is longer than the model's {cfg.n_positions} "
            "positions")
    if inp.attention_mask is not None:
        m = inp.attention_mask
        if not np.isin(m, (0, 1)).all():
            raise ParityError(f"{source}: attention_mask must hold only 0 and 1")
        if (m.sum(axis=1) == 0).any():
            raise ParityError(f"{source}: a row of attention_mask has no real token")
    if inp.position_ids is not None:
        p = inp.position_ids
        if p.min() < 0 or p.max() >= cfg.n_positions:
            bad = int(p.min() if p.min() < 0 else p.max())  # the offending value, either side
            raise ParityError(f"{source}: position id {bad} outside [0, {cfg.n_positions})")


def default_batch(cfg: ModelConfig, length: int = 16, seed: int = 0, pad: int = 3) -> Inputs:
    """The built-in deterministic token batch: two rows of `length` ids drawn with `seed`, the
    second left-padded by `pad` (mask 0, pad id 0) with explicit position ids counting from 0 at
    its first real token (what `generate` does; HF `forward` never derives them itself)."""
    rng = np.random.default_rng([seed, length, cfg.vocab_size])
    length = min(length, cfg.n_positions)
    ids = rng.integers(0, cfg.vocab_size, size=(2, length), dtype=np.int64)
    mask = np.ones_like(ids)
    pad = min(pad, length - 1)
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return Inputs(ids, mask, pos)


# ----------------------------------------------------------------------------- the gate's batch
GATE_ROWS = 4  # row layouts: full length; left-padded by a quarter; a repeated motif; by a half
GATE_TOKENS = (64, 128)  # total tokens (rows x length): fewest (GPT-J-6B's width), most (tiny)
GATE_WORK = 2**31  # tokens x weight elements per layer the batch may cost (sets the token count)
MOTIF = 5  # period of the repeated-motif row


def gate_shape(cfg: ModelConfig) -> tuple[int, int]:
    """(rows, length) of the gate's batch. Tokens: GATE_WORK / (12 d^2) (the weight elements of
    one block), clamped to GATE_TOKENS, so a tiny model gets 4 x 32 and a GPT-J-6B-shaped one
    4 x 16. Lengths reach past a local attention window (GPT-Neo) even where that costs rows
    (then fewer rows, at least 2)."""
    lo, hi = GATE_TOKENS
    tokens = int(min(hi, max(lo, GATE_WORK // (12 * cfg.d_model**2))))
    length = max(tokens // GATE_ROWS, 8)
    if "local" in cfg.attention_layers and cfg.window_size:
        length = max(length, cfg.window_size + 8)
    length = min(length, cfg.n_positions)
    rows = max(2, min(GATE_ROWS, tokens // length))
    return rows, length


def gate_batch(cfg: ModelConfig, seed: int = 0) -> Inputs:
    """The gate's built-in prompts: `gate_shape` rows x length, varied — one full row, two
    left-padded (by a quarter and a half) with position ids from their first real token, one
    repeating a 5-token motif (keys equal but for their position) — and long enough to pass a
    local attention window. The verdict does not hinge on the draw (benchmarks/README.md "Gate
    verdict stability"): attention rows the dtype cannot resolve are not judged
    (`metrics.ill_conditioned_rows`), which is what made the old 2 x 16 batch's verdict a
    lottery."""
    rows, length = gate_shape(cfg)
    rng = np.random.default_rng([seed, rows, length, cfg.vocab_size])
    ids = rng.integers(0, cfg.vocab_size, size=(rows, length), dtype=np.int64)
    mask = np.ones_like(ids)
    if rows > 2:  # repeated tokens: keys that differ only by their position
        ids[2] = np.resize(rng.integers(0, cfg.vocab_size, size=MOTIF), length)
    for r, frac in ((1, 4), (3, 2)):  # left padding, position ids from the first real token
        if r < rows:
            pad = min(length // frac, length - 1)
            ids[r, :pad] = 0
            mask[r, :pad] = 0
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return Inputs(ids, mask, pos)

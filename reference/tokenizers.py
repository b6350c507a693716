"""Reference tokenizers, in plain Python: the truth that `tokenizers` is checked against.

Two kinds (MODEL_NOTES section 6):
  byte-level   GPT-2, GPT-Neo, GPT-J, GPTMeg: the GPT-2 pre-split pattern, UTF-8 bytes mapped
               through `bytes_to_unicode`, rank-ordered BPE merges; `<|endoftext|>` and added
               tokens (GPT-J's 143 `<|extratoken_N|>`, ids 50257..50399) matched as whole
               strings before anything else.
  openai-gpt   lower-cased BPE with the end-of-word suffix `</w>` after BERT basic tokenization
               as `tokenizers` does it: BertNormalizer (clean text, CJK spacing, strip accents,
               lower case) + BertPreTokenizer + BPE(end_of_word_suffix="</w>", unk "<unk>") +
               BPEDecoder.

    tok = load(ckpt_dir)                # tokenizer.json, or vocab.json + merges.txt
    tok.encode("Hello world")           # -> [15496, 995]
    tok.encode_tokens(text)             # -> [Token(id, token, start, end)], spans in `text`
    tok.decode(ids)                     # -> str

Nothing here imports `tokenizers`, a regex engine or torch: the GPT-2 pattern
`'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+` is a
hand-written scanner over Unicode general categories (`gpt2_pre_split`), BPE is GPT-2's own
loop (merge every occurrence of the lowest-ranked pair, repeat), added tokens are matched
leftmost-longest by a plain scan.

Known differences, not reproduced:
  * OpenAI GPT's original tokenizer (and transformers 4.x's slow one when `ftfy` and `spacy` are
    importable) runs ftfy.fix_text, `text_standardize` (dashes, ellipses, punctuation padding)
    and spaCy's English tokenizer. `tokenizers` (and transformers 5) use BERT basic
    tokenization instead, and so does this reference: the same text can tokenize differently
    from a 4.x install with spaCy.
  * `tokenizers`' BERT normalizer removes private-use characters (category Co) as controls;
    Google's BERT removes only Cc and Cf. The reference follows `tokenizers`.
  * Merges are applied GPT-2's way (all occurrences of the best pair at once); `tokenizers` pops
    one (rank, position) at a time. The two agree on every merges file in which a merge's parts
    were made by earlier merges (every trained file); an ill-formed file can tell them apart.
  * Unicode versions: the properties come from Python's unicodedata, moved to the versions
    inside `tokenizers` by the pins of `reference/tokenizer_unicode.py` (regex letters and
    numbers of scripts encoded after Python's database; BERT categories frozen at an older
    Unicode). The Rust `\\w` behind an added token's `single_word` flag is approximated by
    letters, marks, digits, connector punctuation and the Other_Alphabetic symbols.
"""
from __future__ import annotations

import json
import string
import unicodedata
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable

from . import tokenizer_unicode as pins
from .families import REGISTRY


class UnsupportedTokenizer(ValueError):
    """A tokenizer pipeline outside what this reference covers (e.g. a WordPiece model)."""


# ----------------------------------------------------------------------------- Unicode
# The Unicode White_Space property: what the GPT-2 pattern's \s and Rust's char::is_whitespace
# mean (str.isspace also counts U+001C..U+001F, which are not White_Space).
WHITE_SPACE = frozenset(map(chr, (0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680,
                                  *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F, 0x205F,
                                  0x3000)))


def unicode_pins_note() -> str:
    """'' when the pins were made against this Python's Unicode database, else a warning
    (another database moves other code points: regenerate the pins)."""
    if pins.UNIDATA_VERSION == unicodedata.unidata_version:
        return ""
    return (f"Unicode pins made against unicodedata {pins.UNIDATA_VERSION}, this Python has "
            f"{unicodedata.unidata_version}: rare characters may differ (regenerate with "
            "`parity tokenizer --write-unicode-pins`)")


def _expand(runs) -> dict[int, object]:
    return {cp: v for lo, hi, v in runs for cp in range(lo, hi + 1)}


_REGEX_PINS = _expand(pins.REGEX_CLASS)
_CONTROL_PINS = _expand(pins.BERT_CONTROL)
_MARK_PINS = _expand(pins.BERT_MARK)
_PUNCT_PINS = _expand(pins.BERT_PUNCTUATION)


def regex_class_unpinned(c: str) -> str:
    """The GPT-2 pattern's class of one character by Python's unicodedata: L (\\p{L}),
    N (\\p{N}), S (\\s) or O (anything else)."""
    if c in WHITE_SPACE:
        return "S"
    cat = unicodedata.category(c)
    return "L" if cat[0] == "L" else "N" if cat[0] == "N" else "O"


@lru_cache(maxsize=None)
def regex_class(c: str) -> str:
    return _REGEX_PINS.get(ord(c)) or regex_class_unpinned(c)


def bert_is_control_unpinned(c: str) -> bool:
    """BertNormalizer's control characters: Cc, Cf and Co (`tokenizers`' is_other), except the
    whitespace controls \\t \\n \\r."""
    return c not in "\t\n\r" and unicodedata.category(c) in ("Cc", "Cf", "Co", "Cs")


def is_nonspacing_mark_unpinned(c: str) -> bool:
    return unicodedata.category(c) == "Mn"


def bert_is_punctuation_unpinned(c: str) -> bool:
    """BERT's punctuation: all of ASCII's (which counts $+<=>^`|~), and every P* category."""
    return c in string.punctuation or unicodedata.category(c)[0] == "P"


@lru_cache(maxsize=None)
def bert_is_control(c: str) -> bool:
    v = _CONTROL_PINS.get(ord(c))
    return bert_is_control_unpinned(c) if v is None else v


@lru_cache(maxsize=None)
def is_nonspacing_mark(c: str) -> bool:
    v = _MARK_PINS.get(ord(c))
    return is_nonspacing_mark_unpinned(c) if v is None else v


@lru_cache(maxsize=None)
def bert_is_punctuation(c: str) -> bool:
    v = _PUNCT_PINS.get(ord(c))
    return bert_is_punctuation_unpinned(c) if v is None else v


@lru_cache(maxsize=None)
def decompose(c: str) -> str:
    """NFD of one character (canonical reordering across characters is done by `nfd`)."""
    return pins.NFD.get(ord(c)) or unicodedata.normalize("NFD", c)


@lru_cache(maxsize=None)
def lower(c: str) -> str:
    """Full lowercase of one character alone (so capital sigma is always small sigma: the
    final-sigma rule needs context that a per-character mapping does not have)."""
    return pins.LOWER.get(ord(c)) or c.lower()


def is_cjk(c: str) -> bool:
    """BERT's "Chinese character": the CJK Unified Ideographs blocks (not Hangul or kana)."""
    cp = ord(c)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B920 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def _is_word_char(c: str) -> bool:
    """Rust regex's Unicode \\w (approximate: see the module docstring)."""
    cat = unicodedata.category(c)
    cp = ord(c)
    return (cat[0] in "LM" or cat in ("Nd", "Nl", "Pc") or cp in (0x200C, 0x200D)
            or 0x24B6 <= cp <= 0x24E9 or 0x1F130 <= cp <= 0x1F149 or 0x1F150 <= cp <= 0x1F169
            or 0x1F170 <= cp <= 0x1F189)


# ----------------------------------------------------------------------------- GPT-2 pieces
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map: bytes 33-126, 161-172 and 174-255 map to
    themselves, the other 68 to chr(256 + n) in byte order (so a space is 'Ġ', chr(288))."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    out = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + n)
            n += 1
    return out


CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")  # case-sensitive: 'S is not one


def gpt2_pre_split(text: str, classify: Callable[[str], str] = regex_class
                   ) -> list[tuple[int, int]]:
    """(start, end) of each match of GPT-2's pattern over `text`, in order; they tile the text.

    At each position the alternatives are tried in the pattern's order and the first that
    matches wins (a regex's leftmost-first semantics):
      1. a contraction 's 't 're 've 'm 'll 'd
      2-4. an optional single space (U+0020) then a run of letters / of numbers / of characters
           that are none of letter, number, whitespace
      5. \\s+(?!\\S): a whitespace run, backing off one character when a non-space follows (so
         that the last space goes to the next word); fails if that leaves nothing
      6. \\s+: the whole whitespace run (a single space before a word never reaches here).
    """
    n = len(text)
    cls = [classify(c) for c in text]
    out = []
    i = 0
    while i < n:
        end = None
        if text[i] == "'":
            for c in CONTRACTIONS:
                if text.startswith(c, i):
                    end = i + len(c)
                    break
        if end is None:
            # alternatives 2-4 (mutually exclusive classes, so their order cannot matter):
            # with the space when a run follows it, else the run starting here
            j = i + 1 if text[i] == " " and i + 1 < n and cls[i + 1] != "S" else i
            if cls[j] != "S":
                end = j + 1
                while end < n and cls[end] == cls[j]:
                    end += 1
        if end is None:
            # text[i] is whitespace (the only class left for it)
            run = i
            while run < n and cls[run] == "S":
                run += 1
            if run == n:
                end = run
            elif run - 1 > i:
                end = run - 1  # \s+(?!\S): leave the last whitespace character
            else:
                end = run  # \s+
        out.append((i, end))
        i = end
    return out


def pre_split_words(text: str) -> list[str]:
    """The GPT-2 pattern's pieces of `text` (what `re.findall` would return)."""
    return [text[a:b] for a, b in gpt2_pre_split(text)]


# ----------------------------------------------------------------------------- BERT pieces
@dataclass(frozen=True)
class BertNormalizer:
    """tokenizers' BertNormalizer. strip_accents=None follows lowercase (BERT's rule)."""

    clean_text: bool = True
    handle_chinese_chars: bool = True
    strip_accents: bool | None = None
    lowercase: bool = True

    def __call__(self, text: str, origin: list[int]) -> tuple[str, list[int]]:
        """Normalize `text`, carrying each output character's index in the original text."""
        chars = list(zip(text, origin))
        if self.clean_text:
            chars = [(" " if c in WHITE_SPACE else c, o) for c, o in chars
                     if not (c in ("\x00", "\ufffd") or bert_is_control(c))]
        if self.handle_chinese_chars:
            chars = [(x, o) for c, o in chars for x in ((" ", c, " ") if is_cjk(c) else (c,))]
        strip = self.lowercase if self.strip_accents is None else self.strip_accents
        if strip:
            chars = [(c, o) for c, o in nfd(chars) if not is_nonspacing_mark(c)]
        if self.lowercase:
            chars = [(x, o) for c, o in chars for x in lower(c)]
        return "".join(c for c, _ in chars), [o for _, o in chars]


def nfd(chars: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Canonical decomposition with canonical ordering: every character decomposed, then each
    run of non-starters stably sorted by combining class (the NFD algorithm)."""
    out = [(d, o) for c, o in chars for d in decompose(c)]
    i = 0
    while i < len(out):
        if unicodedata.combining(out[i][0]) == 0:
            i += 1
            continue
        j = i
        while j < len(out) and unicodedata.combining(out[j][0]) != 0:
            j += 1
        out[i:j] = sorted(out[i:j], key=lambda t: unicodedata.combining(t[0]))
        i = j
    return out


def bert_pre_split(text: str) -> list[tuple[int, int]]:
    """BertPreTokenizer: split on whitespace (dropped), then every punctuation character is a
    piece of its own. (start, end) of each piece."""
    out = []
    start = None
    for i, c in enumerate(text):
        if c in WHITE_SPACE or bert_is_punctuation(c):
            if start is not None:
                out.append((start, i))
                start = None
            if c not in WHITE_SPACE:
                out.append((i, i + 1))
        elif start is None:
            start = i
    if start is not None:
        out.append((start, len(text)))
    return out


# ----------------------------------------------------------------------------- BPE
def bpe(symbols: list[tuple[str, int]], ranks: dict[tuple[str, str], int]) -> list[tuple[str, int]]:
    """GPT-2's merge loop on (symbol, length) pairs: while some adjacent pair has a rank, merge
    every occurrence (left to right, non-overlapping) of the lowest-ranked one."""
    word = list(symbols)
    while len(word) > 1:
        best = None
        for a, b in zip(word, word[1:]):
            r = ranks.get((a[0], b[0]))
            if r is not None and (best is None or r < best[0]):
                best = (r, a[0], b[0])
        if best is None:
            break
        _, first, second = best
        merged = []
        i = 0
        while i < len(word):
            if i + 1 < len(word) and word[i][0] == first and word[i + 1][0] == second:
                merged.append((first + second, word[i][1] + word[i + 1][1]))
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = merged
    return word


# ----------------------------------------------------------------------------- tokens
@dataclass(frozen=True)
class AddedToken:
    """A token matched as a whole string before pre-splitting (tokenizers' AddedToken)."""

    content: str
    id: int
    special: bool = False
    normalized: bool = False  # matched in the normalized text (else in the raw text)
    lstrip: bool = False  # swallow the whitespace on its left
    rstrip: bool = False  # ... on its right
    single_word: bool = False  # only where no word character touches it


@dataclass(frozen=True)
class Token:
    id: int
    token: str  # the vocabulary string (an added token: the text it matched)
    start: int  # span in the encoded text, in characters
    end: int


def split_added(text: str, tokens: list[AddedToken], patterns: dict[str, AddedToken] | None = None
                ) -> list[tuple[int, int, AddedToken | None]]:
    """Tile `text` into (start, end, token-or-None): every occurrence of an added token, found
    leftmost-longest and non-overlapping (a match rejected by single_word is still consumed),
    with lstrip/rstrip widening a match over adjacent whitespace."""
    patterns = patterns if patterns is not None else {t.content: t for t in tokens}
    by_first: dict[str, list[str]] = {}
    for p in sorted(patterns, key=len, reverse=True):
        if p:
            by_first.setdefault(p[0], []).append(p)
    out = []
    pos = 0  # end of the last emitted piece
    i = 0
    n = len(text)
    while i < n:
        cands = by_first.get(text[i])
        hit = next((p for p in cands if text.startswith(p, i)), None) if cands else None
        if hit is None:
            i += 1
            continue
        tok = patterns[hit]
        start, stop = i, i + len(hit)
        i = stop
        if tok.single_word and ((start > 0 and _is_word_char(text[start - 1]))
                                or (stop < n and _is_word_char(text[stop]))):
            continue
        if tok.lstrip:
            s = start
            while s > 0 and text[s - 1] in WHITE_SPACE:
                s -= 1
            start = max(s, pos)
        if tok.rstrip:
            while stop < n and text[stop] in WHITE_SPACE:
                stop += 1
            i = stop
        if pos < start:
            out.append((pos, start, None))
        out.append((start, stop, tok))
        pos = stop
    if pos < n:
        out.append((pos, n, None))
    return out


# ----------------------------------------------------------------------------- the tokenizer
@dataclass
class BPETokenizer:
    """One BPE pipeline: [normalizer] -> pre-tokenizer -> BPE -> [template]; decoder back.

    Fields are plain data so that a test can plant a bug with `dataclasses.replace` (a rank
    swapped, a byte mapped wrong, an added token dropped, another pre-split)."""

    kind: str  # "byte-level" | "openai-gpt"
    vocab: dict[str, int]
    merges: list[tuple[str, str]]
    added: tuple[AddedToken, ...] = ()
    normalizer: BertNormalizer | None = None
    pre_tokenizer: str = "byte-level"  # "byte-level" | "bert" | "none"
    add_prefix_space: bool = False
    use_regex: bool = True
    unk_token: str | None = None
    end_of_word_suffix: str = ""
    fuse_unk: bool = False
    byte_fallback: bool = False
    ignore_merges: bool = False
    decoder: str | None = "byte-level"  # "byte-level" | "bpe" | None (join with spaces)
    decoder_suffix: str = "</w>"
    template: tuple | None = None  # ((id, token) | "A", ...) around a single sequence
    byte_encoder: dict[int, str] = field(default_factory=bytes_to_unicode)
    pre_split: Callable[[str], list[tuple[int, int]]] = gpt2_pre_split

    def __post_init__(self):
        self.ranks = {tuple(m): r for r, m in enumerate(self.merges)}
        for a, b in self.ranks:
            for t in (a, b, a + b):
                if t not in self.vocab:
                    raise ValueError(f"merge {a!r} {b!r}: {t!r} is not in the vocabulary")
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.added_by_id = {a.id: a for a in self.added}
        self.special = {a.content for a in self.added if a.special}
        raw = {a.content: a for a in self.added if not a.normalized}
        norm = {}
        for a in self.added:
            if a.normalized:
                norm[self._normalize_plain(a.content)] = a
        self._raw_patterns, self._norm_patterns = raw, norm
        self._cache: dict[str, list[tuple[str, int]]] = {}

    def _normalize_plain(self, s: str) -> str:
        return self.normalizer(s, list(range(len(s))))[0] if self.normalizer else s

    # -- encode
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [t.id for t in self.encode_tokens(text, add_special_tokens)]

    def encode_tokens(self, text: str, add_special_tokens: bool = True) -> list[Token]:
        out: list[Token] = []
        for a, b, tok in split_added(text, list(self._raw_patterns.values()), self._raw_patterns):
            if tok is not None:
                out.append(Token(tok.id, text[a:b], a, b))
                continue
            s, origin = text[a:b], list(range(a, b))
            if self.normalizer:
                s, origin = self.normalizer(s, origin)
            for c, d, ntok in split_added(s, [], self._norm_patterns):
                lo, hi = _span(origin, c, d)
                if ntok is not None:
                    out.append(Token(ntok.id, s[c:d], lo, hi))
                else:
                    out += self._pre_tokenize_and_model(s[c:d], origin[c:d])
        if add_special_tokens and self.template:
            seq, out = out, []
            for part in self.template:
                if part == "A":
                    out += seq
                else:
                    out.append(Token(part[0], part[1], 0, 0))
        return out

    def _pre_tokenize_and_model(self, s: str, origin: list[int]) -> list[Token]:
        if not s:
            return []
        out: list[Token] = []
        if self.pre_tokenizer == "byte-level":
            if self.add_prefix_space and not s.startswith(" "):
                s, origin = " " + s, [origin[0]] + origin
            words = self.pre_split(s) if self.use_regex else [(0, len(s))]
            for a, b in words:
                mapped, spans = [], []
                for c, o in zip(s[a:b], origin[a:b]):
                    for byte in c.encode("utf-8"):
                        mapped.append(self.byte_encoder[byte])
                        spans.append((o, o + 1))
                out += self._model("".join(mapped), spans)
        else:
            words = bert_pre_split(s) if self.pre_tokenizer == "bert" else [(0, len(s))]
            for a, b in words:
                out += self._model(s[a:b], [(o, o + 1) for o in origin[a:b]])
        return out

    def _model(self, word: str, spans: list[tuple[int, int]]) -> list[Token]:
        """BPE of one pre-tokenized word; `spans` gives each character's span in the text."""
        if self.ignore_merges and word in self.vocab:
            return [Token(self.vocab[word], word, spans[0][0], spans[-1][1])]
        pieces = self._cache.get(word)
        if pieces is None:
            pieces = bpe(self._symbols(word), self.ranks)
            self._cache[word] = pieces
        out, k = [], 0
        for sym, n in pieces:
            out.append(Token(self.vocab[sym], sym, spans[k][0], spans[k + n - 1][1]))
            k += n
        return out

    def _symbols(self, word: str) -> list[tuple[str, int]]:
        """The word's initial symbols as (string, characters covered): one per character, the
        last with the end-of-word suffix; a character outside the vocabulary becomes its UTF-8
        bytes <0xNN> (byte_fallback), else the unknown token (runs fused with fuse_unk), else
        nothing at all (tokenizers drops it)."""
        out: list[tuple[str, int]] = []
        unk: list | None = None
        for i, c in enumerate(word):
            s = c + self.end_of_word_suffix if i == len(word) - 1 else c
            if s in self.vocab:
                if unk:
                    out.append(tuple(unk))
                    unk = None
                out.append((s, 1))
                continue
            if self.byte_fallback:
                codes = [f"<0x{b:02X}>" for b in s.encode("utf-8")]
                if all(t in self.vocab for t in codes):
                    out += [(t, 1 if j == 0 else 0) for j, t in enumerate(codes)]
                    continue
            if self.unk_token is not None:
                if self.unk_token not in self.vocab:
                    raise ValueError(f"unknown token {self.unk_token!r} is not in the vocabulary")
                if unk and self.fuse_unk:
                    unk[1] += 1
                else:
                    if unk:
                        out.append(tuple(unk))
                    unk = [self.unk_token, 1]
        if unk:
            out.append(tuple(unk))
        return out

    # -- decode
    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """tokenizers' Tokenizer.decode: ids -> strings (added tokens as their normalized
        form; unknown ids dropped; special tokens dropped when asked), then the decoder."""
        toks = []
        for i in ids:
            i = int(i)
            a = self.added_by_id.get(i)
            t = (self._normalize_plain(a.content) if a.normalized else a.content) if a else \
                self.id_to_token.get(i)
            if t is None or (skip_special_tokens and t in self.special):
                continue
            toks.append(t)
        if self.decoder == "byte-level":
            data = bytearray()
            for t in toks:
                if all(c in self.byte_decoder for c in t):
                    data += bytes(self.byte_decoder[c] for c in t)
                else:  # not a byte-level string (e.g. an added token with a space): as text
                    data += t.encode("utf-8")
            return data.decode("utf-8", errors="replace")
        if self.decoder == "bpe":
            last = len(toks) - 1
            return "".join(t.replace(self.decoder_suffix, " " if i < last else "")
                           for i, t in enumerate(toks))
        return " ".join(toks)

    def __len__(self) -> int:
        return len(set(self.vocab.values()) | set(self.added_by_id))


def _span(origin: list[int], a: int, b: int) -> tuple[int, int]:
    """Original-text span of normalized characters a..b (empty spans sit at their position)."""
    if not origin:
        return 0, 0
    if a >= b:
        o = origin[min(a, len(origin) - 1)]
        return o, o
    return origin[a], origin[b - 1] + 1


# ----------------------------------------------------------------------------- files
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt")


def has_tokenizer_files(ckpt_dir: str | Path) -> bool:
    d = Path(ckpt_dir)
    return (d / "tokenizer.json").is_file() or (
        (d / "vocab.json").is_file() and (d / "merges.txt").is_file())


def parse_merges(text: str) -> list[tuple[str, str]]:
    """merges.txt: one "a b" per line; lines starting with #version are skipped."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    out = []
    for n, line in enumerate(lines, 1):
        line = line.rstrip("\r")
        if line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ValueError(f"merges.txt line {n}: expected 'a b', got {line!r}")
        out.append((parts[0], parts[1]))
    return out


@dataclass
class Layout:
    """What vocab.json + merges.txt (and the small JSON files beside them) say, read the way
    transformers' GPT2Tokenizer / OpenAIGPTTokenizer read them."""

    kind: str
    vocab: dict[str, int]
    merges: list[tuple[str, str]]
    added: list[AddedToken]
    add_prefix_space: bool = False
    unk_token: str | None = None
    end_of_word_suffix: str = ""


def _read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_layout(ckpt_dir: str | Path) -> Layout:
    """The slow-tokenizer layout. Kind: OpenAI GPT when config.json names a family whose
    tokenizer is "bert-bpe" (the registry) or the vocabulary has `</w>` words, else byte-level. Special tokens: the
    family's defaults (<|endoftext|> as bos/eos/unk; <unk>) unless special_tokens_map.json or
    tokenizer_config.json name others; added tokens from added_tokens.json (not special) and
    tokenizer_config.json's added_tokens_decoder (with their flags)."""
    d = Path(ckpt_dir)
    vocab = _read_json(d / "vocab.json")
    if not isinstance(vocab, dict):
        raise ValueError(f"{d / 'vocab.json'}: not a JSON object of token -> id")
    merges = parse_merges((d / "merges.txt").read_text(encoding="utf-8"))
    config = _read_json(d / "config.json") or {}
    tcfg = _read_json(d / "tokenizer_config.json") or {}
    smap = _read_json(d / "special_tokens_map.json") or {}
    model_type = config.get("model_type")
    fam = REGISTRY.get(model_type) if isinstance(model_type, str) else None
    openai = (fam is not None and fam.tokenizer == "bert-bpe") or any(t.endswith("</w>") for t in vocab)
    kind = "openai-gpt" if openai else "byte-level"
    default = "<unk>" if openai else "<|endoftext|>"
    names = ("unk_token",) if openai else ("unk_token", "bos_token", "eos_token")
    specials, named = [], {}
    for name in (*names, "pad_token"):
        v = smap.get(name, tcfg.get(name, default if name in names else None))
        v = v.get("content") if isinstance(v, dict) else v
        named[name] = v
        if v and v not in specials:
            specials.append(v)
    next_id = max(vocab.values(), default=-1) + 1
    added: dict[str, AddedToken] = {}

    def add(content, **flags):
        nonlocal next_id
        if content in added:
            return
        i = vocab.get(content, flags.pop("id", None))
        if i is None:
            i, next_id = next_id, next_id + 1
        flags.pop("id", None)
        added[content] = AddedToken(content, int(i), **flags)

    for i, t in sorted(((int(k), v) for k, v in (tcfg.get("added_tokens_decoder") or {}).items())):
        add(t["content"], id=i, special=bool(t.get("special")),
            normalized=bool(t.get("normalized", not t.get("special"))),
            lstrip=bool(t.get("lstrip")), rstrip=bool(t.get("rstrip")),
            single_word=bool(t.get("single_word")))
    for content, i in sorted((_read_json(d / "added_tokens.json") or {}).items(),
                             key=lambda kv: kv[1]):
        add(content, id=i, special=False, normalized=True)
    for s in specials:
        add(s, special=True, normalized=False)
    return Layout(kind, vocab, merges, list(added.values()),
                  add_prefix_space=bool(tcfg.get("add_prefix_space", False)),
                  unk_token=named["unk_token"] if openai else None,
                  end_of_word_suffix="</w>" if openai else "")


def from_layout(spec: Layout) -> BPETokenizer:
    if spec.kind == "byte-level":
        return BPETokenizer("byte-level", spec.vocab, spec.merges, tuple(spec.added),
                            add_prefix_space=spec.add_prefix_space)
    return BPETokenizer("openai-gpt", spec.vocab, spec.merges, tuple(spec.added),
                        normalizer=BertNormalizer(), pre_tokenizer="bert",
                        unk_token=spec.unk_token, end_of_word_suffix=spec.end_of_word_suffix,
                        decoder="bpe", decoder_suffix=spec.end_of_word_suffix)


def _one(obj, what: str, allowed: tuple[str, ...]):
    """A tokenizer.json component: None, or one object of an allowed type (a Sequence of one
    is unwrapped)."""
    if obj is None:
        return None
    t = obj.get("type")
    if t == "Sequence":
        items = obj.get("normalizers") or obj.get("pretokenizers") or obj.get("decoders") \
            or obj.get("processors") or []
        if len(items) == 1:
            return _one(items[0], what, allowed)
        if not items:
            return None
    if t not in allowed:
        raise UnsupportedTokenizer(f"{what} {t!r} (covered: {', '.join(allowed)})")
    return obj


def from_tokenizer_json(tj: dict) -> BPETokenizer:
    """A tokenizer.json (the `tokenizers` serialization) read into the reference pipeline."""
    model = tj.get("model") or {}
    if model.get("type", "BPE") != "BPE":
        raise UnsupportedTokenizer(f"model {model.get('type')!r} (covered: BPE)")
    if model.get("dropout") not in (None, 0, 0.0):
        raise UnsupportedTokenizer("BPE dropout (encoding is random)")
    if model.get("continuing_subword_prefix"):
        raise UnsupportedTokenizer("BPE continuing_subword_prefix")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in model.get("merges", [])]
    if any(len(m) != 2 for m in merges):
        raise ValueError("tokenizer.json: a merge is not a pair")
    norm = _one(tj.get("normalizer"), "normalizer", ("BertNormalizer", "Lowercase"))
    pre = _one(tj.get("pre_tokenizer"), "pre_tokenizer", ("ByteLevel", "BertPreTokenizer"))
    dec = _one(tj.get("decoder"), "decoder", ("ByteLevel", "BPEDecoder"))
    post = _one(tj.get("post_processor"), "post_processor", ("ByteLevel", "TemplateProcessing"))
    normalizer = None
    if norm is not None:
        if norm["type"] == "Lowercase":
            normalizer = BertNormalizer(False, False, False, True)
        else:
            normalizer = BertNormalizer(norm.get("clean_text", True),
                                        norm.get("handle_chinese_chars", True),
                                        norm.get("strip_accents"), norm.get("lowercase", True))
    template = None
    if post is not None and post["type"] == "TemplateProcessing":
        specials = post.get("special_tokens", {})
        template = []
        for part in post.get("single", []):
            if "Sequence" in part:
                template.append("A")
            else:
                name = part["SpecialToken"]["id"]
                for i, t in zip(specials[name]["ids"], specials[name]["tokens"]):
                    template.append((int(i), t))
        template = tuple(template)
    added = tuple(AddedToken(a["content"], int(a["id"]), bool(a.get("special")),
                             bool(a.get("normalized")), bool(a.get("lstrip")),
                             bool(a.get("rstrip")), bool(a.get("single_word")))
                  for a in tj.get("added_tokens") or [])
    suffix = model.get("end_of_word_suffix") or ""
    byte_level = pre is not None and pre["type"] == "ByteLevel"
    kind = "byte-level" if byte_level else "openai-gpt" if suffix else "bpe"
    return BPETokenizer(
        kind, dict(model.get("vocab", {})), merges, added, normalizer=normalizer,
        pre_tokenizer="byte-level" if byte_level else "bert" if pre else "none",
        add_prefix_space=bool(pre.get("add_prefix_space", True)) if byte_level else False,
        use_regex=bool(pre.get("use_regex", True)) if byte_level else True,
        unk_token=model.get("unk_token"), end_of_word_suffix=suffix,
        fuse_unk=bool(model.get("fuse_unk")), byte_fallback=bool(model.get("byte_fallback")),
        ignore_merges=bool(model.get("ignore_merges")),
        decoder={"ByteLevel": "byte-level", "BPEDecoder": "bpe"}.get((dec or {}).get("type")),
        decoder_suffix=(dec or {}).get("suffix", "</w>"), template=template)


def load(ckpt_dir: str | Path) -> BPETokenizer:
    """The reference tokenizer of a checkpoint folder: tokenizer.json when present (what
    transformers' fast tokenizers use), else vocab.json + merges.txt (`read_layout`)."""
    d = Path(ckpt_dir)
    if (d / "tokenizer.json").is_file():
        return from_tokenizer_json(_read_json(d / "tokenizer.json"))
    if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        return from_layout(read_layout(d))
    raise FileNotFoundError(f"{d}: no tokenizer files (tokenizer.json, or vocab.json + "
                            "merges.txt)")


def mutated(tok: BPETokenizer, **changes) -> BPETokenizer:
    """A copy of `tok` with some fields replaced (tests plant bugs with it)."""
    return replace(tok, **changes)

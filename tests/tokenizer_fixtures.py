"""Test vocabularies for the tokenizer checks (issue 8), made here: no download.

Small BPE models are trained with `tokenizers` on seeded generated text and written in the
real checkpoints' file layouts:

  gpt2        vocab.json (256 byte symbols in GPT-2's order, then one token per merge in rank
              order, then <|endoftext|>: GPT-2's 256 + 50000 + 1 structure, scaled down),
              merges.txt ("#version: 0.2" header), tokenizer.json (ByteLevel pre-tokenizer,
              decoder and post-processor; <|endoftext|> special), as transformers saves GPT-2.
  gptj        gpt2's files plus `extra` added tokens <|extratoken_1|>.. right after
              <|endoftext|> (GPT-J: 143 of them, ids 50257..50399), in tokenizer.json's
              added_tokens and in added_tokens.json.
  openai-gpt  vocab.json (characters, characters + "</w>", merges in rank order, <unk>),
              merges.txt, tokenizer.json (BertNormalizer(lowercase) + BertPreTokenizer +
              BPE(unk "<unk>", end_of_word_suffix "</w>") + BPEDecoder).

`files="slow"` leaves tokenizer.json out (the vocab.json + merges.txt layout of old uploads).

    corpus(seed, n_lines)                      the generated training text
    write_tokenizer(kind, out_dir, seed=0, merges=..., extra=143, files="all")
"""
from __future__ import annotations

import functools
import json
import os
import random
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

KINDS = ("gpt2", "gptj", "openai-gpt")
EOT = "<|endoftext|>"
GPTJ_EXTRA = 143  # GPT-J's <|extratoken_N|> count: 50400 - 50257

_SYLLABLE_ON = "b c d f g h j k l m n p r s t v w z st th ch sh pr tr br gr pl cl".split()
_SYLLABLE_NU = "a e i o u ou ea ai ie y".split()
_SYLLABLE_CO = ["", "", "", "n", "r", "s", "t", "l", "ng", "ck", "nd", "st"]
_SCRIPTS = [  # (name, code point ranges) for non-Latin words
    ("greek", [(0x3B1, 0x3C9), (0x391, 0x3A9)]),
    ("cyrillic", [(0x430, 0x44F), (0x410, 0x42F)]),
    ("latin-accents", [(0xE0, 0xFF), (0x100, 0x17F)]),
    ("cjk", [(0x4E00, 0x4FFF)]),
    ("kana", [(0x3041, 0x3096), (0x30A1, 0x30FA)]),
    ("hangul", [(0xAC00, 0xAFFF)]),
    ("arabic", [(0x627, 0x64A)]),
    ("devanagari", [(0x915, 0x939), (0x93E, 0x94C)]),
    ("emoji", [(0x1F600, 0x1F64F), (0x1F300, 0x1F3FF)]),
]
_PUNCT = list(".,;:!?-()[]\"'/&%$#@*+=<>") + ["...", "--", "\u2014", "\u201c", "\u201d"]
_SPACES = [" "] * 12 + ["  ", "\n", "\n\n", "\t", " \n", "\u00a0", "\u3000", "   "]
_CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'T"]


def _word(r: random.Random) -> str:
    w = "".join(r.choice(_SYLLABLE_ON) + r.choice(_SYLLABLE_NU) + r.choice(_SYLLABLE_CO)
                for _ in range(r.choice((1, 1, 2, 2, 3))))
    case = r.random()
    return w.upper() if case < 0.05 else w.title() if case < 0.25 else w


def _foreign(r: random.Random) -> str:
    _, ranges = r.choice(_SCRIPTS)
    return "".join(chr(r.randint(*r.choice(ranges))) for _ in range(r.randint(1, 6)))


def line(r: random.Random, n_tokens: int) -> str:
    """One line of generated text: mostly pseudo-English words, with contractions, numbers,
    punctuation, other scripts, emoji and assorted whitespace."""
    out = []
    for _ in range(n_tokens):
        x = r.random()
        if x < 0.62:
            w = _word(r)
            if r.random() < 0.08:
                w += r.choice(_CONTRACTIONS)
        elif x < 0.72:
            w = str(r.choice((r.randint(0, 99), r.randint(0, 10**6), r.random() * 100)))
        elif x < 0.84:
            w = r.choice(_PUNCT)
        else:
            w = _foreign(r)
        out.append(w)
        out.append(r.choice(_SPACES) if r.random() < 0.85 else "")
    return "".join(out)


def corpus(seed: int = 0, n_lines: int = 2000) -> list[str]:
    r = random.Random(seed)
    return [line(r, r.randint(3, 40)) for _ in range(n_lines)]


@functools.lru_cache(maxsize=None)
def _trained_merges(kind: str, seed: int, merges: int) -> tuple[tuple[str, str], ...]:
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    if kind == "openai-gpt":
        tok = Tokenizer(BPE(unk_token="<unk>", end_of_word_suffix="</w>"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = BpeTrainer(vocab_size=10**6, special_tokens=["<unk>"], min_frequency=2,
                             end_of_word_suffix="</w>", show_progress=False)
    else:
        tok = Tokenizer(BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = BpeTrainer(vocab_size=10**6, min_frequency=2, show_progress=False,
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(seed), trainer)
    model = json.loads(tok.to_str())["model"]
    got = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return tuple(got[:merges])


def layout(kind: str, seed: int = 0, merges: int = 800, extra: int = GPTJ_EXTRA
           ) -> tuple[dict[str, int], list[tuple[str, str]], list[dict]]:
    """(vocab, merges, added tokens as tokenizer.json entries) of a test vocabulary."""
    from reference.tokenizers import bytes_to_unicode

    ms = _trained_merges("openai-gpt" if kind == "openai-gpt" else "gpt2", seed, merges)
    if kind == "openai-gpt":
        chars = sorted({c for c in "".join(corpus(seed)).lower()} - {" "})
        symbols = sorted({s for m in ms for s in m if len(s.replace("</w>", "")) == 1})
        base = list(dict.fromkeys([*chars, *(c + "</w>" for c in chars), *symbols]))
    else:
        base = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(base)}
    for a, b in ms:
        vocab.setdefault(a + b, len(vocab))
    special = "<unk>" if kind == "openai-gpt" else EOT
    vocab[special] = len(vocab)
    added = [{"id": vocab[special], "content": special, "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False, "special": True}]
    if kind == "gptj":
        added += [{"id": len(vocab) + k, "content": f"<|extratoken_{k + 1}|>",
                   "single_word": False, "lstrip": False, "rstrip": False, "normalized": True,
                   "special": False} for k in range(extra)]
    return vocab, ms, added


def build(kind: str, vocab, merges, added):
    """The `tokenizers` Tokenizer that transformers would save as tokenizer.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    if kind == "openai-gpt":
        tok = Tokenizer(BPE(vocab=dict(vocab), merges=list(merges), unk_token="<unk>",
                            end_of_word_suffix="</w>", fuse_unk=False))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.BPEDecoder(suffix="</w>")
    else:
        tok = Tokenizer(BPE(vocab=dict(vocab), merges=list(merges), fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    for a in added:
        t = AddedToken(a["content"], single_word=a["single_word"], lstrip=a["lstrip"],
                       rstrip=a["rstrip"], normalized=a["normalized"], special=a["special"])
        (tok.add_special_tokens if a["special"] else tok.add_tokens)([t])
    return tok


def write_tokenizer(kind: str, out_dir: str | Path, seed: int = 0, merges: int = 800,
                    extra: int = GPTJ_EXTRA, files: str = "all") -> Path:
    """Write a test vocabulary of `kind` into `out_dir` (created); returns the folder."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, ms, added = layout(kind, seed, merges, extra)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in ms),
                                    encoding="utf-8")
    if kind == "gptj":
        extra_ids = {a["content"]: a["id"] for a in added if not a["special"]}
        (out / "added_tokens.json").write_text(json.dumps(extra_ids), encoding="utf-8")
    if files == "all":
        build(kind, vocab, ms, added).save(str(out / "tokenizer.json"))
    elif files != "slow":
        raise ValueError(f"files must be 'all' or 'slow', got {files!r}")
    return out

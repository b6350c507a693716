"""Tokenizer parity: the reference tokenizer (`reference.tokenizers`, plain Python)
against the `tokenizers` library on the same files, text by text, token by token.

    check_tokenizer(ckpt_dir, texts)  -> {"verdict", "detail", "figures"}
    gate_check(ckpt_dir, prompts_texts=None)   the gate's row: skip without tokenizer files

A difference is reported as the first differing token of the first differing text, with the
span of the text it covers, e.g.

    text 3 token 5: reference 'Ġworld' (id 995) vs tokenizers 'Ġwor' (id 4776) at chars 5..11
    ' world' (7 vs 8 tokens)

The `tokenizers` side ("the subject") is, by default, what the gate tokenizes prompts with
(`load_tokenizer`); `build_tokenizer` here builds it the way transformers does from
either file layout (tokenizer.json; or vocab.json + merges.txt with the family's defaults).

Also here, because it needs `tokenizers`: `probe_unicode_pins` reads the Unicode data inside
`tokenizers` (its regex engine's letter/number classes, its BERT normalizer's category tables,
its NFD and lowercase) code point by code point, and `render_unicode_pins` writes the pins that
`reference/tokenizer_unicode.py` holds (`parity tokenizer --write-unicode-pins`).
"""
from __future__ import annotations

import unicodedata
from pathlib import Path

from reference import tokenizers as rt

from parity.engine.verdicts import Result
from parity.errors import ParityError, TokenizerMissing

NAME = "tokenizer"  # the gate's row

UNICODE_PINS_FILE = Path(rt.__file__).with_name("tokenizer_unicode.py")


# ----------------------------------------------------------------------------- the subject
def build_tokenizer(ckpt_dir: str | Path):
    """A `tokenizers.Tokenizer` for the checkpoint's tokenizer files, as transformers builds it:
    tokenizer.json as is; otherwise vocab.json + merges.txt read with the same layout rules as
    the reference (`reference.tokenizers.read_layout`: GPT-2's byte-level pipeline with
    <|endoftext|> as its special token, or OpenAI GPT's BERT-normalized </w> BPE with <unk>),
    plus added_tokens.json / tokenizer_config.json's added tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(ckpt_dir / "tokenizer.json"))
    spec = rt.read_layout(ckpt_dir)
    merges = [tuple(m) for m in spec.merges]
    if spec.kind == "byte-level":
        tok = Tokenizer(BPE(vocab=dict(spec.vocab), merges=merges, fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=spec.add_prefix_space)
        tok.decoder = decoders.ByteLevel()
    else:
        tok = Tokenizer(BPE(vocab=dict(spec.vocab), merges=merges, unk_token=spec.unk_token,
                            end_of_word_suffix=spec.end_of_word_suffix, fuse_unk=False))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.BPEDecoder(suffix=spec.end_of_word_suffix)
    for a in sorted(spec.added, key=lambda a: a.id):
        t = AddedToken(a.content, single_word=a.single_word, lstrip=a.lstrip, rstrip=a.rstrip,
                       normalized=a.normalized, special=a.special)
        (tok.add_special_tokens if a.special else tok.add_tokens)([t])
    return tok


def load_tokenizer(ckpt_dir: Path):
    """The checkpoint's tokenizer as transformers builds it: tokenizer.json as is, or
    vocab.json + merges.txt (GPT-2's byte-level BPE with <|endoftext|>, or OpenAI GPT's
    lower-cased </w> BPE) plus added_tokens.json (GPT-J's <|extratoken_N|>)."""
    ckpt_dir = Path(ckpt_dir)
    has_files = (ckpt_dir / "tokenizer.json").is_file() or (
        (ckpt_dir / "vocab.json").is_file() and (ckpt_dir / "merges.txt").is_file())
    if not has_files:
        raise TokenizerMissing(f"{ckpt_dir}: no tokenizer files (tokenizer.json, or vocab.json "
                               "+ merges.txt) for --text")
    try:
        return build_tokenizer(ckpt_dir)
    except ParityError:
        raise
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception
        raise ParityError(f"{ckpt_dir}: tokenizer files unreadable ({e})") from None


def gate_subject(ckpt_dir: str | Path):
    """The tokenizer the gate turns text prompts into ids with."""
    return load_tokenizer(Path(ckpt_dir))


# ----------------------------------------------------------------------------- comparison
def _clip(s: str, n: int = 40) -> str:
    return repr(s if len(s) <= n else s[:n] + "...")


def first_difference(text: str, ref_tokens: list, enc) -> dict | None:
    """The first token where the reference and a `tokenizers` Encoding disagree (id, or one
    side ending early), with the span of `text` it covers; None when the ids are equal."""
    ids = list(enc.ids)
    if [t.id for t in ref_tokens] == ids:
        return None
    k = next((i for i, (a, b) in enumerate(zip(ref_tokens, ids)) if a.id != b),
             min(len(ref_tokens), len(ids)))
    ref = ref_tokens[k] if k < len(ref_tokens) else None
    sub = (enc.tokens[k], ids[k], enc.offsets[k]) if k < len(ids) else None
    if ref is not None:
        start, end = ref.start, ref.end
    else:  # the reference ended early: the subject's offsets are the only span there is
        start, end = sub[2]
    return {"index": k, "start": start, "end": end, "span": text[start:end],
            "reference": None if ref is None else (ref.token, ref.id),
            "tokenizers": None if sub is None else (sub[0], sub[1]),
            "reference_len": len(ref_tokens), "tokenizers_len": len(ids)}


def describe(text_index: int, d: dict) -> str:
    side = lambda v: "nothing (ended)" if v is None else f"{_clip(v[0])} (id {v[1]})"  # noqa: E731
    return (f"text {text_index} token {d['index']}: reference {side(d['reference'])} vs "
            f"tokenizers {side(d['tokenizers'])} at chars {d['start']}..{d['end']} "
            f"{_clip(d['span'])} ({d['reference_len']} vs {d['tokenizers_len']} tokens)")


def compare_texts(reference, subject, texts, decode: bool = True) -> dict:
    """Encode every text with both; also decode the subject's ids with both (special tokens
    skipped and kept). Returns counts and the first difference of each kind."""
    texts = list(texts)
    out = {"texts": len(texts), "tokens": 0, "encode_differences": 0,
           "decode_differences": 0, "first": None, "first_decode": None}
    for i, text in enumerate(texts):
        ref = reference.encode_tokens(text)
        enc = subject.encode(text)
        out["tokens"] += len(enc.ids)
        d = first_difference(text, ref, enc)
        if d is not None:
            out["encode_differences"] += 1
            if out["first"] is None:
                out["first"] = (i, d)
        if decode:
            for skip in (True, False):
                a = reference.decode(enc.ids, skip_special_tokens=skip)
                b = subject.decode(enc.ids, skip_special_tokens=skip)
                if a != b:
                    out["decode_differences"] += 1
                    if out["first_decode"] is None:
                        out["first_decode"] = (i, skip, a, b)
                    break
    return out


def check_tokenizer(ckpt_dir: str | Path, texts, subject=None, reference=None) -> Result:
    """Reference vs `tokenizers` on `texts`: verdict pass (no difference) / fail (the first
    differing token and its span in `detail`) / skip (no tokenizer files, or a pipeline the
    reference does not cover). `subject` defaults to the gate's tokenizer (`gate_subject`),
    `reference` to `reference.tokenizers.load(ckpt_dir)`."""
    ckpt_dir = Path(ckpt_dir)
    if not rt.has_tokenizer_files(ckpt_dir):
        return Result(name=NAME, verdict="skip", detail="no tokenizer files (tokenizer.json, or "
                      "vocab.json + merges.txt)")
    try:
        reference = reference or rt.load(ckpt_dir)
    except rt.UnsupportedTokenizer as e:
        return Result(name=NAME, verdict="skip",
                      detail=f"tokenizer not covered by the reference: {e}")
    except (OSError, ValueError) as e:
        raise ParityError(f"{ckpt_dir}: tokenizer files unreadable ({e})") from None
    subject = subject or gate_subject(ckpt_dir)
    r = compare_texts(reference, subject, texts)
    figures = {"tokenizer_kind": reference.kind, "texts": r["texts"], "tokens": r["tokens"],
               "encode_differences": r["encode_differences"],
               "decode_differences": r["decode_differences"],
               "added_tokens": len(reference.added)}
    problems = []
    if r["first"] is not None:
        i, d = r["first"]
        figures["first_difference"] = {"text": i, **d}
        problems.append(f"{r['encode_differences']}/{r['texts']} texts encode differently; "
                        f"first: {describe(i, d)}")
    if r["first_decode"] is not None:
        i, skip, a, b = r["first_decode"]
        problems.append(f"{r['decode_differences']}/{r['texts']} decodes differ; first: text {i}"
                        f" (skip_special_tokens={skip}): reference {_clip(a)} vs tokenizers "
                        f"{_clip(b)}")
    note = rt.unicode_pins_note()
    if note:
        figures["unicode_pins"] = note
    if problems:
        return Result(name=NAME, verdict="fail", figures=figures,
                      detail="; ".join(problems + [note] * bool(note)))
    return Result(name=NAME, verdict="pass", figures=figures,
                  detail=f"{reference.kind} tokenizer: {r['texts']} texts, {r['tokens']} tokens, "
                         f"reference and tokenizers agree (encode and decode)"
                         + (f"; {note}" if note else ""))


# A few dozen varied lines: the gate runs them on every checkpoint with tokenizer files. Each
# exercises one rule of the pipelines (named in the comment); none depends on a vocabulary.
BUILTIN_TEXTS = (
    "Hello world",  # the plainest case
    " Hello world",  # a leading space joins the word (byte-level)
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure you're right, they've said we'll go and he'd've known it's John's.",  # contractions
    "I'M SURE YOU'RE RIGHT, IT'S JOHN'S",  # upper-case 'S is no contraction in GPT-2's regex
    "don''t 'tis rock'n'roll ' s",  # quotes that are not contractions
    "O'THE JOHN'STONE D'Shaw L'Dear WE'LLAMA I'Mmm 'Twas",  # capitals after ': no contraction
    "Numbers: 0 1 12 123 1234567890 3.14159 -42 1,000,000 2nd 10x",
    "x  y   z    end",  # runs of spaces: the last one joins the next word
    "tabs\tand\t\tnewlines\n\nand\r\ncarriage returns\n",
    "trailing spaces   ",
    "   leading spaces",
    "\n\n\n",
    "non-breaking\u00a0space, ideographic\u3000space, thin\u2009space",
    "line\u2028separator and paragraph\u2029separator",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00c5ngstr\u00f6m fa\u00e7ade",  # precomposed accents
    "Cafe\u0301 nai\u0308ve",  # combining marks
    "Stra\u00dfe \u0130stanbul \u03a3\u039f\u03a6\u039f\u03a3 \u0130I",  # special lower-casing
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440!",  # Cyrillic
    "\u4f60\u597d\uff0c\u4e16\u754c\u3002\u6f22\u5b57 and \u304b\u306a \u30ab\u30ca",  # CJK
    "\uc548\ub155\ud558\uc138\uc694",  # Hangul
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645",  # Arabic
    "\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e",  # Devanagari
    "emoji \U0001f600\U0001f44d\U0001f3fd \U0001f468\u200d\U0001f469\u200d\U0001f467 \u2764\ufe0f",
    "math \u2211 \u221a2 \u2248 1.414 \u00b1 \u221e, \u00bd \u2153 \u2167 \u00b2",
    "punctuation!!! ?!? ... \u2014 \u2013 \u201cquotes\u201d \u00abguillemets\u00bb (x) [y] {z}",
    "code: def f(x): return x**2 # comment; a[i] += 1 && b || c",
    "url https://example.com/path?q=1&r=2#frag and mail a.b@c.de",
    "<|endoftext|>",
    "before<|endoftext|>after",
    "two <|endoftext|> <|endoftext|> markers",
    "<|endoftext",  # an unfinished special token is plain text
    "<|extratoken_1|> and <|extratoken_143|>",  # GPT-J's added tokens (plain text elsewhere)
    "<unk> <UNK>",  # OpenAI GPT's unknown token
    "control\x00chars\x07here\x1b[0m\ufffd",
    "zero\u200bwidth\u200cjoiners\u200d and \ufeffBOM",
    "private use \ue000\uf8ff",
    "a",
    "",
)


def gate_check(ckpt_dir: str | Path, prompts_texts=None, subject=None) -> Result:
    """The gate's tokenizer row: skip when the checkpoint has no tokenizer files; otherwise the
    reference against the gate's tokenizer on the text prompts (if any) and `BUILTIN_TEXTS`,
    failing on any difference with the first differing token and its span, and on tokenizer
    files that cannot be read."""
    texts = [t for t in (prompts_texts or ()) if isinstance(t, str)] + list(BUILTIN_TEXTS)
    try:
        r = check_tokenizer(ckpt_dir, texts, subject=subject)
    except ParityError as e:  # unreadable tokenizer files: a failing row, as the structure
        return Result(name=NAME, verdict="fail", detail=str(e))  # check's vocabulary does
    r.figures["prompts"] = len(texts) - len(BUILTIN_TEXTS)
    return r


# ----------------------------------------------------------------------------- Unicode pins
def _ranges(cps) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for c in sorted(cps):
        if out and out[-1][1] == c - 1:
            out[-1][1] = c
        else:
            out.append([c, c])
    return [tuple(r) for r in out]


def _code_points():
    return (c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)


def probe_unicode_pins(code_points=None) -> dict:
    """Read, code point by code point, how `tokenizers` classifies characters where Python's
    unicodedata (the reference's database) says otherwise. Each probe isolates one table:
      regex       the GPT-2 pattern's classes (\\p{L}, \\p{N}, other) from how ByteLevel splits
                  'a?a', '1?1' and '!?!' (one piece = same class as the neighbours);
      control     BertNormalizer(clean_text) removing a character;
      mark        BertNormalizer(strip_accents) removing a character without a decomposition;
      punctuation BertPreTokenizer isolating a character;
      nfd, lower  NFD and BertNormalizer(lowercase) of one character.
    `code_points` limits the probe (default: all of them, about 15 s)."""
    from tokenizers import normalizers, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    clean = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=False,
                                       strip_accents=False, lowercase=False)
    strip = normalizers.BertNormalizer(clean_text=False, handle_chinese_chars=False,
                                       strip_accents=True, lowercase=False)
    lower = normalizers.BertNormalizer(clean_text=False, handle_chinese_chars=False,
                                       strip_accents=False, lowercase=True)
    nfd = normalizers.NFD()
    bert_pre = pre_tokenizers.BertPreTokenizer()
    one = lambda s: len(byte_level.pre_tokenize_str(s)) == 1  # noqa: E731
    regex, control, mark, punct, nfd_pins, lower_pins = {}, {}, {}, {}, {}, {}
    for cp in (_code_points() if code_points is None else code_points):
        c = chr(cp)
        got = ("L" if one("a" + c + "a") else "N" if one("1" + c + "1")
               else "O" if one("!" + c + "!") else "S")
        if got != rt.regex_class_unpinned(c):
            regex[cp] = got
        removed = clean.normalize_str(c) == "" and cp not in (0, 0xFFFD)
        if removed != rt.bert_is_control_unpinned(c):
            control[cp] = removed
        d = nfd.normalize_str(c)
        if d != unicodedata.normalize("NFD", c):
            nfd_pins[cp] = d
        if d == c:  # no decomposition: strip_accents removes c exactly when it is a mark
            stripped = strip.normalize_str(c) == ""
            if stripped != rt.is_nonspacing_mark_unpinned(c):
                mark[cp] = stripped
        low = lower.normalize_str(c)
        if low != c.lower():
            lower_pins[cp] = low
        parts = [p for p, _ in bert_pre.pre_tokenize_str("a" + c + "a")]
        if parts != ["a", "a"]:  # whitespace is Unicode White_Space, tested on its own
            is_p = parts == ["a", c, "a"]
            if is_p != rt.bert_is_punctuation_unpinned(c):
                punct[cp] = is_p
    import tokenizers

    return {"tokenizers_version": tokenizers.__version__,
            "unidata_version": unicodedata.unidata_version,
            "regex": regex, "control": control, "mark": mark, "punctuation": punct,
            "nfd": nfd_pins, "lower": lower_pins}


def _grouped(table: dict) -> list[tuple[int, int, object]]:
    """{cp: value} as runs (lo, hi, value) of consecutive code points with equal values."""
    out: list[list] = []
    for cp in sorted(table):
        v = table[cp]
        if out and out[-1][1] == cp - 1 and out[-1][2] == v:
            out[-1][1] = cp
        else:
            out.append([cp, cp, v])
    return [tuple(r) for r in out]


def render_unicode_pins(p: dict) -> str:
    def runs(name, table, doc):
        rows = "".join(f"    (0x{lo:04X}, 0x{hi:04X}, {v!r}),\n" for lo, hi, v in _grouped(table))
        return f"# {doc}\n{name} = (\n{rows})\n\n"

    def mapping(name, table, doc):
        rows = "".join(f"    0x{cp:04X}: {v!r},\n" for cp, v in sorted(table.items()))
        return f"# {doc}\n{name} = {{\n{rows}}}\n\n"

    return (
        '"""Unicode data pins of the reference tokenizers: where the Unicode tables inside the\n'
        "`tokenizers` library differ from Python's unicodedata. GENERATED by\n"
        "`parity tokenizer --write-unicode-pins`; do not edit by hand.\n\n"
        "The reference implements the algorithms (GPT-2's pre-split pattern, BERT's basic\n"
        "tokenization) from their definitions; what they leave open is the Unicode version of\n"
        "each property. `tokenizers` mixes several: its regex engine (Oniguruma) and Rust's\n"
        "lowercase follow a newer Unicode than Python's database (letters and numbers of scripts\n"
        "encoded since), and the `unicode_categories` crate behind BertNormalizer and\n"
        "BertPreTokenizer is frozen at an older one (marks, punctuation and format characters\n"
        "encoded since are not marks, punctuation or controls to it). Each table below lists\n"
        "the code points where Python's unicodedata gives another answer, as read from\n"
        "`tokenizers` by `parity.checkpoints.tokenizer_check.probe_unicode_pins`; tests check every code\n"
        "point against the library, so a new `tokenizers` release that moves its Unicode data\n"
        "fails loudly instead of drifting.\n"
        '"""\n'
        f"TOKENIZERS_VERSION = {p['tokenizers_version']!r}  # the release probed\n"
        f"UNIDATA_VERSION = {p['unidata_version']!r}  # Python's Unicode database it was "
        "compared with\n\n"
        + runs("REGEX_CLASS", p["regex"], "(lo, hi, class): GPT-2 pattern class "
               "L (\\p{L}), N (\\p{N}), O (other), S (\\s)")
        + runs("BERT_CONTROL", p["control"], "(lo, hi, is_control): BertNormalizer's clean_text")
        + runs("BERT_MARK", p["mark"], "(lo, hi, is_Mn): strip_accents' nonspacing marks")
        + runs("BERT_PUNCTUATION", p["punctuation"], "(lo, hi, is_punctuation): "
               "BertPreTokenizer")
        + mapping("NFD", p["nfd"], "code point -> its NFD in tokenizers")
        + mapping("LOWER", p["lower"], "code point -> its lowercase in tokenizers")
    ).rstrip() + "\n"


def write_unicode_pins(path: str | Path = UNICODE_PINS_FILE) -> Path:
    path = Path(path)
    path.write_text(render_unicode_pins(probe_unicode_pins()), encoding="utf-8")
    return path


def cmd_tokenizer(a) -> int:
    """`parity tokenizer CKPT [--texts F]` / `parity tokenizer --write-unicode-pins`."""
    if a.write_unicode_pins:
        print(f"wrote {write_unicode_pins()}")
        return 0
    if not a.checkpoint:
        raise ParityError("parity tokenizer: give a checkpoint folder (or --write-unicode-pins)")
    texts = (Path(a.texts).read_text(encoding="utf-8").splitlines() if a.texts
             else BUILTIN_TEXTS)
    r = check_tokenizer(a.checkpoint, texts)
    print(f"{r.verdict}: {r.detail}")
    return {"pass": 0, "skip": 0, "fail": 1}[r.verdict]

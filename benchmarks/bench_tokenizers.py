"""Encode speed of the plain-Python reference tokenizer against `tokenizers` (issue 8).

    python benchmarks/bench_tokenizers.py [--lines 2500] [--merges 4000] [--repeat 3]

Per tokenizer kind (GPT-2 byte-level, GPT-J with its 143 added tokens, OpenAI GPT), a test
vocabulary is trained on generated text (tests/tokenizer_fixtures.py, seed 0) and both
tokenizers encode a different generated text (seed 1, a few hundred KB), line by line:
  reference (cold)   a fresh reference tokenizer: every distinct word goes through BPE once
  reference (warm)   the same object again: words come from its BPE cache
  tokenizers         Tokenizer.encode per line, one thread
  tokenizers batch   Tokenizer.encode_batch over all lines (its thread pool)
Best of --repeat runs; tokens/s counts the ids produced. The two sides' ids are checked equal.
The reference is for truth, not speed.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # before tests.tokenizer_fixtures

from reference import tokenizers as rt  # noqa: E402
from tests.tokenizer_fixtures import corpus, write_tokenizer  # noqa: E402


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench(kind: str, lines: list[str], merges: int, repeat: int, tmp: Path) -> list[dict]:
    import tokenizers

    d = write_tokenizer(kind, tmp / kind, seed=0, merges=merges)
    sub = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
    ref_ids = [rt.load(d).encode(x) for x in lines]
    sub_ids = [e.ids for e in sub.encode_batch(lines)]
    if ref_ids != sub_ids:
        raise SystemExit(f"{kind}: reference and tokenizers disagree on the benchmark text")
    n_tok = sum(map(len, sub_ids))
    n_bytes = sum(len(x.encode("utf-8")) for x in lines)
    warm = rt.load(d)
    for x in lines:
        warm.encode(x)
    rows = {
        "reference (cold)": best(lambda: [t.encode(x) for t in [rt.load(d)] for x in lines],
                                 repeat),
        "reference (warm)": best(lambda: [warm.encode(x) for x in lines], repeat),
        "tokenizers": best(lambda: [sub.encode(x) for x in lines], repeat),
        "tokenizers batch": best(lambda: sub.encode_batch(lines), repeat),
    }
    load = best(lambda: rt.load(d), repeat)
    rows["reference (cold)"] -= load  # loading the files is not encoding
    vocab = sub.get_vocab_size(with_added_tokens=True)
    return [{"kind": kind, "vocab": vocab, "impl": k, "seconds": s, "tokens": n_tok,
             "bytes": n_bytes, "tok_per_s": n_tok / s, "mb_per_s": n_bytes / s / 1e6}
            for k, s in rows.items()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lines", type=int, default=2500)
    ap.add_argument("--merges", type=int, default=4000)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args(argv)
    lines = corpus(seed=1, n_lines=a.lines)
    print(f"text: {a.lines} lines, {sum(len(x.encode()) for x in lines) / 1e3:.0f} KB; "
          f"{os.cpu_count()} CPUs")
    print("| kind | vocab | implementation | tokens/s | MB/s | x slower than tokenizers |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("gpt2", "gptj", "openai-gpt"):
            rows = bench(kind, lines, a.merges, a.repeat, Path(tmp))
            base = next(r for r in rows if r["impl"] == "tokenizers")["tok_per_s"]
            for r in rows:
                print(f"| {r['kind']} | {r['vocab']} | {r['impl']} | {r['tok_per_s']:,.0f} | "
                      f"{r['mb_per_s']:.2f} | {base / r['tok_per_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cost and numerics of compiled subjects (`--compile inductor`), written to benchmarks/README.md
by hand from this script's output.

    python benchmarks/bench_compile.py [--families gpt2 gptj] [--repeat 20] [--gate]

Per family (the tiny embedded checkpoint, 4 layers, 64 wide; the default 2 x 16 token batch):
- compile time: the first call of a new compiled subject, with a cold Inductor cache (a fresh
  TORCHINDUCTOR_CACHE_DIR) and again warm (a second subject in the same process: dynamo traces
  again, Inductor's FX graph cache hits);
- forward time: median of --repeat calls, compiled vs eager (native half) vs the CPU emulation;
- capture overhead: the compiled fast path with every site a graph output ("all") against the
  default (block outputs and logits only), in time and in what it does to the logits;
- accuracy: logit rel_l2 to float64 per dtype, compiled, compiled with emulate_precision_casts,
  eager native, eager emulated (fast path), transformers eager/sdpa and compiled sdpa;
- --gate: wall time of `parity gate --compile inductor --dtype bfloat16` (fast and hf sdpa).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="bench-inductor-"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import reference  # noqa: E402
from parity.checkpoints.checkpoint import load_checkpoint  # noqa: E402
from parity.checkpoints.inputs import default_batch  # noqa: E402
from parity.checkpoints.recipes import make_checkpoint  # noqa: E402
from parity.engine import metrics as M  # noqa: E402
from parity.engine.compare import token_rows  # noqa: E402
from parity.subjects import hf_adapter  # noqa: E402
from parity.subjects.fast import FastModel  # noqa: E402

DTYPES = ("bfloat16", "float16")


def timed(fn, repeat):
    out = fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return out, statistics.median(ts)


def first(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", nargs="+", default=["gpt2", "gptj"])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--gate", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-compile-"))
    print(f"torch {torch.__version__}, {os.cpu_count()} cpus, 1 thread, "
          f"cache {os.environ['TORCHINDUCTOR_CACHE_DIR']}")
    for fam in a.families:
        ckpt = load_checkpoint(make_checkpoint(fam, tmp / fam))
        inp = default_batch(ckpt.config, 16, seed=0)
        ref = reference.forward(ckpt.config, ckpt.weights(), inp.input_ids, inp.attention_mask,
                                inp.position_ids).sites["logits"]
        valid = M.valid_mask("logits", ref, token_rows(inp))

        def err(y):
            return M.rel_l2(y, ref, valid)

        print(f"\n== {fam} tiny ({ckpt.config.n_layer} layers, {ckpt.config.d_model} wide), "
              f"batch {list(inp.input_ids.shape)}")
        for dt in DTYPES:
            m = FastModel(ckpt, "hf", dtype=dt, compile="inductor")
            c, t_first = first(lambda: m.forward(inp))
            c, t_c = timed(lambda: m.forward(inp), a.repeat)
            m2 = FastModel(ckpt, "hf", dtype=dt, compile="inductor")
            _, t_warm = first(lambda: m2.forward(inp))
            mall = FastModel(ckpt, "hf", dtype=dt, compile="inductor")
            mall.compile_capture = "all"
            call, t_all_first = first(lambda: mall.forward(inp))
            call, t_all = timed(lambda: mall.forward(inp), a.repeat)
            epc = FastModel(ckpt, "hf", dtype=dt, compile="inductor+emulate_precision_casts")
            ce = epc.forward(inp)
            nat = FastModel(ckpt, "hf", dtype=dt, emulate=False)
            n, t_n = timed(lambda: nat.forward(inp), a.repeat)
            emu = FastModel(ckpt, "hf", dtype=dt)
            e, t_e = timed(lambda: emu.forward(inp), a.repeat)
            y, yall = c.sites["logits"], call.sites["logits"]
            print(f"fast hf {dt}: compile {t_first:.1f} s cold, {t_warm:.1f} s warm "
                  f"(capture all: {t_all_first:.1f} s); forward compiled {t_c * 1e3:.1f} ms, "
                  f"capture all {t_all * 1e3:.1f} ms ({len(call.sites)} sites vs "
                  f"{len(c.sites)}), eager native {t_n * 1e3:.1f} ms, emulated "
                  f"{t_e * 1e3:.1f} ms")
            print(f"  capture all vs outputs: logits bitwise equal {np.array_equal(y, yall)}, "
                  f"max abs {np.abs(y - yall).max():.3g}, rel_l2 {M.rel_l2(yall, y, valid):.3g}")
            print(f"  logit rel_l2 to float64: compiled {err(y):.3g}, capture all "
                  f"{err(yall):.3g}, emulate_precision_casts {err(ce.sites['logits']):.3g}, "
                  f"eager native {err(n.sites['logits']):.3g}, eager emulated "
                  f"{err(e.sites['logits']):.3g}; compiled vs eager native max abs "
                  f"{np.abs(y - n.sites['logits']).max():.3g}")
        if fam not in ("gpt2", "gptj"):
            continue
        for dt in DTYPES:
            row = []
            for impl in ("eager", "sdpa"):
                model, used = hf_adapter.load(ckpt, dt, "cpu", impl)
                tr, t_h = timed(lambda: hf_adapter.capture(model, ckpt.config, inp,
                                                           attn_implementation=used), a.repeat)
                row.append(f"{impl} {err(tr.sites['logits']):.3g} ({t_h * 1e3:.1f} ms)")
            ch = hf_adapter.CompiledHF(ckpt, dt, "cpu", "sdpa", "inductor")
            tc, t_hc_first = first(lambda: ch.capture(inp))
            tc, t_hc = timed(lambda: ch.capture(inp), a.repeat)
            chall = hf_adapter.CompiledHF(ckpt, dt, "cpu", "sdpa", "inductor", capture="all")
            tall, t_hall_first = first(lambda: chall.capture(inp))
            tall, t_hall = timed(lambda: chall.capture(inp), a.repeat)
            y, yall = tc.sites["logits"], tall.sites["logits"]
            none = hf_adapter.CompiledHF(ckpt, dt, "cpu", "sdpa", "inductor", capture="none")
            tnone, t_hnone = timed(lambda: none.capture(inp), a.repeat)
            print(f"  hf {dt} judged logits (uncaptured copy) vs capture none: bitwise equal "
                  f"{np.array_equal(y, tnone.sites['logits'])}, forward none "
                  f"{t_hnone * 1e3:.1f} ms; the captured copy's logits sit rel_l2 "
                  f"{tc.meta['compile_capture_logit_rel_l2']} from them")
            print(f"hf {dt}: logit rel_l2 to float64 eager-attn {row[0]}, sdpa {row[1]}, "
                  f"compiled sdpa {err(y):.3g} (compile {t_hc_first:.1f} s, forward "
                  f"{t_hc * 1e3:.1f} ms); capture all: compile {t_hall_first:.1f} s, forward "
                  f"{t_hall * 1e3:.1f} ms, logits bitwise equal {np.array_equal(y, yall)}, "
                  f"rel_l2 to outputs-only {M.rel_l2(yall, y, valid):.3g}")
        if a.gate:
            for args in (["--compile", "inductor", "--dtype", "bfloat16"],
                         ["--impl", "hf", "--variant", "sdpa", "--compile", "inductor",
                          "--dtype", "bfloat16"]):
                t0 = time.perf_counter()
                rc = subprocess.run([sys.executable, "-m", "parity", "gate", str(ckpt.path),
                                     "--device", "cpu", "--report", str(tmp / "gate"), *args],
                                    capture_output=True).returncode
                print(f"gate {' '.join(args)}: exit {rc}, {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

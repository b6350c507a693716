"""Fast-path benchmarks (issue 3): figures recorded in benchmarks/README.md, section "Fast path".

    python benchmarks/bench_fast.py [--repeats 5] [--native-repeats 2] [--ckpt DIR] [--json FILE]

1. fp16 forward of a 4-layer GPT-2-small-width model (768 wide, 12 heads, seq 128, batch 1):
   the CPU emulation of CUDA half precision against torch's native CPU fp16 kernels (goal: the
   emulation at least 10x faster), and fp32 for scale.
2. Capturing every site against capturing none (goal: at most 10% more time).
3. With a CUDA device: the emulation against the real kernels, per site, the share of elements
   within 1 ulp (lockstep: both fed the same stream), and CUDA timings.
Timings are the minimum over the repeats (other processes only ever add time); runs of the
compared configurations are interleaved so that background load hits both alike.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parity.checkpoints.checkpoint import load_checkpoint  # noqa: E402
from parity.subjects.fast import FastModel  # noqa: E402
from parity.checkpoints.inputs import Inputs  # noqa: E402
from parity.checkpoints.recipes import make_checkpoint  # noqa: E402

SEQ, LAYERS = 128, 4


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads){gpu}")


def timed(model: FastModel, inp: Inputs, sites) -> float:
    t0 = time.perf_counter()
    model.forward(inp, sites=sites)
    if model.num.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench(configs: dict, inp: Inputs, repeats: int) -> dict:
    """configs: name -> (model, sites, repeats or None). Interleaved; min seconds per name."""
    for model, sites, _ in configs.values():  # warm-up: weights converted and cached
        model.forward(inp, sites=sites)
    best = {name: float("inf") for name in configs}
    for r in range(repeats):
        for name, (model, sites, n) in configs.items():
            if n is None or r < n:
                best[name] = min(best[name], timed(model, inp, sites))
    return best


def emulation_vs_cuda(ckpt, inp) -> dict:
    """Lockstep, per site: share of elements within 1 fp16 ulp of the CUDA kernels' value."""
    from parity.engine.metrics import ulp_distance

    emu = FastModel(ckpt, "hf", "float16", "cpu")
    cu = FastModel(ckpt, "hf", "float16", "cuda")
    ce, cc = emu.prepare(inp), cu.prepare(inp)
    h = emu.embed(ce)
    cu.embed(cc)
    for i in range(ckpt.config.n_layer):
        cu.block(cc, i, h)
        h = emu.block(ce, i, h)
    emu.head(ce, h)
    cu.head(cc, h)
    out = {}
    for s, a in ce.trace.sites.items():
        b = cc.trace.sites[s]
        m = a > -1e30  # masked scores hold fill values
        d = ulp_distance(a[m], b[m], ce.trace.dtypes[s])
        out[s] = float(np.mean(d <= 1))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--native-repeats", type=int, default=2,
                    help="native CPU fp16 is slow; fewer repeats of it")
    ap.add_argument("--ckpt", default=None, help="reuse a checkpoint directory (made if absent)")
    ap.add_argument("--json", default=None, help="also write the figures as JSON")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    tmp = None
    ckdir = Path(a.ckpt) if a.ckpt else Path(tmp := tempfile.mkdtemp(prefix="bench_fast_"))
    if not (ckdir / "config.json").exists():
        make_checkpoint("gpt2", ckdir, preset="full-width", layers=LAYERS)
    ckpt = load_checkpoint(ckdir, check_values=False)
    cfg = ckpt.config
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(1, SEQ))
    inp = Inputs(ids)
    print(f"machine: {machine()}")
    print(f"model: GPT-2 {cfg.n_layer} layers, {cfg.d_model} wide, {cfg.n_head} heads, "
          f"vocab {cfg.vocab_size}; batch 1, seq {SEQ}")

    emu = FastModel(ckpt, "hf", "float16", "cpu")  # emulation (default on a CPU)
    nat = FastModel(ckpt, "hf", "float16", "cpu", emulate=False)
    f32 = FastModel(ckpt, "hf", "float32", "cpu")
    t = bench({
        "fp16 emulated": (emu, [], None),
        "fp16 native CPU": (nat, [], a.native_repeats),
        "fp32": (f32, [], None),
        "fp16 emulated, every site": (emu, None, None),
        "fp32, every site": (f32, None, None),
    }, inp, a.repeats)
    speedup = t["fp16 native CPU"] / t["fp16 emulated"]
    over_emu = t["fp16 emulated, every site"] / t["fp16 emulated"] - 1
    over_f32 = t["fp32, every site"] / t["fp32"] - 1
    print("\nforward time (min over repeats):")
    for name, s in t.items():
        print(f"  {name:28s} {s * 1000:9.1f} ms")
    print(f"\nemulated fp16 vs native CPU fp16: {speedup:.1f}x faster (goal >= 10x)")
    print(f"capture overhead: {over_emu * 100:+.1f}% (fp16 emulated), "
          f"{over_f32 * 100:+.1f}% (fp32) (goal <= 10%)")
    figures = {"machine": machine(), "ms": {k: v * 1000 for k, v in t.items()},
               "speedup_emulated_vs_native": speedup,
               "capture_overhead": {"fp16 emulated": over_emu, "fp32": over_f32}}

    if torch.cuda.is_available():
        cu = FastModel(ckpt, "hf", "float16", "cuda")
        cu32 = FastModel(ckpt, "hf", "float32", "cuda")
        tc = bench({"fp16 cuda": (cu, [], None), "fp32 cuda": (cu32, [], None),
                    "fp16 cuda, every site": (cu, None, None)}, inp, a.repeats)
        for name, s in tc.items():
            print(f"  {name:28s} {s * 1000:9.1f} ms")
        shares = emulation_vs_cuda(ckpt, inp)
        lo = min(shares, key=shares.get)
        print(f"\nemulation vs CUDA ({torch.cuda.get_device_name()}), lockstep, share within "
              f"1 ulp: min {shares[lo]:.5f} at {lo}, median {np.median(list(shares.values())):.5f}"
              " (goal >= 0.999)")
        for s, v in shares.items():
            print(f"  {s:32s} {v:.5f}")
        figures.update(cuda_ms={k: v * 1000 for k, v in tc.items()}, emulation_vs_cuda=shares)
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=1))
    if tmp:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

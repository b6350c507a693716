"""Peak RSS and wall time of `parity gate` on GPT-J-shaped checkpoints of real width, against
transformers' from_pretrained on the same files (issue 6).

    python benchmarks/bench_gate.py [--layers 2 4 28] [--dir /tmp/parity-bench] [--no-hf]

Checkpoints are made with `parity checkpoint make --family gptj --preset full-width --layers N`
(fp16, 4096 wide, 16 heads, rotary 64, vocab 50400; 28 layers is GPT-J-6B's shape, ~12 GB) and
reused if present. Each measurement runs in its own process; peak RSS is the child's
ru_maxrss. Goals: gate peak RSS <= 3 GB at every depth (4 layers within 10% of 2 layers), the
28-layer gate within 10 minutes on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HF_LOAD = """
import sys, torch, transformers
m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[2]),
                                                      local_files_only=True)
if sys.argv[3] == "forward":  # touch every weight, as any use of the model does
    with torch.no_grad():
        m(input_ids=torch.arange(32).reshape(2, 16))
print(sum(p.numel() for p in m.parameters()))
"""


def measure(cmd: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS GB of that child alone (wait4's rusage), exit code)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    if rc not in (0, 1):
        print(p.stderr.read()[-2000:], file=sys.stderr)
    return wall, usage.ru_maxrss / 1024**2, rc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4, 28])
    ap.add_argument("--dir", default="/tmp/parity-bench")
    ap.add_argument("--no-hf", action="store_true")
    a = ap.parse_args()
    root = Path(a.dir)
    parity = [sys.executable, "-m", "parity"]
    rows = []
    for n in sorted(a.layers):
        ck = root / f"gptj-{n}"
        if not (ck / "config.json").is_file():
            subprocess.run(parity + ["checkpoint", "make", "--family", "gptj", "--preset",
                                     "full-width", "--layers", str(n), "--out", str(ck)],
                           check=True)
        size = sum(f.stat().st_size for f in ck.iterdir()) / 1024**3
        wall, rss, rc = measure(parity + ["gate", str(ck), "--report", str(root / f"gate-{n}"),
                                          "--device", "cpu"])
        rows.append((f"parity gate (fast hf fp16, emulated)", n, size, wall, rss, rc))
        print(rows[-1], flush=True)
        if not a.no_hf:
            for dt in ("float16", "float32"):
                for what in ("load", "forward"):
                    label = f"transformers {dt} from_pretrained" + (
                        " + forward" if what == "forward" else " (mmap, untouched)")
                    if dt == "float32" and n > 4:
                        rows.append((label, n, size, None, None,
                                     "skipped: 6B params in fp32 are 24 GB, more than the machine"))
                        continue
                    wall, rss, rc = measure([sys.executable, "-c", HF_LOAD, str(ck), dt, what])
                    rows.append((label, n, size, wall, rss, rc))
                    print(rows[-1], flush=True)
    print()
    print(f"{'what':52s} {'layers':>6s} {'disk GB':>8s} {'wall s':>8s} {'peak RSS GB':>12s}  exit")
    for what, n, size, wall, rss, rc in rows:
        w = f"{wall:8.1f}" if wall is not None else "       -"
        r = f"{rss:12.2f}" if rss is not None else "           -"
        print(f"{what:52s} {n:6d} {size:8.2f} {w} {r}  {rc}")
    print(f"\nmachine: {os.cpu_count()} cores, python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()

"""Gate verdict stability (issue 11): does the gate's verdict depend on the batch it drew?

For each family's `tiny` and `stress` checkpoint (made here with `parity checkpoint make`), and
each dtype (fp16, bf16), the gate's subject check (parity.engine.lockstep.lockstep, the fast `hf`
preset, CPU emulation) runs on N seeds of
  old   parity.checkpoints.inputs.default_batch(cfg, 16, seed)      (the gate's batch before issue 11)
  new   parity.checkpoints.inputs.gate_batch(cfg, seed)             (the gate's batch: 4 varied rows)
and prints per (family, preset, variant, dtype, batch) the verdict of every seed, the number of
flips (seeds whose verdict differs from the majority) and the worst floor ratio range.

    python benchmarks/gate_stability.py [--seeds 10] [--families ...] [--presets tiny stress]
                                        [--dtypes float16 bfloat16] [--batches old new]
"""
from __future__ import annotations

import argparse
import collections
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import reference  # noqa: E402
from parity.checkpoints.checkpoint import open_checkpoint  # noqa: E402
from parity.engine.compare import overall  # noqa: E402
from parity.subjects.fast import FastModel  # noqa: E402
from parity.checkpoints.inputs import default_batch, gate_batch  # noqa: E402
from parity.engine.lockstep import lockstep  # noqa: E402
from parity.checkpoints.recipes import make_checkpoint  # noqa: E402

FAMILIES = reference.FAMILIES
SHORT = {"pass": "P", "warn": "W", "fail": "F", "overflow": "O", "unmeasured": "U"}


def batch(kind: str, ckpt, seed: int):
    if kind == "old":
        return default_batch(ckpt.config, min(16, ckpt.config.n_positions), seed=seed)
    return gate_batch(ckpt.config, seed=seed)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--families", nargs="+", default=list(FAMILIES))
    ap.add_argument("--presets", nargs="+", default=["tiny", "stress"])
    ap.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    ap.add_argument("--batches", nargs="+", default=["old", "new"])
    ap.add_argument("--variant", default="hf")
    ap.add_argument("--workdir", default=None, help="where checkpoints are made (temporary)")
    a = ap.parse_args(argv)
    root = Path(a.workdir or tempfile.mkdtemp(prefix="gate-stability-"))
    print(f"seeds 0..{a.seeds - 1}; verdicts P pass, W warn, F fail, O overflow; flips = seeds "
          "whose verdict differs from the majority")
    print(f"| family | preset | variant | dtype | batch | shape | verdicts | flips | floor ratio "
          f"min-max | s/run |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    total = collections.Counter()
    for preset in a.presets:
        for fam in a.families:
            d = root / f"{fam}-{preset}"
            if not (d / "config.json").is_file():
                make_checkpoint(fam, d, preset=preset)
            ckpt = open_checkpoint(d)
            for dtype in a.dtypes:
                for kind in a.batches:
                    verdicts, ratios, t0 = [], [], time.perf_counter()
                    for seed in range(a.seeds):
                        inputs = batch(kind, ckpt, seed)
                        model = FastModel(ckpt, a.variant, dtype=dtype, device="cpu",
                                          cache_weights=False)
                        df, _ = lockstep(ckpt, inputs, model, variant=a.variant)
                        verdicts.append(overall(df))
                        ratios.append(float(df["floor_ratio"].max()))
                    per = (time.perf_counter() - t0) / a.seeds
                    major = collections.Counter(verdicts).most_common(1)[0][0]
                    flips = sum(v != major for v in verdicts)
                    total[(kind, "flips")] += flips
                    total[(kind, "cells")] += 1
                    total[(kind, "unstable")] += flips > 0
                    shape = "x".join(map(str, inputs.input_ids.shape))
                    print(f"| {fam} | {preset} | {a.variant} | {dtype} | {kind} | {shape} | "
                          f"{''.join(SHORT.get(v, '?') for v in verdicts)} | {flips} | "
                          f"{min(ratios):.3g}-{max(ratios):.3g} | {per:.2f} |", flush=True)
    for kind in a.batches:
        print(f"{kind}: {total[(kind, 'flips')]} flips in {total[(kind, 'cells')]} cells x "
              f"{a.seeds} seeds; {total[(kind, 'unstable')]} cells not unanimous")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process: {peak:.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

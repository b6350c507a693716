"""False alarms of the generation check on healthy subjects over property-generated models.

    python benchmarks/generation_false_alarms.py [--cases 200] [--seed 0]

Draws exactly what tests/test_properties.py::test_healthy_presets_never_fail_the_generation_check
draws (tests/strategies.py: verdict-grade configs of every family with random weights, so
near-uniform logits whose arg-max hangs on rounding; token batches with and without left
padding; 1-8 new tokens; every fast preset in fp16 and bf16, and fp32) and counts the verdicts
of the generation check. Expected: 0 fails; warns are near-ties the dtype cannot resolve. Prints
each non-pass case's reason and a summary line per verdict (benchmarks/README.md "Generation").
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import reference  # noqa: E402
from parity.checkpoints.checkpoint import load_checkpoint  # noqa: E402
from parity.checkpoints.inputs import Inputs  # noqa: E402
from parity.engine.compare import Subject  # noqa: E402
from parity.engine.generation import generation_check  # noqa: E402
from parity.subjects.knobs import PRESETS  # noqa: E402
from tests.strategies import (VERDICT_MIN_TOKENS, families, seeds, verdict_batches,  # noqa: E402
                              verdict_configs, weights_for)

SUBJECTS = ([Subject(variant=p, dtype=d) for p in PRESETS if p != "fp32"
             for d in ("float16", "bfloat16")] + [Subject(variant="fp32", dtype="float32")])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="genfa-"))
    counts: collections.Counter = collections.Counter()
    by: dict = collections.defaultdict(collections.Counter)
    steps = {"tokens": 0, "diverged_prompts": 0, "prompts": 0}
    t0 = time.perf_counter()

    @settings(max_examples=a.cases, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def case(data):
        raw = data.draw(verdict_configs(family=data.draw(families(), label="family"),
                                        min_positions=VERDICT_MIN_TOKENS + 8), label="config")
        cfg = reference.parse_config(raw)
        weights = weights_for(cfg, data.draw(seeds(), label="seed"))
        n = data.draw(st.integers(1, 8), label="new tokens")
        batch = data.draw(verdict_batches(cfg, max_len=cfg.n_positions - n), label="batch")
        subject = data.draw(st.sampled_from(SUBJECTS), label="subject")
        out = root / f"m{sum(counts.values())}"
        out.mkdir()
        fam = reference.family(raw["model_type"])
        save_file({fam.hf_key(k): torch.from_numpy(np.asarray(v)).to(torch.float32)
                   for k, v in weights.items()}, str(out / "model.safetensors"))
        (out / "config.json").write_text(json.dumps(raw))
        g = generation_check(load_checkpoint(out), Inputs(*batch), subject, max_new_tokens=n)
        counts[g.verdict] += 1
        by[(cfg.family, subject.dtype)][g.verdict] += 1
        f = g.result.figures
        steps["tokens"] += f["tokens_compared"]
        steps["prompts"] += f["prompts"]
        steps["diverged_prompts"] += f["prompts_diverged"]
        if g.verdict != "pass":
            print(f"{g.verdict}: {cfg.family} {subject.label} vocab {cfg.vocab_size}: "
                  f"{g.result.detail[:300]}", flush=True)

    case()
    wall = time.perf_counter() - t0
    total = sum(counts.values())
    print(f"\n{total} cases in {wall:.0f} s: " + ", ".join(f"{v} {counts[v]}" for v in
                                                        ("pass", "warn", "fail")))
    print(f"tokens compared {steps['tokens']}, prompts {steps['prompts']}, prompts diverged "
          f"{steps['diverged_prompts']}")
    for (fam, dt), c in sorted(by.items()):
        print(f"  {fam:11s} {dt:9s} " + " ".join(f"{v}={c[v]}" for v in ("pass", "warn", "fail")))


if __name__ == "__main__":
    main()

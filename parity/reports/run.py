"""`parity report`: every family x preset x dtype on the embedded `tiny` and `stress` checkpoints.

The embedded checkpoints are made from seeded recipes in a temporary folder at every run (they take
milliseconds), so the report needs no files and is deterministic: the same command gives the same
CSV. Exit code: 1 when a subject on a `tiny` checkpoint (healthy magnitudes, where every healthy
path must sit at the floor) leaves its budget; 0 otherwise. Findings on the `stress` checkpoints
are the point of the report (knobs matter there) and do not fail it.
"""
from __future__ import annotations

import datetime
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

import reference

from parity import __version__
from parity.engine.attribution import ATTR_COLUMNS, knob_attribution
from parity.checkpoints.checkpoint import load_checkpoint
from parity.engine.compare import Subject, compare
from parity.errors import ParityError
from parity.checkpoints.inputs import default_batch
from parity.checkpoints.recipes import make_checkpoint

DEFAULT_VARIANTS = ("hf", "meg", "sdpa", "naive-half")
DEFAULT_DTYPES = ("float16", "bfloat16")
CHECKPOINTS = ("tiny", "stress")
SEQ_LEN = {"tiny": 16, "stress": 24}  # stress is longer than GPT-Neo's tiny window (8)
SEED = 0


def environment(device: str) -> dict:
    import torch

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpt_parity": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "device": device,
        "device_name": (torch.cuda.get_device_name(0) if device.startswith("cuda")
                        else platform.processor() or platform.machine()),
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    try:
        env["git_revision"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_revision"] = None
    return env


def run_report(families=None, variants=None, dtypes=None, device="cpu", checkpoints=CHECKPOINTS,
               attribution=True, progress=None, compile="off"):
    """-> (divergence DataFrame, attribution DataFrame, run dict). `compile="inductor"` adds,
    beside each eager subject, its compiled twin (variant column 'hf+compile=inductor')."""
    from parity.subjects.compiled import parse as parse_compile

    compile = parse_compile(compile)
    families = list(families or reference.FAMILIES)
    variants = list(variants or DEFAULT_VARIANTS)
    dtypes = list(dtypes or DEFAULT_DTYPES)
    for f in families:
        if f not in reference.FAMILIES:
            raise ParityError(f"unknown family {f!r} (choose from {', '.join(reference.FAMILIES)})")
    import torch

    # the embedded models are tiny: one thread avoids spin contention and keeps runs repeatable
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    frames, attrs = [], []
    subjects = [Subject(variant=v, dtype=d, device=device) for v in variants for d in dtypes]
    if compile != "off":
        subjects += [Subject(variant=v, dtype=d, device=device, compile=compile)
                     for v in variants for d in dtypes]
    with tempfile.TemporaryDirectory(prefix="parity-report-") as tmp:
        for family in families:
            for label in checkpoints:
                ckpt = load_checkpoint(make_checkpoint(family, Path(tmp) / f"{family}-{label}",
                                                       preset=label, seed=SEED))
                inputs = default_batch(ckpt.config, SEQ_LEN[label], seed=SEED)
                # the float64 reference once per checkpoint, shared by every comparison below
                ref = reference.forward(ckpt.config, ckpt.weights(), inputs.input_ids,
                                        inputs.attention_mask, inputs.position_ids)
                df = compare(ckpt, inputs, subjects, label=label, ref_trace=ref)
                frames.append(df)
                if progress:
                    progress(f"{family}/{label} compared")
                if not attribution:
                    continue
                for s in subjects:
                    attrs.append(knob_attribution(ckpt, inputs, s.variant, s.dtype,
                                                  device=device, label=label, ref_trace=ref,
                                                  compile=s.compile))
                # explain each verdict where it starts: the knob flips measured at the first
                # divergent site (local mode pins the layer that makes it)
                for (v, d), (site, mode) in first_sites(df).items():
                    if site != "logits":
                        attrs.append(knob_attribution(ckpt, inputs, v, d, device=device,
                                                      label=label, site=site, mode=mode,
                                                      ref_trace=ref))
                # subject-vs-subject questions of the family (registry `report_pairs`, e.g.
                # GPT-2 weights: where do Megatron and HF numerics part ways)
                for va, vb in reference.family(family).report_pairs:
                    for d in dtypes:
                        attrs.append(knob_attribution(ckpt, inputs, va, d, target=vb,
                                                      device=device, label=label,
                                                      ref_trace=ref))
                if progress:
                    progress(f"{family}/{label} attributed")
    div = pd.concat(frames, ignore_index=True)
    attr = (pd.concat([a for a in attrs if len(a)], ignore_index=True) if any(len(a) for a in attrs)
            else pd.DataFrame(columns=ATTR_COLUMNS))
    run = {
        "command": "parity " + " ".join(sys.argv[1:]) if sys.argv and "parity" in sys.argv[0]
        else "parity report",
        "families": families, "variants": variants, "dtypes": dtypes,
        **({"compile": compile} if compile != "off" else {}),
        "checkpoints": {c: {"recipe": f"parity checkpoint make --family F --preset {c} "
                            f"--seed {SEED}", "sequence_length": SEQ_LEN[c]} for c in checkpoints},
        "seed": SEED,
        "environment": environment(device),
        "wall_time_s": round(time.perf_counter() - t0, 1),
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    return div, attr, run


def first_sites(df: pd.DataFrame) -> dict[tuple[str, str], str]:
    """(variant, dtype) -> (first site not passing, mode): local mode first, else accumulated."""
    out = {}
    for mode in ("accumulated", "local"):  # local overwrites: it names the layer that makes it
        bad = df[(df["mode"] == mode) & ~df["verdict"].isin(("pass", "not_exposed"))]
        for (v, d), g in bad.groupby(["variant", "dtype"], sort=False):
            out[(v, d)] = (g.iloc[0]["site"], mode)
    return out


def exit_code(div: pd.DataFrame) -> int:
    """1 when a subject on a healthy (`tiny`) checkpoint fails or overflows, else 0: the same
    rule as the report's headline verdict (`report.decides_failure`); stress findings do not
    count."""
    from parity.reports.analysis import decides_failure

    return 1 if decides_failure(div) else 0

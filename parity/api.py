"""The Python API: `parity.compare(...)`, a checkpoint's comparison frame from a notebook."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing parity stays free of torch and pandas until the call
    import pandas as pd

MODES = ("accumulated", "local")


def compare(checkpoint, inputs=None, *, variants=("hf",), dtypes=("float16",),
            device: str = "cpu", emulate: bool | None = None, modes=MODES,
            policy: str | dict | None = None, label: str | None = None,
            compile: str = "off") -> "pd.DataFrame":
    """Compare fast-path subjects with the float64 reference on one checkpoint, per site.

        import parity
        df = parity.compare("path/to/ckpt", variants=["hf", "meg"], dtypes=["fp16", "bf16"])
        df[(df["mode"] == "local") & (df["verdict"] != "pass")]

    checkpoint  a Hugging Face-layout directory (config.json + weights) or an open Checkpoint.
    inputs      None: the built-in deterministic batch (16 tokens); token ids as a 2-D integer
                array or tensor (B, T), one row of ids, or a list of id lists (rows of
                different lengths are left-padded with a mask); a text or a list of texts
                (tokenized with the checkpoint's tokenizer files); or an Inputs.
    variants    presets and knob overrides of the fast path: "hf", "meg", "sdpa",
                "naive-half", "hf+attn_scores=baddbmm", ... (one name or a list).
    dtypes      "fp16"/"float16", "bf16"/"bfloat16", "fp32", ... (one name or a list).
    device      "cpu" or "cuda"; emulate: CPU emulation of CUDA's rounding (default: on a CPU).
    modes       "accumulated" (the subject runs on its own stream) and/or "local" (each layer
                fed the reference's input).
    policy      a budgets TOML path or a loaded policy (default: the shipped budgets.toml).
    label       the `checkpoint` column (default: the directory name).
    compile     "off", "inductor" or "inductor+emulate_precision_casts": the subjects run
                under torch.compile (their variant column reads "hf+compile=inductor").

    Returns the long-format DataFrame of divergence.csv: one row per subject x mode x site with
    the metrics (rel_l2, floor_ratio, top1, kl, ...), the budget and the verdict.
    Raises parity.errors.InputError (a ValueError) for input that is not one of the above,
    and ParityError for a checkpoint or policy that cannot be used."""
    from parity.checkpoints.checkpoint import Checkpoint, load_checkpoint
    from parity.checkpoints.inputs import as_inputs, default_batch, validate_inputs
    from parity.engine import budgets as B
    from parity.engine.compare import Subject, compare as compare_subjects
    from parity.subjects import normalize_dtype

    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    if inputs is None:
        inputs = default_batch(ckpt.config, min(16, ckpt.config.n_positions))
    else:
        inputs = as_inputs(inputs, ckpt.path)
    validate_inputs(inputs, ckpt.config, "inputs")
    if isinstance(variants, str):
        variants = [variants]
    if isinstance(dtypes, str):
        dtypes = [dtypes]
    from parity.subjects.compiled import check_emulate, parse

    compile = parse(compile)
    check_emulate(compile, emulate)
    subjects = [Subject(variant=v, dtype=normalize_dtype(d), device=device, emulate=emulate,
                        compile=compile) for v in variants for d in dtypes]
    if not isinstance(policy, dict):
        policy = B.load_policy(policy)
    return compare_subjects(ckpt, inputs, subjects, label=label or ckpt.path.name, modes=modes,
                            policy=policy)

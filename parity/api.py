"""The Python API: `parity.compare(...)`, a checkpoint's comparison frame from a notebook, and
`parity.generate_compare(...)`, greedy decoding against the float64 reference's."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing parity stays free of torch and pandas until the call
    import pandas as pd

    from parity.engine.generation import Generation

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
    from parity.checkpoints.inputs import default_batch
    from parity.engine.compare import Subject, compare as compare_subjects
    from parity.subjects import normalize_dtype

    ckpt, inputs, policy = _open(checkpoint, inputs, policy,
                                 lambda cfg: default_batch(cfg, min(16, cfg.n_positions)))
    if isinstance(variants, str):
        variants = [variants]
    if isinstance(dtypes, str):
        dtypes = [dtypes]
    from parity.subjects.compiled import check_emulate, parse

    compile = parse(compile)
    check_emulate(compile, emulate)
    subjects = [Subject(variant=v, dtype=normalize_dtype(d), device=device, emulate=emulate,
                        compile=compile) for v in variants for d in dtypes]
    return compare_subjects(ckpt, inputs, subjects, label=label or ckpt.path.name, modes=modes,
                            policy=policy)


def generate_compare(checkpoint, inputs=None, *, variant: str = "hf", dtype: str = "float16",
                     device: str = "cpu", emulate: bool | None = None, impl: str = "fast",
                     max_new_tokens: int = 16, policy: str | dict | None = None) -> "Generation":
    """Greedy-decode with a subject (its own KV cache) and with the float64 reference (its
    cache), and judge the tokens: the gate's `generation` check.

        import parity
        g = parity.generate_compare("path/to/ckpt", dtype="fp16", max_new_tokens=16)
        g.verdict, g.result.detail, g.result.figures
        g.steps[g.steps["phase"] != "agree"]      # the divergence and the drift after it

    checkpoint      as for `compare`.
    inputs          the prompts, as for `compare`; None: the gate's built-in batch.
    variant, dtype  one fast-path variant and dtype (for impl "hf": transformers' attention
                    implementation, "hf" = its default).
    impl            "fast" or "hf" (transformers; OpenAI GPT has no cache there and is decoded
                    by re-running the whole sequence for each token).
    max_new_tokens  tokens decoded per prompt (at least 1).
    policy          a budgets TOML path or a loaded policy.

    Returns a `parity.engine.generation.Generation`: `.verdict` (pass, warn: a near-tie the
    dtype cannot resolve, fail), `.result` (the gate's row: detail and figures), `.steps` (one
    row per prompt x step: tokens of both sides, phase agree/divergence/drift, the reference's
    margin and what the dtype resolves, KL and the floor's KL), `.reference_tokens`,
    `.subject_tokens`. Raises InputError / ParityError as `compare` does."""
    from parity.checkpoints.inputs import gate_batch
    from parity.devices import resolve_device
    from parity.engine.compare import Subject
    from parity.engine.generation import generation_check
    from parity.subjects import normalize_dtype

    ckpt, inputs, policy = _open(checkpoint, inputs, policy,
                                 lambda cfg: gate_batch(cfg, seed=0))
    subject = Subject(variant=variant, dtype=normalize_dtype(dtype),
                      device=resolve_device(device), emulate=emulate, impl=impl)
    return generation_check(ckpt, inputs, subject, max_new_tokens=max_new_tokens,
                            policy=policy)


def _open(checkpoint, inputs, policy, default_inputs):
    """(Checkpoint, validated Inputs, loaded policy) from what a caller passed; inputs None:
    `default_inputs(config)`."""
    from parity.checkpoints.checkpoint import Checkpoint, load_checkpoint
    from parity.checkpoints.inputs import as_inputs, validate_inputs
    from parity.engine import budgets as B

    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    inputs = default_inputs(ckpt.config) if inputs is None else as_inputs(inputs, ckpt.path)
    validate_inputs(inputs, ckpt.config, "inputs")
    return ckpt, inputs, policy if isinstance(policy, dict) else B.load_policy(policy)

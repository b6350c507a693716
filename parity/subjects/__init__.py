"""The implementations a trace can come from: `reference`, `fast`, `hf` (DESIGN.md).

`run(impl, ckpt, inputs, ...)` returns a `reference.Trace` whatever the implementation; arrays are
float64 NumPy (the subject's values, exactly), `trace.dtypes[site]` names the dtype that made them.
"""
from __future__ import annotations

import reference
from reference import dtypes

from parity.checkpoints.checkpoint import Checkpoint
from parity.devices import normalize_dtype  # noqa: F401 (re-exported: where a subject runs)
from parity.errors import ParityError
from parity.checkpoints.inputs import Inputs

IMPLS = ("reference", "fast", "hf")
DTYPES = tuple(dtypes.DTYPES)


def run(impl: str, ckpt: Checkpoint, inputs: Inputs, *, variant: str | None = None,
        dtype: str = "float64", device: str = "cpu", emulate: bool | None = None, sites=None,
        past=None, compile: str | None = "off") -> reference.Trace:
    """`compile` ('off' | 'inductor', parity/subjects/compiled.py) applies to fast and hf."""
    from parity.subjects import compiled

    dtype = normalize_dtype(dtype)
    compile = compiled.parse(compile)
    if impl == "reference" and compile != "off":
        raise ParityError("--compile applies to --impl fast and --impl hf; the float64 reference "
                          "is NumPy and is never compiled")
    if impl == "reference":
        if dtype not in ("float64", "float16", "bfloat16"):
            raise ParityError(
                f"--impl reference runs in float64 (or as the rounding floor in float16/bfloat16), "
                f"not {dtype}")
        floor = None if dtype == "float64" else dtype
        t = reference.forward(ckpt.config, ckpt.weights(), inputs.input_ids,
                              inputs.attention_mask, inputs.position_ids, past=past, sites=sites,
                              floor=floor)
        t.meta.update(impl="reference", device="cpu")
        if floor:
            t.meta["producer"] = f"gpt-parity reference rounding floor ({floor})"
        return t
    if impl == "fast":
        from parity.subjects import fast

        return fast.run(ckpt, inputs, variant=variant or "hf", dtype=dtype, device=device,
                        emulate=emulate, sites=sites, past=past, compile=compile)
    if impl == "hf":
        from parity.subjects import hf_adapter

        compiled.check_emulate(compile, emulate)
        # one variant grammar everywhere: `hf` (or none) is transformers' default, eager
        return hf_adapter.run(ckpt, inputs, dtype=dtype, device=device, sites=sites,
                              attn_implementation=None if variant in (None, "hf") else variant,
                              past=past, compile=compile)
    raise ParityError(f"unknown --impl {impl!r} (choose from {', '.join(IMPLS)})")

"""The gate's built-in batch (issue 11, "the gate misses what the report finds").

parity.inputs.gate_batch: several varied rows (full, left-padded, a repeated motif), longer than
GPT-Neo's local window, chosen by a targeted search on the float64 reference. What must hold:
valid inputs for every family; no false alarm on the healthy tiny checkpoints for any seed; and
the finding the report makes on gptj/stress/hf/fp16 (floor ratio 14.7 at blocks.1.attn.probs)
must FAIL for every seed. The last does not hold yet (xfail, see benchmarks/README.md "Gate
verdict stability"), so gate_batch is not wired into `parity gate`.
"""
from __future__ import annotations

import numpy as np
import pytest

import reference
from parity.checkpoint import open_checkpoint
from parity.compare import overall
from parity.fast import FastModel
from parity.inputs import gate_batch, validate_inputs
from parity.lockstep import lockstep
from parity.recipes import make_checkpoint

SEEDS = (0, 1, 2)


def _gate(ckpt, inputs, dtype="float16", variant="hf"):
    model = FastModel(ckpt, variant, dtype=dtype, device="cpu", cache_weights=False)
    df, _ = lockstep(ckpt, inputs, model, variant=variant)
    return overall(df)


@pytest.mark.parametrize("family", reference.FAMILIES)
def test_gate_batch_is_valid_and_varied(tiny_checkpoints, family):
    ckpt = open_checkpoint(tiny_checkpoints[family])
    cfg = ckpt.config
    b = gate_batch(cfg, seed=0, weights=ckpt.weights())
    validate_inputs(b, cfg, "gate_batch")
    rows, length = b.input_ids.shape
    assert rows >= 4
    real = b.attention_mask.sum(axis=1)
    assert real.max() == length and real.min() < length  # full and left-padded rows
    assert (b.position_ids[b.attention_mask == 1].min()) == 0
    if cfg.family == "gpt_neo":
        assert length > cfg.window_size
    assert np.array_equal(gate_batch(cfg, seed=0, weights=ckpt.weights()).input_ids,
                          b.input_ids)  # deterministic
    assert not np.array_equal(gate_batch(cfg, seed=1, weights=ckpt.weights()).input_ids,
                              b.input_ids)


@pytest.mark.parametrize("family", reference.FAMILIES)
def test_tiny_checkpoints_pass_for_every_seed(tiny_checkpoints, family):
    ckpt = open_checkpoint(tiny_checkpoints[family])
    verdicts = [_gate(ckpt, gate_batch(ckpt.config, seed=s, weights=ckpt.weights()))
                for s in SEEDS]
    assert verdicts == ["pass"] * len(SEEDS)


@pytest.mark.xfail(reason="issue 11 open: the targeted search does not yet find the near tie "
                          "on every seed (benchmarks/README.md, Gate verdict stability)",
                   strict=False)
def test_gptj_stress_hf_fp16_fails_for_every_seed(tmp_path):
    ckpt = open_checkpoint(make_checkpoint("gptj", tmp_path / "js", preset="stress"))
    verdicts = [_gate(ckpt, gate_batch(ckpt.config, seed=s, weights=ckpt.weights()))
                for s in range(5)]
    assert verdicts == ["fail"] * 5

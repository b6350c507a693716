"""The float64 reference against Hugging Face transformers run in float64 (MODEL_NOTES.md §8).

HF is the external oracle here: a tiny model of each family with every weight randomised, the
same weights handed to `reference.forward`, and every activation HF exposes compared (the
`hidden_states` tuple, the logits, the key/value cache), on left-padded batches with explicit
position ids, and for a second step fed through the KV cache. Only real (unpadded) positions
count. Then the issue's "Done when": `parity trace --impl reference` on a saved HF checkpoint
agrees with transformers in float64.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

import reference  # noqa: E402
from parity.engine.budgets import tolerance  # noqa: E402
from tests.hf_models import (  # noqa: E402
    build_model,
    canonical_weights,
    float64_rotary_table,
    hf_config,
    hf_forward,
    hidden_state_sites,
    padded_batch,
    patch_out_gpt_neo_fp32_cast,
    reference_config,
    rel_max_error,
)

pytestmark = pytest.mark.hf

# Which tolerance each family is held to (reasons in parity/engine/budgets.toml).
TOLERANCE = {
    "openai-gpt": "reference_vs_hf_float64",
    "gpt2": "reference_vs_hf_float64",
    "gptmeg": "reference_vs_hf_float64",
    "gptj": "reference_vs_hf_gptj",
    "gpt_neo": "reference_vs_hf_gpt_neo",  # HF casts q, k to fp32 (MODEL_NOTES 8.1)
}

P = 32  # positions table; every case stays well inside it
# (case id, family, HF config fields, attn_implementation or None for HF's default).
# Odd head counts and head dims that are not powers of two (36/3 -> 12, 30/5 -> 6), one head,
# odd inner sizes, untied heads, the non-default activations and attention options.
CASES = [
    ("gpt2-d36h3", "gpt2", dict(n_embd=36, n_head=3, n_layer=2, n_positions=P), None),
    ("gpt2-d36h3-eager", "gpt2", dict(n_embd=36, n_head=3, n_layer=2, n_positions=P), "eager"),
    ("gpt2-d30h5-inverse-layer-idx-untied", "gpt2",
     dict(n_embd=30, n_head=5, n_layer=3, n_positions=P, n_inner=50,
          scale_attn_by_inverse_layer_idx=True, tie_word_embeddings=False), None),
    ("gpt2-d24h1-unscaled-erf-gelu", "gpt2",
     dict(n_embd=24, n_head=1, n_layer=2, n_positions=P, scale_attn_weights=False,
          activation_function="gelu"), None),
    ("openai-gpt-d36h3", "openai-gpt", dict(n_embd=36, n_head=3, n_layer=2, n_positions=P), None),
    ("openai-gpt-d30h5-relu-untied", "openai-gpt",
     dict(n_embd=30, n_head=5, n_layer=3, n_positions=P, afn="relu", tie_word_embeddings=False),
     None),
    ("openai-gpt-d24h1-silu", "openai-gpt",
     dict(n_embd=24, n_head=1, n_layer=1, n_positions=P, afn="silu"), None),
    ("gpt_neo-d36h3-window3", "gpt_neo",
     dict(hidden_size=36, num_heads=3, num_layers=2, max_position_embeddings=P,
          attention_types=[[["global", "local"], 1]], window_size=3), None),
    ("gpt_neo-d30h5-window2", "gpt_neo",
     dict(hidden_size=30, num_heads=5, num_layers=3, max_position_embeddings=P,
          attention_types=[[["local", "global", "local"], 1]], window_size=2,
          intermediate_size=50), None),
    ("gpt_neo-d24h1-window5-erf-untied", "gpt_neo",
     dict(hidden_size=24, num_heads=1, num_layers=2, max_position_embeddings=P,
          attention_types=[[["local"], 2]], window_size=5, activation_function="gelu",
          tie_word_embeddings=False), None),
    ("gptj-d36h3-rotary4of12", "gptj",
     dict(n_embd=36, n_head=3, n_layer=2, n_positions=P, rotary_dim=4), None),
    ("gptj-d30h5-rotary6of6", "gptj",
     dict(n_embd=30, n_head=5, n_layer=3, n_positions=P, rotary_dim=6, n_inner=50), None),
    ("gptj-d24h1-rotary8of24-tied", "gptj",  # a tied head keeps lm_head.bias in HF
     dict(n_embd=24, n_head=1, n_layer=2, n_positions=P, rotary_dim=8,
          tie_word_embeddings=True), None),
    ("gptmeg-d36h3", "gptmeg", dict(n_embd=36, n_head=3, n_layer=2, n_positions=P), None),
    ("gptmeg-d30h5-inverse-layer-idx", "gptmeg",
     dict(n_embd=30, n_head=5, n_layer=3, n_positions=P, scale_attn_by_inverse_layer_idx=True),
     None),
]
CACHE_CASES = [c for c in CASES if c[1] != "openai-gpt"]  # OpenAI GPT has no KV cache
NEO_CASES = [c for c in CASES if c[1] == "gpt_neo"]

T, T2 = 8, 2  # first-step and cached-step lengths
LENGTHS = [8, 6, 3]  # real tokens per row: no padding, some, most (all left-padded)
OFFSETS = [0, 1, 4]  # position-id offsets per row (explicit positions, not derived)


def _params(cases):
    return [pytest.param(*c[1:], id=c[0]) for c in cases]


def _setup(family, fields, attn, seed=0):
    cfg = hf_config(family, **fields)
    model = build_model(family, cfg, seed=seed, attn_implementation=attn)
    return model, reference_config(family, cfg), canonical_weights(model)


def _compare(trace, logits, hidden, rows, family, n_layer, tol_name):
    """Assert every HF-exposed site agrees; returns the errors for the failure message."""
    tol = tolerance(tol_name)
    assert len(hidden) == n_layer + 1
    errs = {site: rel_max_error(trace[site], h, rows)
            for site, h in zip(hidden_state_sites(family, n_layer), hidden)}
    errs["logits"] = rel_max_error(trace.logits, logits, rows)
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"reference vs HF over {tol_name}={tol:g}: {bad}"
    return errs


def _cache_layers(cache):
    """Per-layer (keys, values) of an HF cache object, as (B, H, Tk, hd) tensors."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(cache[i][0], cache[i][1]) for i in range(len(cache))]


def _compare_cache(ref_cache, hf_cache, key_mask, tol_name):
    """Cached keys (after rotary) and values of every layer, at real key positions."""
    tol = tolerance(tol_name)
    hf_layers = _cache_layers(hf_cache)
    assert len(hf_layers) == len(ref_cache)
    rows = key_mask == 1
    for i, ((rk, rv), (hk, hv)) in enumerate(zip(ref_cache, hf_layers)):
        for what, r, h in (("k", rk, hk), ("v", rv, hv)):
            assert tuple(h.shape) == r.shape
            err = rel_max_error(r.transpose(0, 2, 1, 3), h.transpose(1, 2), rows)
            assert err <= tol, f"cache layer {i} {what}: {err:.3g} > {tol_name}={tol:g}"


def _two_steps(family, model, cfg, weights, tol_name, seed=0):
    """Step 1: a left-padded batch with explicit positions; step 2: T2 more tokens through the
    KV cache, with the full-length attention mask. Both compared at every HF-exposed site."""
    ids, mask, pos = padded_batch(cfg.vocab_size, LENGTHS, T, seed, OFFSETS)
    rows = mask == 1
    use_cache = family != "openai-gpt"
    logits, hidden, cache = hf_forward(model, ids, mask, pos, use_cache=use_cache)
    trace = reference.forward(cfg, weights, ids, mask, pos)
    _compare(trace, logits, hidden, rows, family, cfg.n_layer, tol_name)
    if not use_cache:
        return
    _compare_cache(trace.cache, cache, mask, tol_name)

    rng = np.random.default_rng(seed + 1)
    ids2 = rng.integers(0, cfg.vocab_size, size=(len(LENGTHS), T2), dtype=np.int64)
    mask2 = np.concatenate([mask, np.ones_like(ids2)], axis=1)
    pos2 = pos[:, -1:] + 1 + np.arange(T2)
    logits2, hidden2, _ = hf_forward(model, ids2, mask2, pos2, past=cache, use_cache=True)
    trace2 = reference.forward(cfg, weights, ids2, mask2, pos2, past=trace.cache)
    _compare(trace2, logits2, hidden2, np.ones(ids2.shape, bool), family, cfg.n_layer, tol_name)


@pytest.mark.parametrize("family, fields, attn", _params(CASES))
def test_reference_matches_hf_float64(family, fields, attn):
    model, cfg, weights = _setup(family, fields, attn)
    _two_steps(family, model, cfg, weights, TOLERANCE[family])


@pytest.mark.parametrize("family, fields, attn", _params(NEO_CASES))
def test_gpt_neo_matches_hf_without_its_fp32_cast(family, fields, attn, monkeypatch):
    """With HF's fp32 cast of q/k patched out, GPT-Neo is exact float64 math on both sides."""
    model, cfg, weights = _setup(family, fields, attn)
    ids, mask, pos = padded_batch(cfg.vocab_size, LENGTHS, T, 0, OFFSETS)
    cast_logits, _, _ = hf_forward(model, ids, mask, pos)
    patch_out_gpt_neo_fp32_cast(monkeypatch)
    uncast_logits, _, _ = hf_forward(model, ids, mask, pos)
    assert not torch.equal(cast_logits, uncast_logits), "the patch did not reach HF's _attn"
    _two_steps(family, model, cfg, weights, "reference_vs_hf_gpt_neo_uncast")


# --------------------------------------------------------------------------- "Done when" (CLI)
HF_FAMILIES = {  # one saved checkpoint per HF family (GPTMeg has no HF class)
    "openai-gpt": dict(n_embd=36, n_head=3, n_layer=2, n_positions=P),
    "gpt2": dict(n_embd=30, n_head=5, n_layer=2, n_positions=P),
    "gpt_neo": dict(hidden_size=36, num_heads=3, num_layers=2, max_position_embeddings=P,
                    attention_types=[[["global", "local"], 1]], window_size=3),
    "gptj": dict(n_embd=36, n_head=3, n_layer=2, n_positions=P, rotary_dim=4),
}


def _save_checkpoint_and_inputs(family, tmp_path):
    """A random HF model cast to float32 and `save_pretrained` (safetensors), plus an inputs
    file holding a left-padded batch with explicit position ids."""
    from safetensors.numpy import save_file

    cfg = hf_config(family, **HF_FAMILIES[family])
    model = build_model(family, cfg, seed=3).to(torch.float32)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    assert (ckpt / "model.safetensors").is_file()
    ids, mask, pos = padded_batch(cfg.vocab_size, LENGTHS, T, 5, OFFSETS)
    inputs = tmp_path / "inputs.safetensors"
    save_file({"input_ids": ids, "attention_mask": mask, "position_ids": pos}, str(inputs))
    return ckpt, inputs, (ids, mask, pos)


def _check_golden_against_hf(family, golden_path, ckpt, batch):
    from transformers import AutoModelForCausalLM

    from parity.goldens.io import read_golden

    ids, mask, pos = batch
    g = read_golden(golden_path)
    assert g.meta["family"] == family and g.dtype == "float64"
    np.testing.assert_array_equal(g.input_ids, ids)
    np.testing.assert_array_equal(g.attention_mask, mask)
    np.testing.assert_array_equal(g.position_ids, pos)
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float64).eval()
    if family == "gptj":
        float64_rotary_table(hf)  # loaded at fp32 precision, see the helper
    logits, _, _ = hf_forward(hf, ids, mask, pos)
    assert logits.dtype == torch.float64
    err = rel_max_error(g.logits, logits, mask == 1)
    tol_name = TOLERANCE[family]
    assert err <= tolerance(tol_name), f"{family}: {err:.3g} > {tol_name}"


@pytest.mark.parametrize("family", list(HF_FAMILIES))
def test_parity_trace_reference_matches_hf_float64(family, tmp_path):
    from parity.cli import main

    ckpt, inputs, batch = _save_checkpoint_and_inputs(family, tmp_path)
    out = tmp_path / "trace.safetensors"
    rc = main(["trace", str(ckpt), "--impl", "reference", "--inputs", str(inputs),
               "--out", str(out)])
    assert rc == 0
    _check_golden_against_hf(family, out, ckpt, batch)


def _console_script() -> str:
    """The installed `parity` entry point: beside this interpreter, else on PATH."""
    here = Path(sys.executable).with_name("parity")
    found = str(here) if here.is_file() else shutil.which("parity")
    assert found, "the `parity` console script is not installed (pip install -e .)"
    return found


def test_parity_console_script_trace_matches_hf(tmp_path):
    family = "gpt2"
    ckpt, inputs, batch = _save_checkpoint_and_inputs(family, tmp_path)
    out = tmp_path / "trace.safetensors"
    proc = subprocess.run(
        [_console_script(), "trace", str(ckpt), "--impl", "reference", "--inputs", str(inputs),
         "--out", str(out)],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    _check_golden_against_hf(family, out, ckpt, batch)

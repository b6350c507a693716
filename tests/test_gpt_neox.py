"""GPT-NeoX (the sixth family, MODEL_NOTES section 10): the float64 reference against
transformers' GPTNeoXForCausalLM run in float64, config parsing, and conversion mutants the gate
must fail.

Oracle pitfalls (MODEL_NOTES 10): HF's eager attention runs softmax in float32 even in a float64
model, and its rotary table is computed in float32 (`position_ids.float() * inv_freq.float()`), so
the oracle runs attn_implementation="sdpa" with `GPTNeoXRotaryEmbedding.forward` patched to compute
the angles in float64 (`float64_neox_rotary`). Weights are seeded random (no downloads).
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("transformers", reason="the outside oracle needs the [hf] extra")

import torch  # noqa: E402

import reference  # noqa: E402
from parity.engine.budgets import tolerance  # noqa: E402
from tests.hf_models import padded_batch, randomize, rel_max_error  # noqa: E402

pytestmark = pytest.mark.hf

P = 32
BASE = dict(vocab_size=64, bos_token_id=None, eos_token_id=None, pad_token_id=None,
            max_position_embeddings=P)
# (id, GPTNeoXConfig fields): parallel and sequential residual, partial (0.25) and full rotary,
# odd head dims, a non-default base, the v5 rope_parameters spelling and the older one
CASES = [
    ("parallel-pct0.25-d64h4", dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                                    intermediate_size=100, rotary_pct=0.25)),
    ("sequential-pct0.25-d64h4", dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=3,
                                      intermediate_size=100, rotary_pct=0.25,
                                      use_parallel_residual=False)),
    ("parallel-full-rotary-d36h3", dict(hidden_size=36, num_attention_heads=3,
                                        num_hidden_layers=2, intermediate_size=50,
                                        rotary_pct=1.0, rotary_emb_base=500)),
    ("sequential-full-rotary-d24h1-tanh", dict(hidden_size=24, num_attention_heads=1,
                                               num_hidden_layers=2, rotary_pct=1.0,
                                               use_parallel_residual=False,
                                               hidden_act="gelu_new")),
    ("parallel-rope-parameters-d48h2", dict(
        hidden_size=48, num_attention_heads=2, num_hidden_layers=2,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0,
                         "partial_rotary_factor": 0.5})),
]


def float64_neox_rotary(model) -> None:
    """HF computes NeoX's angles in float32 (`position_ids.float()`); in a float64 model compute
    inv_freq and the angles in float64 (MODEL_NOTES 10, pitfall 2)."""
    emb = model.gpt_neox.rotary_emb
    cfg = model.config
    R = model.gpt_neox.layers[0].attention.rotary_ndims
    base = cfg.rope_parameters["rope_theta"]
    inv = 1.0 / (float(base) ** (torch.arange(0, R, 2, dtype=torch.float64) / R))

    def forward(x, position_ids):
        freqs = position_ids[..., None].to(torch.float64) * inv
        e = torch.cat((freqs, freqs), dim=-1)
        return e.cos().to(x.dtype), e.sin().to(x.dtype)

    emb.forward = forward


def build(fields: dict, seed: int = 0, impl: str = "sdpa"):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(**{**BASE, **fields})
    model = GPTNeoXForCausalLM._from_config(cfg, dtype=torch.float64, attn_implementation=impl)
    randomize(model, seed)
    float64_neox_rotary(model)
    return model.eval()


def weights_of(model, fam) -> dict[str, np.ndarray]:
    """HF state dict -> the registry's canonical names (float64). transformers v5 calls the
    head module `lm_head` and stores it as `embed_out` (its own conversion mapping)."""
    return {fam.canonical_key(k.replace("lm_head.", fam.lm_head + ".")):
            v.detach().to(torch.float64).numpy().copy()
            for k, v in model.state_dict().items() if v.is_floating_point()}


def _agreement(fields, seed=0):
    model = build(fields, seed)
    fam = reference.family("gpt_neox")
    cfg = reference.parse_config(model.config.to_dict())
    w = weights_of(model, fam)
    assert set(w) == set(reference.param_shapes(cfg)), "canonical names differ from param_shapes"
    ids, mask, pos = padded_batch(cfg.vocab_size, [9, 5, 7], 9, seed=seed, offsets=[0, 3, 11])
    with torch.no_grad():
        out = model(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                    position_ids=torch.as_tensor(pos), output_hidden_states=True)
    tr = reference.forward(cfg, w, ids, mask, pos)
    rows = mask.astype(bool)
    errs = {"logits": rel_max_error(tr.sites["logits"], out.logits, rows)}
    out_site = cfg.block_sites[-1]
    for i in range(1, cfg.n_layer):  # hidden_states[i] is block i-1's output
        errs[f"blocks.{i - 1}.{out_site}"] = rel_max_error(
            tr.sites[f"blocks.{i - 1}.{out_site}"], out.hidden_states[i], rows)
    errs["ln_f"] = rel_max_error(tr.sites["ln_f"], out.hidden_states[-1], rows)
    return cfg, errs


@pytest.mark.parametrize("case", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_reference_agrees_with_transformers_float64(case):
    cfg, errs = _agreement(case)
    assert cfg.block == ("parallel" if case.get("use_parallel_residual", True) else "pre")
    tol = tolerance("reference_vs_hf_float64")
    assert max(errs.values()) < tol, errs


def test_config_spellings_and_facts():
    from transformers import GPTNeoXConfig

    c = reference.parse_config(GPTNeoXConfig(**BASE, hidden_size=64, num_attention_heads=4,
                                             num_hidden_layers=2).to_dict())
    assert (c.rotary_dim, c.rotary_base, c.block, c.tie_word_embeddings) == (4, 10000.0,
                                                                             "parallel", False)
    # the config's own intermediate_size (transformers' default, not 4 x hidden) and hidden_act
    assert (c.activation, c.d_inner) == ("gelu", GPTNeoXConfig().intermediate_size)
    old = reference.parse_config(dict(model_type="gpt_neox", hidden_size=64, num_attention_heads=4,
                                      num_hidden_layers=2, rotary_pct=0.5, rotary_emb_base=77,
                                      layer_norm_eps=1e-6, use_parallel_residual=False,
                                      intermediate_size=96, max_position_embeddings=40))
    assert (old.rotary_dim, old.rotary_base, old.layer_norm_epsilon, old.block, old.d_inner,
            old.n_positions) == (8, 77.0, 1e-6, "pre", 96, 40)
    assert reference.site_names("gpt_neox", 1, old.block)[1:4] == [
        "blocks.0.ln_1", "blocks.0.attn.q", "blocks.0.attn.k"]
    assert "blocks.0.resid_mid" in reference.site_names("gpt_neox", 1, old.block)
    with pytest.raises(reference.ConfigError):
        reference.parse_config(dict(model_type="gpt_neox", hidden_size=64, num_attention_heads=4,
                                    rope_parameters={"rope_type": "linear", "factor": 2.0}))


# ----------------------------------------------------------------------------- checkpoints
def _save_hf(tmp_path, fields=None, seed=3):
    """A checkpoint written by transformers itself (its key names, its config.json)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(**{**BASE, "vocab_size": 128, "hidden_size": 32,
                           "num_attention_heads": 4, "num_hidden_layers": 2,
                           "intermediate_size": 64, **(fields or {})})
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(cfg)
    randomize(model, seed)
    out = tmp_path / "hf-neox"
    model.save_pretrained(out)
    return out


def _parity(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "parity", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("fields", [{}, {"use_parallel_residual": False, "rotary_pct": 1.0}],
                         ids=["parallel", "sequential-full-rotary"])
@pytest.mark.parametrize("impl", ["fast", "hf"])
def test_gate_passes_a_checkpoint_saved_by_transformers(tmp_path, fields, impl):
    ck = _save_hf(tmp_path, fields)
    r = _parity("gate", ck, "--impl", impl, "--report", tmp_path / "report")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


# ----------------------------------------------------------------------------- conversion mutants
def _permute_qkv_rows(w: torch.Tensor, H: int) -> torch.Tensor:
    """Per-head rows [q0 k0 v0 q1 k1 v1 ...] re-read as one [Q | K | V] block: the converter
    slip of MODEL_NOTES 10 (the checkpoint written as if the layout were GPT-2's)."""
    hd = w.shape[0] // (3 * H)
    per_head = w.reshape(H, 3, hd, *w.shape[1:])  # [head, q|k|v, hd]
    return per_head.transpose(0, 1).reshape(w.shape)  # [q|k|v, head, hd]


def _interleave_rotary_rows(w: torch.Tensor, H: int, R: int, part: int) -> torch.Tensor:
    """Rows of q (part 0) or k (part 1) of each head permuted so that rotate-half pairs
    (j, j+R/2) become interleaved pairs (2j, 2j+1): what a converter from an interleaved-rotary
    codebase that forgets the permutation leaves behind."""
    hd = w.shape[0] // (3 * H)
    w = w.clone()
    perm = torch.arange(hd)
    perm[:R] = torch.stack([torch.arange(R // 2), torch.arange(R // 2) + R // 2], 1).flatten()
    for h in range(H):
        lo = (3 * h + part) * hd
        w[lo:lo + hd] = w[lo:lo + hd][perm]
    return w


def _mutant(src, dst, how):
    """Copy checkpoint `src` to `dst` with its query_key_value weights (and biases) mutated."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    H = cfg["num_attention_heads"]
    c = reference.parse_config(cfg)
    sd = load_file(str(src / "model.safetensors"))
    for k in list(sd):
        if "query_key_value" in k:
            if how == "qkv-blocks":
                sd[k] = _permute_qkv_rows(sd[k], H).contiguous()
            elif how == "rotary-interleaved":
                for part in (0, 1):
                    sd[k] = _interleave_rotary_rows(sd[k], H, c.rotary_dim, part)
    if how == "rotary-pct-ignored":
        cfg.pop("rope_parameters", None)
        cfg["rotary_pct"] = 1.0
        cfg["partial_rotary_factor"] = 1.0
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("how", ["qkv-blocks", "rotary-interleaved", "rotary-pct-ignored"])
def test_gate_fails_a_misconverted_checkpoint(tmp_path, how):
    """A golden from the right weights; the gate over the mis-converted ones must fail (1)."""
    good = _save_hf(tmp_path, {"rotary_pct": 0.5})
    golden = tmp_path / "good.safetensors"
    r = _parity("trace", good, "--impl", "reference", "--tokens", "5 17 3 99 42 8 77 21 64 1",
                "--out", golden)
    assert r.returncode == 0, r.stderr
    bad = _mutant(good, tmp_path / "bad", how)
    ok = _parity("gate", good, "--golden", golden, "--report", tmp_path / "ok")
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-2000:]
    r = _parity("gate", bad, "--golden", golden, "--report", tmp_path / "bad")
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-2000:]
    assert "golden" in r.stdout

"""Seeded random checkpoints in Hugging Face layout (`parity checkpoint make`).

Presets:
  tiny        the embedded default: small enough that every family runs in milliseconds on a
              CPU, with non-trivial LayerNorm gains/biases and biases so mistakes in them show.
  full-width  the released width of the family (GPT-J-6B: 4096 wide, 16 heads, rotary 64, vocab
              50400) with --layers N, stored in fp16, one shard per layer, for benchmarks.
Each tensor is drawn from its own generator seeded by (seed, tensor name), so a recipe gives the
same bytes whatever the order of writing.
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import numpy as np

import reference

from parity.errors import ParityError

TINY = {
    "gpt2": dict(model_type="gpt2", vocab_size=512, n_positions=128, n_embd=64, n_layer=4,
                 n_head=4, activation_function="gelu_new"),
    "gptmeg": dict(model_type="gptmeg", vocab_size=512, n_positions=128, n_ctx=128, n_embd=64,
                   n_layer=4, n_head=4, activation_function="gelu_megatron"),
    "openai-gpt": dict(model_type="openai-gpt", vocab_size=512, n_positions=128, n_embd=64,
                       n_layer=4, n_head=4, afn="gelu"),
    "gpt_neo": dict(model_type="gpt_neo", vocab_size=512, max_position_embeddings=128,
                    hidden_size=64, num_layers=4, num_heads=4,
                    attention_types=[[["global", "local"], 2]], window_size=8,
                    activation_function="gelu_new"),
    "gptj": dict(model_type="gptj", vocab_size=512, n_positions=128, n_embd=64, n_layer=4,
                 n_head=4, rotary_dim=8, activation_function="gelu_new",
                 tie_word_embeddings=False),
    # GPT-NeoX: rotary_pct 0.25 of hd 16 = 4 dims; Pythia's parallel residual, untied embed_out
    "gpt_neox": dict(model_type="gpt_neox", vocab_size=512, max_position_embeddings=128,
                     hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=256, hidden_act="gelu", rotary_pct=0.25,
                     rotary_emb_base=10000, use_parallel_residual=True,
                     tie_word_embeddings=False, layer_norm_eps=1e-5),
}

FULL_WIDTH = {
    "gpt2": dict(model_type="gpt2", vocab_size=50257, n_positions=1024, n_embd=768, n_head=12),
    "gptmeg": dict(model_type="gptmeg", vocab_size=50257, n_positions=1024, n_ctx=1024,
                   n_embd=768, n_head=12, activation_function="gelu_megatron"),
    "openai-gpt": dict(model_type="openai-gpt", vocab_size=40478, n_positions=512, n_embd=768,
                       n_head=12, afn="gelu"),
    "gpt_neo": dict(model_type="gpt_neo", vocab_size=50257, max_position_embeddings=2048,
                    hidden_size=2048, num_heads=16, window_size=256),
    "gptj": dict(model_type="gptj", vocab_size=50400, n_positions=2048, n_embd=4096, n_head=16,
                 rotary_dim=64, tie_word_embeddings=False),
    # Pythia-1B's width: 2048 wide, 8 heads (hd 256, rotary 64), vocab 50304
    "gpt_neox": dict(model_type="gpt_neox", vocab_size=50304, max_position_embeddings=2048,
                     hidden_size=2048, num_attention_heads=8, intermediate_size=8192,
                     hidden_act="gelu", rotary_pct=0.25, rotary_emb_base=10000,
                     use_parallel_residual=True, tie_word_embeddings=False, layer_norm_eps=1e-5),
}

COMMON = dict(layer_norm_epsilon=1e-5, bos_token_id=0, eos_token_id=0)
PRESETS = ("tiny", "stress", "full-width")

# The `stress` preset: the tiny shapes with the magnitudes of real checkpoints, so that
# the numerics knobs matter. Each figure below is a scale applied to the tiny weights.
STRESS = {
    "outlier_dims": (3, 17),     # residual-stream dimensions that carry outliers
    "outlier_embed": 1500.0,     # |value| of the outlier dims in the token embedding
    "outlier_mlp_bias": 300.0,   # added to the outlier dims by every MLP output bias
    "qk_head": 0,                # the head of each layer whose q and k are aligned and large
    "qk_scale": 80.0,            # q = k weights scaled so the raw q.k^T of that head passes 65504
    "hot_units": 8,              # MLP units whose pre-activation goes beyond +-40
    "hot_scale": 30.0,
}


def make_config(family: str, preset: str = "tiny", layers: int | None = None) -> dict:
    if family not in reference.FAMILIES:
        raise ParityError(f"unknown family {family!r} (choose from {', '.join(reference.FAMILIES)})")
    fam = reference.family(family)
    n_layer = fam.config_keys["n_layer"][0]  # the key the family's config class writes
    if preset in ("tiny", "stress"):
        d = dict(COMMON, **TINY[family])
    elif preset == "full-width":
        d = dict(COMMON, **FULL_WIDTH[family])
        d.setdefault(n_layer, 2)
    else:
        raise ParityError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    if layers:
        d[n_layer] = layers
    if fam.windowed:  # global and local layers alternate, a last odd one global
        n = d[n_layer]
        d["attention_types"] = [[["global", "local"], n // 2]] + ([[["global"], 1]] if n % 2 else [])
    if layers is not None and layers < 1:
        raise ParityError(f"--layers must be at least 1, got {layers}")
    return d


def tensor_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def init_tensor(family: str, name: str, shape: tuple[int, ...], seed: int,
                dtype=np.float64) -> np.ndarray:
    """Random values by the role of the tensor: LayerNorm gains near 1 (not 1), small non-zero
    biases, weights ~ N(0, 1/fan_in), embeddings of unit-ish scale."""
    rng = tensor_rng(seed, name)
    leaf = name.rsplit(".", 1)[-1]

    def normal():  # float32 draws for full-width checkpoints: half the memory, twice the speed
        return rng.standard_normal(shape, dtype=dtype)

    if ".ln_" in name or name.startswith("ln_f"):
        if leaf == "weight":
            return 1.0 + 0.2 * normal()
        return 0.1 * normal()
    if leaf == "bias":
        return 0.1 * normal()
    fam = reference.family(family)
    if name in fam.embeddings:
        return 0.5 * normal()
    # Conv1D is [in, out], nn.Linear [out, in]; scale by the input width either way
    fan_in = shape[0] if fam.conv1d else shape[-1]
    a = normal()
    a /= np.sqrt(fan_in, dtype=a.dtype)
    return a


def stress_tensor(family: str, name: str, a: np.ndarray, cfg, seed: int) -> np.ndarray:
    """Apply the `stress` magnitudes to one freshly initialised tensor (see STRESS)."""
    S, d, hd = STRESS, cfg.d_model, cfg.head_dim
    fam = reference.family(family)
    h0 = slice(S["qk_head"] * hd, (S["qk_head"] + 1) * hd)
    a = a.copy()
    leaf = name.split(".", 2)[-1] if name.startswith("h.") else name
    # outliers enter through an embedding that is not the (tied) LM head: the position
    # embedding, or the token embedding where there is none (GPT-J's, untied). A post-LN
    # family gets none: its LayerNorms bound the stream after every block.
    outliers = fam.block != "post"
    if outliers and name == fam.embeddings[-1]:
        for j, dim in enumerate(S["outlier_dims"]):
            a[:, dim] = (1 if j % 2 == 0 else -1) * S["outlier_embed"] * (1 + 0.1 * a[:, dim])
    elif outliers and leaf == fam.fc_out + ".bias":
        for j, dim in enumerate(S["outlier_dims"]):
            a[dim] += (1 if j % 2 == 0 else -1) * S["outlier_mlp_bias"]
    elif fam.fused_qkv and leaf == fam.qkv[0] + ".weight":
        # [Q | K | V]: q outputs [0, d), k [d, 2d); per head: head h's q [3h hd, (3h+1) hd), k next
        if fam.qkv_layout == "per_head":
            qo = slice(3 * h0.start, 3 * h0.start + hd)
            ko = slice(qo.stop, qo.stop + hd)
        else:
            qo, ko = h0, slice(d + h0.start, d + h0.stop)
        a = a if fam.conv1d else a.T  # outputs on the last axis
        q = a[:, qo] * S["qk_scale"]
        a[:, qo] = q
        a[:, ko] = q
        a = a if fam.conv1d else a.T
    elif not fam.fused_qkv and leaf == fam.qkv[0] + ".weight":  # Linear [out, in]
        a[h0, :] *= S["qk_scale"]
    elif not fam.fused_qkv and leaf == fam.qkv[1] + ".weight":
        q_name = name.replace(fam.qkv[1], fam.qkv[0])
        a[h0, :] = init_tensor(family, q_name, a.shape, seed)[h0, :] * S["qk_scale"]
    elif leaf == fam.fc_in + ".weight":
        hot = slice(0, S["hot_units"])
        if fam.conv1d:
            a[:, hot] *= S["hot_scale"]
        else:
            a[hot, :] *= S["hot_scale"]
    return a


def make_checkpoint(family: str, out: str | os.PathLike, preset: str = "tiny",
                    layers: int | None = None, seed: int = 0, dtype: str | None = None) -> Path:
    """Write config.json + weights; returns the directory."""
    import torch
    from safetensors.torch import save_file

    from parity.devices import normalize_dtype

    raw = make_config(family, preset, layers)
    cfg = reference.parse_config(raw)
    fam = reference.family(family)
    out = Path(out)
    # the one dtype vocabulary, checked before anything is written; a checkpoint stores floats
    dtype = normalize_dtype(dtype or ("float16" if preset == "full-width" else "float32"))
    tdt = getattr(torch, dtype)
    out.mkdir(parents=True, exist_ok=True)
    shapes = reference.param_shapes(cfg)
    # one shard per layer for full-width checkpoints, so that writing stays within memory
    groups: dict[str, list[str]] = {}
    for name in shapes:
        grp = name.split(".")[1] if name.startswith("h.") else "rest"
        groups.setdefault(grp if preset == "full-width" else "all", []).append(name)
    files = {}
    for gi, names in enumerate(groups.values()):
        tensors = {}
        for name in names:
            key = fam.hf_key(name)
            a = init_tensor(family, name, shapes[name], seed,
                            np.float32 if preset == "full-width" else np.float64)
            if preset == "stress":
                a = stress_tensor(family, name, a, cfg, seed)
            tensors[key] = torch.from_numpy(a).to(tdt)
        fname = ("model.safetensors" if len(groups) == 1
                 else f"model-{gi + 1:05d}-of-{len(groups):05d}.safetensors")
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        os.chmod(out / fname, 0o644)  # safetensors writes 0600; a checkpoint is shared data
        files.update({k: fname for k in tensors})
        del tensors
    if len(groups) > 1:
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": files}, indent=1))
    raw = dict(raw, torch_dtype=dtype, architectures=[reference.family(family).hf_class],
               gpt_parity_recipe={"family": family, "preset": preset, "layers": layers,
                                  "seed": seed})
    (out / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    return out


"""Checkpoint IO (parity/checkpoints/checkpoint.py): every accepted layout gives the same weights, every bad
input is refused with a message that names the file and the problem, and pickled code never runs.

Each case starts from the session's tiny checkpoint of a family, rewrites its tensors into
another layout (or breaks it) in a temporary folder, and loads it as a user would.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import reference
from parity.checkpoints.checkpoint import load_checkpoint, open_checkpoint
from parity.errors import CheckpointError, ParityError

TIED = [f for f in reference.FAMILIES if reference.family(f).tie_default]  # GPT-J's is untied


# ------------------------------------------------------------------------------- helpers
def tensors_of(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt_dir / "model.safetensors"))


def new_dir(src: Path, dst: Path, tensors: dict | None = None, layout: str = "safetensors") -> Path:
    """A checkpoint folder with src's config.json and `tensors` written in `layout`."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = tensors_of(src) if tensors is None else tensors
    if layout == "safetensors":
        save_file(tensors, str(dst / "model.safetensors"))
    elif layout in ("sharded", "bin-sharded"):
        ext = "safetensors" if layout == "sharded" else "bin"
        base = "model" if layout == "sharded" else "pytorch_model"
        keys = sorted(tensors)
        shards = {f"{base}-0000{n + 1}-of-00002.{ext}": keys[n::2] for n in range(2)}
        for name, ks in shards.items():
            part = {k: tensors[k] for k in ks}
            (save_file(part, str(dst / name)) if ext == "safetensors"
             else torch.save(part, dst / name))
        index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
        (dst / f"{base}.{ext}.index.json").write_text(json.dumps(index))
    elif layout == "bin":
        torch.save(tensors, dst / "pytorch_model.bin")
    elif layout == "bin-legacy":  # torch's pre-1.6 (non-zip) serialization: no mmap
        torch.save(tensors, dst / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    else:
        raise ValueError(layout)
    return dst


def probe_ids(cfg) -> np.ndarray:
    v = cfg.vocab_size
    return np.array([[0, 1, v // 2, v - 2, v - 1], [v - 1, 7, 0, 3, v // 3]], dtype=np.int64)


def logits_of(ckpt_dir: Path) -> np.ndarray:
    ckpt = load_checkpoint(ckpt_dir)
    return reference.forward(ckpt.config, ckpt.weights(), probe_ids(ckpt.config)).logits


def legacy_buffers(family: str, cfg) -> dict[str, torch.Tensor]:
    """The non-parameter buffers old HF checkpoints carry (MODEL_NOTES sections 1-4)."""
    p = cfg.n_positions
    causal = torch.tril(torch.ones(p, p)).view(1, 1, p, p)
    out = {}
    for i in range(cfg.n_layer):
        if family == "gpt_neox":  # old NeoX files: mask buffers and the rotary inv_freq
            p_ = f"gpt_neox.layers.{i}.attention."
            out[p_ + "bias"] = causal.bool()
            out[p_ + "masked_bias"] = torch.tensor(-1e9)
            out[p_ + "rotary_emb.inv_freq"] = torch.ones(2)
        elif family == "gpt_neo":  # a bool mask buffer: must be ignored, not refused as non-float
            out[f"transformer.h.{i}.attn.attention.bias"] = causal.bool()
            out[f"transformer.h.{i}.attn.attention.masked_bias"] = torch.tensor(-1e9)
        else:
            out[f"transformer.h.{i}.attn.bias"] = causal.clone()
            out[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return out


def rewrite_header(file: Path, edit) -> None:
    """Rewrite a safetensors header in place (edit(header) mutates the parsed JSON)."""
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    file.write_bytes(len(h).to_bytes(8, "little") + h + raw[8 + n:])


# ------------------------------------------------------------------------------- layouts
LAYOUTS = ["sharded", "bin", "bin-legacy", "bin-sharded", "no-prefix", "legacy-buffers"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", reference.FAMILIES)
def test_every_layout_gives_identical_logits(family, layout, tiny_checkpoints, tmp_path):
    src = tiny_checkpoints[family]
    tensors = tensors_of(src)
    cfg = open_checkpoint(src).config
    if layout == "no-prefix":
        tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    extra = legacy_buffers(family, cfg) if layout == "legacy-buffers" else {}
    d = new_dir(src, tmp_path / layout, {**tensors, **extra},
                layout if layout not in ("no-prefix", "legacy-buffers") else "safetensors")
    ckpt = load_checkpoint(d)
    assert sorted(ckpt.ignored) == sorted(extra)
    assert set(ckpt.entries) == set(reference.param_shapes(cfg))
    np.testing.assert_array_equal(logits_of(d), logits_of(src))


@pytest.mark.parametrize("family", TIED)
def test_a_tied_head_may_be_present_or_absent(family, tiny_checkpoints, tmp_path):
    """HF ties lm_head to the token embedding; files may carry a copy of it or not."""
    src = tiny_checkpoints[family]
    tensors = tensors_of(src)
    emb = "transformer.tokens_embed.weight" if family == "openai-gpt" else "transformer.wte.weight"
    assert "lm_head.weight" not in tensors  # absent in the made checkpoint
    d = new_dir(src, tmp_path / "present", {**tensors, "lm_head.weight": tensors[emb].clone()})
    assert load_checkpoint(d).ignored == ["lm_head.weight"]
    np.testing.assert_array_equal(logits_of(d), logits_of(src))


def test_an_untied_head_is_read(tiny_checkpoints, tmp_path):
    """GPT-J: the head is its own tensor (with a bias), read from the file, not tied."""
    src = tiny_checkpoints["gptj"]
    tensors = tensors_of(src)
    bias = tensors["lm_head.bias"] + 1
    d = new_dir(src, tmp_path / "gptj", {**tensors, "lm_head.bias": bias})
    np.testing.assert_array_equal(load_checkpoint(d).weights()["lm_head.bias"],
                                  bias.to(torch.float64).numpy())
    assert not np.array_equal(logits_of(d), logits_of(src))


def test_weights_are_read_lazily_and_rows_match(tiny_checkpoints):
    ckpt = load_checkpoint(tiny_checkpoints["gpt2"])
    idx = np.array([5, 0, 511, 5])
    np.testing.assert_array_equal(ckpt.rows("wte.weight", idx).numpy(),
                                  ckpt.tensor("wte.weight").numpy()[idx])
    w = ckpt.weights()
    assert len(w) == len(reference.param_shapes(ckpt.config)) and not w._memo
    assert w["h.0.ln_1.weight"].dtype == np.float64 and list(w._memo) == ["h.0.ln_1.weight"]


# ------------------------------------------------------------------------------- bad inputs
def _drop(key):
    return lambda t: {k: v for k, v in t.items() if k != key}


def _set(key, value):
    return lambda t: {**t, key: value(t)}


def _poke(key, x):
    def f(t):
        a = t[key].clone()
        a.view(-1)[3] = x
        return {**t, key: a}
    return f


KEY = "transformer.h.0.ln_1.weight"
# name -> (change of the tensors, or None; change of the folder after writing; file that the
# message must name, relative to the folder ("" = the folder); regex of the problem)
BAD = {
    "missing key": (_drop(KEY), None, "", r"missing weights 'h\.0\.ln_1\.weight'"),
    "unexpected key": (_set("transformer.h.0.attn.extra.weight", lambda t: torch.zeros(3)), None,
                       "", r"unexpected weights 'h\.0\.attn\.extra\.weight'"),
    "duplicate key": (_set("h.0.ln_1.weight", lambda t: t[KEY].clone()), None,
                      "model.safetensors", r"'h\.0\.ln_1\.weight' appears twice"),
    "wrong shape": (_set(KEY, lambda t: torch.ones(63)), None, "model.safetensors",
                    r"'transformer\.h\.0\.ln_1\.weight' has shape \[63\], config\.json implies \[64\]"),
    "integer tensor": (_set(KEY, lambda t: torch.ones(64, dtype=torch.int64)), None,
                       "model.safetensors", r"dtype torch\.int64, not float"),
    "nan value": (_poke(KEY, float("nan")), None, "model.safetensors", r"1 non-finite values"),
    "inf value": (_poke("transformer.wte.weight", float("-inf")), None, "model.safetensors",
                  r"'transformer\.wte\.weight' has 1 non-finite values"),
    "unsupported model_type": (None, lambda d: _edit_config(d, model_type="llama"),
                               "config.json", r"unsupported model_type 'llama'"),
    "config not an object": (None, lambda d: (d / "config.json").write_text("[1, 2]"),
                             "config.json", r"not a JSON object"),
    "garbled config.json": (None, lambda d: (d / "config.json").write_text('{"model_type": "gp'),
                            "config.json", r"not valid JSON"),
    "bad config field": (None, lambda d: _edit_config(d, n_head=5), "config.json",
                         r"not divisible by 5 heads"),
    "config field of the wrong type": (None, lambda d: _edit_config(d, layer_norm_epsilon="x"),
                                       "config.json", r"wrong type"),
    "config field unhashable": (None, lambda d: _edit_config(d, activation_function=["gelu"]),
                                "config.json", r"wrong type"),
    "missing config.json": (None, lambda d: (d / "config.json").unlink(), "config.json",
                            r"missing config\.json"),
    "no weights": (None, lambda d: (d / "model.safetensors").unlink(), "",
                   r"no weights \(expected model\.safetensors"),
    "truncated data": (None, lambda d: _truncate(d / "model.safetensors", 100),
                       "model.safetensors", r"truncated: tensor '.*' ends at byte"),
    "truncated header": (None, lambda d: _truncate(d / "model.safetensors", None, keep=20),
                         "model.safetensors", r"corrupt safetensors header length"),
    "truncated to nothing": (None, lambda d: _truncate(d / "model.safetensors", None, keep=3),
                             "model.safetensors", r"truncated \(no safetensors header\)"),
    "header lies about a shape": (None, lambda d: rewrite_header(
        d / "model.safetensors", lambda h: h[KEY].update(shape=[65])),
        "model.safetensors", r"'transformer\.h\.0\.ln_1\.weight' claims shape \[65\] F32 but "
        r"holds 256 bytes"),
    "header lies about offsets": (None, lambda d: rewrite_header(
        d / "model.safetensors", lambda h: _shift_offsets(h, "transformer.ln_f.bias", 10**6)),
        "model.safetensors", r"truncated: tensor 'transformer\.ln_f\.bias' ends at byte"),
    "header offsets overlap": (None, lambda d: rewrite_header(d / "model.safetensors", _overlap),
                               "model.safetensors", r"cannot read tensor '.*' \(.*invalid offset"),
    "header not json": (None, lambda d: _garble_header(d / "model.safetensors"),
                        "model.safetensors", r"unreadable safetensors file"),
}


def _edit_config(d: Path, **fields):
    c = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**c, **fields}))


def _truncate(f: Path, cut: int | None, keep: int | None = None):
    raw = f.read_bytes()
    f.write_bytes(raw[:keep] if keep is not None else raw[:-cut])


def _shift_offsets(h: dict, key: str, by: int):
    lo, hi = h[key]["data_offsets"]
    h[key]["data_offsets"] = [lo + by, hi + by]


def _overlap(h: dict):
    """Two tensors on the same bytes: sizes stay consistent, only the reader sees the lie."""
    h["transformer.ln_f.bias"]["data_offsets"] = h["transformer.ln_f.weight"]["data_offsets"]


def _garble_header(f: Path):
    raw = bytearray(f.read_bytes())
    raw[8:12] = b"\xff\xfe{["
    f.write_bytes(bytes(raw))


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoints_are_refused_naming_file_and_problem(case, tiny_checkpoints, tmp_path):
    change, after, file, problem = BAD[case]
    src = tiny_checkpoints["gpt2"]
    d = new_dir(src, tmp_path / "bad", change(tensors_of(src)) if change else None)
    if after:
        after(d)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d)
    msg = str(e.value)
    named = str(d / file) if file else str(d)
    assert msg.startswith(named + ":"), f"{case}: message does not start with {named}: {msg}"
    assert re.search(problem, msg), f"{case}: message does not say {problem!r}: {msg}"
    assert "\n" not in msg


def test_a_lazy_row_read_of_a_bad_file_is_a_checkpoint_error(tiny_checkpoints, tmp_path):
    d = new_dir(tiny_checkpoints["gpt2"], tmp_path / "overlap")
    rewrite_header(d / "model.safetensors", _overlap)
    ckpt = open_checkpoint(d)  # headers pass the size checks
    with pytest.raises(CheckpointError, match=re.escape(str(d / "model.safetensors"))
                       + r": cannot read tensor 'transformer\.wte\.weight'"):
        ckpt.rows("wte.weight", np.array([1, 2]))


def test_values_are_checked_only_when_asked(tiny_checkpoints, tmp_path):
    """load_checkpoint(check_values=False) reads headers only; validate() then finds the NaN."""
    src = tiny_checkpoints["gpt2"]
    d = new_dir(src, tmp_path / "nan", _poke(KEY, float("nan"))(tensors_of(src)))
    ckpt = load_checkpoint(d, check_values=False)
    with pytest.raises(CheckpointError, match=r"non-finite"):
        ckpt.validate()
    with pytest.raises(CheckpointError, match=r"non-finite"):
        ckpt.weights()["h.0.ln_1.weight"]


def test_a_missing_shard_is_named(tiny_checkpoints, tmp_path):
    src = tiny_checkpoints["gpt_neo"]
    d = new_dir(src, tmp_path / "shards", layout="sharded")
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d)
    assert str(e.value) == (f"{d / 'model.safetensors.index.json'}: shard "
                            "model-00002-of-00002.safetensors is missing")


def test_a_garbled_shard_index_is_named(tiny_checkpoints, tmp_path):
    d = new_dir(tiny_checkpoints["gpt2"], tmp_path / "shards", layout="sharded")
    (d / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(CheckpointError, match=re.escape(str(d / "model.safetensors.index.json"))
                       + r": not a valid shard index"):
        load_checkpoint(d)


def test_not_a_directory(tmp_path):
    with pytest.raises(ParityError, match=r"not a checkpoint directory"):
        load_checkpoint(tmp_path / "nowhere")


# ------------------------------------------------------------------------------- pickled code
class Payload:
    """Unpickling this runs a shell command that creates `sentinel` (what an attacker would do)."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.sentinel))}",))


class Opaque:
    """A plain class instance: harmless, but not a tensor, so refused all the same."""


@pytest.mark.parametrize("layout", ["bin", "bin-sharded"])
def test_pickled_code_is_refused_and_never_runs(layout, tiny_checkpoints, tmp_path):
    src = tiny_checkpoints["gpt2"]
    sentinel = tmp_path / "PWNED"
    d = new_dir(src, tmp_path / "evil", {**tensors_of(src), "evil": Payload(sentinel)},
                layout=layout)
    evil_file = next(f for f in d.glob("pytorch_model*.bin") if b"system" in f.read_bytes())
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d)
    assert str(e.value) == (f"{evil_file}: cannot load (it holds pickled objects other than "
                            "tensors (refused: weights_only=True))")
    assert not sentinel.exists(), "the pickled payload ran"
    # control: the payload is live, so the refusal above is what kept it from running
    torch.load(evil_file, weights_only=False)
    assert sentinel.exists()


def test_class_instances_are_refused(tiny_checkpoints, tmp_path):
    src = tiny_checkpoints["gpt2"]
    d = new_dir(src, tmp_path / "opaque", {**tensors_of(src), "extra": Opaque()}, layout="bin")
    with pytest.raises(CheckpointError, match=re.escape(str(d / "pytorch_model.bin"))
                       + r": cannot load \(.*refused"):
        load_checkpoint(d)


def test_a_bin_that_is_not_a_state_dict(tiny_checkpoints, tmp_path):
    d = new_dir(tiny_checkpoints["gpt2"], tmp_path / "list", {}, layout="bin")
    torch.save([torch.zeros(2)], d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: not a state dict of tensors"):
        load_checkpoint(d)

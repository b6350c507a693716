"""`parity checkpoint make` and `parity trace`, run in-process through parity.cli.main.

What a user relies on: a made checkpoint is a pure function of (family, preset, seed); a trace
file is a parity-golden/1 file whose logits are exactly the reference's on that checkpoint; and
every bad input ends with exit code 2, one `error: ...` line naming the file or option and the
problem, and no output file.
"""
from __future__ import annotations

import fnmatch
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import reference
from parity import cli
from parity.checkpoints.checkpoint import load_checkpoint
from parity.goldens.io import FORMAT, read_golden

FAMILIES = reference.FAMILIES
TOKENS = "0 5 511 17 3; 511 0 2 44 9"  # edge ids 0 and V-1 of the tiny vocab (512)


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """Every family's tiny checkpoint, made through the CLI."""
    root = tmp_path_factory.mktemp("made")
    out = {}
    for f in FAMILIES:
        assert cli.main(["checkpoint", "make", "--family", f, "--out", str(root / f)]) == 0
        out[f] = root / f
    return out


def reference_trace(ckpt_dir: Path, ids, mask=None, pos=None):
    ckpt = load_checkpoint(ckpt_dir)
    return reference.forward(ckpt.config, ckpt.weights(), ids, mask, pos)


def as_ids(tokens: str) -> np.ndarray:
    return np.array([[int(t) for t in row.split()] for row in tokens.split(";")], dtype=np.int64)


# ------------------------------------------------------------------------------- happy paths
@pytest.mark.parametrize("family", FAMILIES)
def test_trace_writes_the_reference_logits(family, made, tmp_path, capsys):
    out = tmp_path / "trace.safetensors"
    rc = cli.main(["trace", str(made[family]), "--impl", "reference", "--tokens", TOKENS,
                   "--out", str(out)])
    cap = capsys.readouterr()
    assert rc == 0 and cap.err == "", cap.err
    assert cap.out.startswith(f"wrote {out}")
    g = read_golden(out)
    ckpt = load_checkpoint(made[family])
    assert g.meta["format"] == FORMAT == "parity-golden/1"
    assert g.meta["family"] == family and g.dtype == "float64"
    assert g.meta["config_sha256"] == ckpt.config.sha256()
    np.testing.assert_array_equal(g.input_ids, as_ids(TOKENS))
    assert g.attention_mask is None and g.position_ids is None  # none given, none written
    ref = reference_trace(made[family], as_ids(TOKENS))
    np.testing.assert_array_equal(g.logits, ref.logits)
    assert list(g.sites) == reference.site_names(family, ckpt.config.n_layer)
    np.testing.assert_array_equal(g.sites["blocks.1.mlp.act"], ref["blocks.1.mlp.act"])


@pytest.mark.parametrize("globs", ["blocks.*.resid_post", "embed,blocks.0.attn.*"])
def test_trace_keeps_only_the_sites_asked_for(globs, made, tmp_path):
    out = tmp_path / "sites.safetensors"
    assert cli.main(["trace", str(made["gpt2"]), "--tokens", "1 2 3", "--sites", globs,
                     "--out", str(out)]) == 0
    every = reference.site_names("gpt2", 4)
    wanted = [s for s in every if any(fnmatch.fnmatchcase(s, p) for p in globs.split(","))]
    assert wanted and list(read_golden(out).sites) == [*wanted, "logits"]


@pytest.mark.parametrize("family", ["gpt2", "gptj", "gpt_neo"])
def test_trace_round_trips_an_inputs_file(family, made, tmp_path):
    ids = np.array([[7, 7, 1, 2, 3, 4], [9, 8, 7, 6, 5, 511]], dtype=np.int64)
    mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=np.int64)
    pos = np.array([[1, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]], dtype=np.int64)
    inputs = tmp_path / "inputs.safetensors"
    save_file({"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
               "position_ids": torch.from_numpy(pos)}, str(inputs))
    out = tmp_path / "trace.safetensors"
    assert cli.main(["trace", str(made[family]), "--inputs", str(inputs), "--out", str(out)]) == 0
    g = read_golden(out)
    np.testing.assert_array_equal(g.input_ids, ids)
    np.testing.assert_array_equal(g.attention_mask, mask)
    np.testing.assert_array_equal(g.position_ids, pos)
    np.testing.assert_array_equal(g.logits, reference_trace(made[family], ids, mask, pos).logits)


def test_checkpoint_make_is_a_function_of_its_seed(tmp_path):
    def make(name, seed):
        assert cli.main(["checkpoint", "make", "--family", "gptj", "--seed", str(seed),
                         "--out", str(tmp_path / name)]) == 0
        return (tmp_path / name / "model.safetensors").read_bytes()

    a, again, other = make("a", 3), make("again", 3), make("other", 4)
    assert a == again
    assert a != other
    assert (tmp_path / "a" / "config.json").read_text() == \
        (tmp_path / "again" / "config.json").read_text()


# ------------------------------------------------------------------------------- --text
SENTENCES_SEED = 0
WORDS = ("the", "a", "model", "token", "layer", "half", "float", "parity", "checkpoint", "golden",
         "runs", "diverges", "matches", "quickly", "slowly", "über", "naïve", "12", "3.5", "!")


def sentences(n: int = 200) -> list[str]:
    rng = random.Random(SENTENCES_SEED)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def train_tokenizer(vocab_size: int = 320):
    """A tiny byte-level BPE (GPT-2's scheme) trained on generated sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sentences(), trainer)
    return tok


@pytest.mark.parametrize("files", ["tokenizer.json", "vocab.json+merges.txt"])
def test_text_is_tokenized_with_the_checkpoint_tokenizer(files, made, tmp_path):
    tok = train_tokenizer()
    assert tok.get_vocab_size() <= 512
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in ("config.json", "model.safetensors"):
        (ckpt / f).write_bytes((made["gpt2"] / f).read_bytes())
    if files == "tokenizer.json":
        tok.save(str(ckpt / "tokenizer.json"))
    else:
        tok.model.save(str(ckpt))
        assert sorted(p.name for p in ckpt.glob("*.*")) == [
            "config.json", "merges.txt", "model.safetensors", "vocab.json"]
    text = "the naïve model diverges quickly!"
    out = tmp_path / "trace.safetensors"
    assert cli.main(["trace", str(ckpt), "--text", text, "--out", str(out)]) == 0
    g = read_golden(out)
    ids = np.array([tok.encode(text).ids], dtype=np.int64)
    assert ids.shape[1] > 1 and tok.decode(ids[0].tolist()) == text
    np.testing.assert_array_equal(g.input_ids, ids)
    np.testing.assert_array_equal(g.logits, reference_trace(ckpt, ids).logits)


# ------------------------------------------------------------------------------- bad inputs
def _inputs_file(tmp: Path, **arrays) -> str:
    f = tmp / "inputs.safetensors"
    save_file({k: torch.as_tensor(np.asarray(v)) for k, v in arrays.items()}, str(f))
    return str(f)


def _text_file(tmp: Path) -> str:
    f = tmp / "inputs.safetensors"
    f.write_text("input_ids: 1 2 3\n")
    return str(f)


# name -> (argv after "trace CKPT" given (ckpt, tmp), regex the one error line must match);
# {ckpt} / {tmp} in the regex stand for those paths
TRACE_ERRORS = {
    "id out of range": (lambda c, t: ["--tokens", "1 512"],
                        r"--tokens: token id 512 is out of range for vocab_size 512"),
    "negative id": (lambda c, t: ["--tokens=-3 4"], r"--tokens: negative token id -3"),
    "empty tokens": (lambda c, t: ["--tokens", ""], r"--tokens: no token ids given"),
    "not an integer": (lambda c, t: ["--tokens", "1 x"], r"--tokens: not an integer"),
    "ragged rows": (lambda c, t: ["--tokens", "1 2; 3"], r"--tokens: rows have different lengths"),
    "too long": (lambda c, t: ["--tokens", " ".join(["1"] * 129)],
                 r"--tokens: sequence of 129 tokens is longer than the model's 128 positions"),
    "inputs not safetensors": (lambda c, t: ["--inputs", _text_file(t)],
                               r"{tmp}/inputs\.safetensors: not a readable safetensors file"),
    "inputs without input_ids": (
        lambda c, t: ["--inputs", _inputs_file(t, attention_mask=np.ones((1, 3), np.int64))],
        r"{tmp}/inputs\.safetensors: has no 'input_ids' tensor"),
    "inputs missing": (lambda c, t: ["--inputs", str(t / "nope.safetensors")],
                       r"{tmp}/nope\.safetensors: no such inputs file"),
    "inputs float ids": (lambda c, t: ["--inputs", _inputs_file(t, input_ids=np.ones((1, 3)))],
                         r"{tmp}/inputs\.safetensors: 'input_ids' must be integer"),
    "inputs mask shape": (lambda c, t: ["--inputs", _inputs_file(
        t, input_ids=np.ones((1, 3), np.int64), attention_mask=np.ones((1, 4), np.int64))],
        r"{tmp}/inputs\.safetensors: 'attention_mask' has shape \[1, 4\], input_ids \[1, 3\]"),
    "inputs mask not 0/1": (lambda c, t: ["--inputs", _inputs_file(
        t, input_ids=np.ones((1, 3), np.int64), attention_mask=np.array([[0, 2, 1]]))],
        r"{tmp}/inputs\.safetensors: attention_mask must hold only 0 and 1"),
    "inputs all padding": (lambda c, t: ["--inputs", _inputs_file(
        t, input_ids=np.ones((1, 3), np.int64), attention_mask=np.zeros((1, 3), np.int64))],
        r"{tmp}/inputs\.safetensors: a row of attention_mask has no real token"),
    "inputs negative position": (lambda c, t: ["--inputs", _inputs_file(
        t, input_ids=np.ones((1, 3), np.int64), position_ids=np.array([[-1, 0, 127]]))],
        r"{tmp}/inputs\.safetensors: position id -1 outside \[0, 128\)"),
    "inputs position too large": (lambda c, t: ["--inputs", _inputs_file(
        t, input_ids=np.ones((1, 3), np.int64), position_ids=np.array([[0, 1, 128]]))],
        r"{tmp}/inputs\.safetensors: position id 128 outside \[0, 128\)"),
    "text without tokenizer": (lambda c, t: ["--text", "hello"],
                               r"{ckpt}: no tokenizer files \(tokenizer\.json, or vocab\.json"),
    "unknown impl": (lambda c, t: ["--impl", "bogus", "--tokens", "1 2"],
                     r"unknown --impl 'bogus' \(choose from reference, fast, hf\)"),
    "unknown dtype": (lambda c, t: ["--dtype", "float8", "--tokens", "1 2"],
                      r"unknown dtype 'float8'"),
    "reference in float32": (lambda c, t: ["--dtype", "float32", "--tokens", "1 2"],
                             r"--impl reference runs in float64"),
    "two input sources": (lambda c, t: ["--tokens", "1 2", "--text", "hi"],
                          r"parity trace: argument --text: not allowed with argument --tokens"),
    "no input source": (lambda c, t: [], r"parity trace: one of the arguments --tokens --text "
                                         r"--inputs is required"),
}


def run_cli(argv, capsys):
    rc = cli.main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_one_error_line(err: str, pattern: str):
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}: {err!r}"
    assert lines[0].startswith("error: "), lines[0]
    assert re.search(pattern, lines[0]), f"{lines[0]!r} does not match {pattern!r}"


@pytest.mark.parametrize("case", list(TRACE_ERRORS))
def test_bad_trace_input_is_one_error_line_and_no_file(case, made, tmp_path, capsys):
    argv_of, pattern = TRACE_ERRORS[case]
    ckpt = made["gpt2"]
    out = tmp_path / "out" / "trace.safetensors"
    rc, stdout, err = run_cli(["trace", str(ckpt), *argv_of(ckpt, tmp_path), "--out", str(out)],
                              capsys)
    assert rc == 2
    assert_one_error_line(err, pattern.format(ckpt=re.escape(str(ckpt)),
                                              tmp=re.escape(str(tmp_path))))
    assert stdout == ""
    assert not out.exists() and not (tmp_path / "out").exists()


def test_a_missing_checkpoint_is_named(tmp_path, capsys):
    out = tmp_path / "t.safetensors"
    rc, _, err = run_cli(["trace", str(tmp_path / "nope"), "--tokens", "1", "--out", str(out)],
                         capsys)
    assert rc == 2 and not out.exists()
    assert_one_error_line(err, f"^error: {tmp_path / 'nope'}: not a checkpoint directory$")


def test_a_broken_checkpoint_is_named(made, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text((made["gpt2"] / "config.json").read_text())
    (ckpt / "model.safetensors").write_bytes((made["gpt2"] / "model.safetensors").read_bytes()[:-9])
    rc, _, err = run_cli(["trace", str(ckpt), "--tokens", "1", "--out", str(tmp_path / "t")],
                         capsys)
    assert rc == 2 and not (tmp_path / "t").exists()
    assert_one_error_line(err, f"^error: {ckpt / 'model.safetensors'}: truncated")


@pytest.mark.parametrize("argv, pattern", [
    (["--family", "llama"], r"unknown family 'llama' \(choose from openai-gpt, gpt2, gpt_neo"),
    (["--family", "gpt2", "--preset", "huge"], r"unknown preset 'huge'"),
    (["--family", "gpt2", "--layers", "0"], r"--layers must be at least 1, got 0"),
    (["--family", "gpt_neo", "--layers", "-1"], r"--layers must be at least 1, got -1"),
    (["--family", "gpt2", "--seed", "x"], r"argument --seed: invalid int value: 'x'"),
    (["--family", "gpt2"], r"the following arguments are required: --out"),
])
def test_bad_checkpoint_make_is_one_error_line_and_no_folder(argv, pattern, tmp_path, capsys):
    out = tmp_path / "ckpt"
    extra = [] if "--out" in pattern else ["--out", str(out)]
    rc, stdout, err = run_cli(["checkpoint", "make", *argv, *extra], capsys)
    assert rc == 2 and stdout == ""
    assert_one_error_line(err, pattern)
    assert not out.exists()


@pytest.mark.parametrize("argv, pattern", [
    ([], r"no command given"),
    (["checkpoint"], r"parity checkpoint: expected 'make'"),
    (["frobnicate"], r"invalid choice: 'frobnicate'"),
])
def test_usage_errors_are_one_error_line(argv, pattern, capsys):
    rc, _, err = run_cli(argv, capsys)
    assert rc == 2
    assert_one_error_line(err, pattern)


def test_no_cuda_is_an_error_not_a_fallback(made, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    out = tmp_path / "t.safetensors"
    rc, _, err = run_cli(["trace", str(made["gpt2"]), "--device", "cuda", "--tokens", "1",
                          "--out", str(out)], capsys)
    assert rc == 2 and not out.exists()
    assert_one_error_line(err, r"--device cuda: no CUDA device is available")


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_prints_a_traceback_then_the_error(where, tmp_path, capsys):
    argv = ["trace", str(tmp_path / "nope"), "--tokens", "1", "--out", str(tmp_path / "t")]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    rc, _, err = run_cli(argv, capsys)
    assert rc == 2
    assert err.startswith("Traceback (most recent call last):")
    assert "CheckpointError" in err
    assert err.splitlines()[-1] == f"error: {tmp_path / 'nope'}: not a checkpoint directory"


def test_an_internal_error_is_still_one_line(made, tmp_path, capsys, monkeypatch):
    """A bug (not bad input) still exits 2 with one line, however long the exception's text."""
    from parity import subjects

    def broken(*a, **k):
        raise RuntimeError("first line\n  second line")

    monkeypatch.setattr(subjects, "run", broken)
    out = tmp_path / "t.safetensors"
    rc, _, err = run_cli(["trace", str(made["gpt2"]), "--tokens", "1", "--out", str(out)], capsys)
    assert rc == 2 and not out.exists()
    assert_one_error_line(err, r"^error: internal error: RuntimeError: first line second line "
                               r"\(rerun with --debug\)$")


def test_an_existing_output_survives_a_failed_trace(made, tmp_path, capsys):
    """Errors leave an earlier trace file as it was (the write is atomic, and comes last)."""
    out = tmp_path / "t.safetensors"
    assert cli.main(["trace", str(made["gpt2"]), "--tokens", "1 2", "--out", str(out)]) == 0
    before = out.read_bytes()
    rc, _, _ = run_cli(["trace", str(made["gpt2"]), "--tokens", "1 999", "--out", str(out)],
                       capsys)
    assert rc == 2 and out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]
    assert read_golden(out).meta["format"] == FORMAT  # still a readable golden

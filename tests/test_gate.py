"""`parity gate` (issue 6), run in-process through parity.cli.main on tiny checkpoints.

What a release engineer relies on: a healthy checkpoint passes (exit 0) with a report folder and
a JUnit file that name every check; a checkpoint whose fast path overflows fails (exit 1) and
the report names the site; NaN weights are a failing verdict, not an error; every bad input
(config, weights, prompts, goldens, policy, report folder, options) is exit 2 with one
`error: ...` line and never a report that says PASS; a golden made on the right weights passes
and the same golden against a converted-wrong checkpoint fails, naming the golden; the
vocabulary check recognises GPT-J's <|extratoken_N|> padding rows; with --impl fast the
bounded-memory lockstep gives exactly the figures of parity.engine.compare.compare.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import reference
from parity import cli
from parity.engine.budgets import DEFAULT_FILE, tolerance
from parity.checkpoints.checkpoint import open_checkpoint
from parity.engine.compare import Subject, compare
from parity.commands.gate import load_prompts, run_gate
from parity.checkpoints.inputs import gate_batch
from parity.checkpoints.recipes import make_checkpoint

REPORT_FILES = ("summary.md", "index.html", "divergence.csv", "run.json")
FAMILIES = reference.FAMILIES
TOKENS = "1 2 3 4 5 6; 7 8 9 10 11 511"  # a golden's inputs (tiny vocab: 512)


# ----------------------------------------------------------------------------- helpers
def gate(capsys, ckpt, *args, report: Path) -> tuple[int, str, str]:
    rc = cli.main(["gate", str(ckpt), "--device", "cpu", "--report", str(report), *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def checks(report: Path) -> dict[str, dict]:
    run = json.loads((report / "run.json").read_text())
    return {c["check"]: c for c in run["checks"]}


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_weights(ckpt: Path, edit) -> Path:
    """Load model.safetensors, let `edit(dict)` change it in place, write it back."""
    f = ckpt / "model.safetensors"
    d = load_file(str(f))
    edit(d)
    save_file(d, str(f), metadata={"format": "pt"})
    return ckpt


def rewrite_golden(src: Path, dst: Path, edit_tensors=None, edit_meta=None) -> Path:
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst), metadata=meta)
    return dst


def bpe_tokenizer(size: int, extra: list[str] = ()):
    """A byte-level BPE tokenizer trained to exactly `size` tokens on seeded pseudo-words, plus
    `extra` added tokens (ids size, size+1, ...)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = np.random.default_rng(0)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    words = ["".join(rng.choice(letters, size=rng.integers(2, 9))) for _ in range(3000)]
    corpus = [" ".join(words[i:i + 20]) for i in range(0, len(words), 20)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    assert tok.get_vocab_size() == size  # the corpus has enough merges
    tok.add_tokens([AddedToken(t) for t in extra])
    return tok


def with_tokenizer(src: Path, dst: Path, size: int, extra: list[str] = ()) -> Path:
    copy_ckpt(src, dst)
    bpe_tokenizer(size, extra).save(str(dst / "tokenizer.json"))
    return dst


@pytest.fixture(scope="module")
def stress_gpt2(tmp_path_factory) -> Path:
    return make_checkpoint("gpt2", tmp_path_factory.mktemp("stress") / "gpt2", preset="stress")


@pytest.fixture(scope="module")
def golden(tiny_checkpoints, tmp_path_factory) -> Path:
    """A float64 golden written by `parity trace --impl reference` on the tiny GPT-2."""
    out = tmp_path_factory.mktemp("golden") / "gpt2-reference.safetensors"
    assert cli.main(["trace", str(tiny_checkpoints["gpt2"]), "--impl", "reference",
                     "--tokens", TOKENS, "--out", str(out)]) == 0
    return out


# ----------------------------------------------------------------------------- healthy checkpoints
@pytest.mark.parametrize("family", FAMILIES)
def test_a_healthy_checkpoint_passes_with_a_full_report(family, tiny_checkpoints, tmp_path,
                                                        capsys):
    rep, junit = tmp_path / "rep", tmp_path / "ci" / "gate.xml"
    rc, out, err = gate(capsys, tiny_checkpoints[family], "--junit", junit, report=rep)
    assert (rc, err) == (0, ""), err
    assert "verdict: PASS" in out
    for f in REPORT_FILES:
        assert (rep / f).is_file() and (rep / f).stat().st_size > 0, f
    c = checks(rep)
    assert list(c) == ["structure", "tokenizer", "subject", "determinism", "cache", "batch",
                       "generation"]
    # no tokenizer files in a made checkpoint: that row is skipped, every other passes
    assert c["tokenizer"]["verdict"] == "skip"
    assert {k: v["verdict"] for k, v in c.items() if k != "tokenizer"} == dict.fromkeys(
        ["structure", "subject", "determinism", "cache", "batch", "generation"], "pass")
    assert c["structure"]["figures"]["family"] == family
    assert c["subject"]["figures"]["sites_over_budget"] == 0
    assert c["determinism"]["figures"]["sites_differing"] == 0
    summary = (rep / "summary.md").read_text()
    assert "Overall verdict: PASS" in summary
    for name in ("structure", "subject", "determinism", "cache", "batch", "generation"):
        assert f"| {name} | pass |" in summary
    assert c["generation"]["figures"]["exact_match"] == 1.0  # greedy tokens as the reference's
    assert "## Generation" in summary
    div = pd.read_csv(rep / "divergence.csv")
    assert set(div["family"]) == {family} and set(div["mode"]) == {"accumulated", "local"}
    assert (div["verdict"] == "pass").all() and "logits" in set(div["site"])
    suite = ET.parse(junit).getroot()
    assert suite.tag == "testsuite" and suite.get("tests") == "7" and suite.get("failures") == "0"
    cases = suite.findall("testcase")
    assert [t.get("name") for t in cases] == list(c)
    assert not suite.findall(".//failure") and not suite.findall(".//error")


def test_stress_gpt2_overflows_in_hf_numerics_and_passes_in_megatron_numerics(
        stress_gpt2, tmp_path, capsys):
    rep, junit = tmp_path / "hf", tmp_path / "hf.xml"
    rc, out, err = gate(capsys, stress_gpt2, "--junit", junit, report=rep)
    assert (rc, err) == (1, ""), err
    assert "verdict: FAIL" in out
    c = checks(rep)
    assert c["structure"]["verdict"] == "pass" and c["subject"]["verdict"] == "fail"
    detail = c["subject"]["detail"]
    assert re.search(r"blocks\.\d+\.attn\.scores", detail) and "non-finite" in detail, detail
    assert c["subject"]["figures"]["nonfinite"] > 0
    assert "Overall verdict: FAIL" in (rep / "summary.md").read_text()
    suite = ET.parse(junit).getroot()
    assert suite.get("failures") == "4"
    failing = [t.get("name") for t in suite.findall("testcase") if t.find("failure") is not None]
    # the overflow fails every check that runs the subject: one forward, the cache, the padded
    # batch, greedy decoding (determinism holds: the same infs twice)
    assert failing == ["subject", "cache", "batch", "generation"]
    assert "attn.scores" in suite.find("testcase[@name='subject']/failure").get("message")

    rep = tmp_path / "meg"
    rc, out, err = gate(capsys, stress_gpt2, "--variant", "meg", report=rep)
    assert (rc, err) == (0, ""), err
    assert {k: v["verdict"] for k, v in checks(rep).items() if k != "tokenizer"} == dict.fromkeys(
        ["structure", "subject", "determinism", "cache", "batch", "generation"], "pass")


def test_nan_weights_are_a_failing_verdict_naming_the_tensor(tiny_checkpoints, tmp_path,
                                                             capsys, golden):
    def poison(d):
        d["transformer.h.1.mlp.c_fc.weight"][3, 5] = float("nan")
        d["transformer.h.2.attn.c_proj.bias"][0] = float("inf")

    ck = rewrite_weights(copy_ckpt(tiny_checkpoints["gpt2"], tmp_path / "nan"), poison)
    rep, junit = tmp_path / "rep", tmp_path / "nan.xml"
    rc, out, err = gate(capsys, ck, "--golden", golden, "--junit", junit, report=rep)
    assert (rc, err) == (1, ""), err
    c = checks(rep)
    assert c["structure"]["verdict"] == "fail"
    assert "h.1.mlp.c_fc.weight" in c["structure"]["detail"]
    assert "h.2.attn.c_proj.bias" in c["structure"]["detail"]
    for name in ("subject", "determinism", "cache", "batch", "generation", f"golden:{golden.name}"):
        assert c[name]["verdict"] == "skip", name
    assert "Overall verdict: FAIL" in (rep / "summary.md").read_text()
    suite = ET.parse(junit).getroot()
    assert (suite.get("failures"), suite.get("skipped")) == ("1", "7")  # tokenizer: no files
    assert suite.find("testcase[@name='structure']/failure") is not None


def test_a_policy_file_sets_the_budgets(tiny_checkpoints, tmp_path, capsys):
    """The same healthy run fails under a policy whose floor-ratio budget no fp16 path can meet
    (the embedding's fp16 rounding is the floor itself: ratio 1)."""
    text = DEFAULT_FILE.read_text()
    policy = tmp_path / "strict.toml"
    policy.write_text(text + '\n[[overrides]]\nsite = "*"\nfloor_ratio_warn = 0.5\n'
                      'floor_ratio_fail = 0.5\nreason = "test: a budget below the floor"\n')
    rep = tmp_path / "rep"
    rc, out, err = gate(capsys, tiny_checkpoints["gpt2"], "--policy", policy, report=rep)
    assert (rc, err) == (1, ""), err
    c = checks(rep)
    assert c["structure"]["verdict"] == "pass" and c["subject"]["verdict"] == "fail"


# ----------------------------------------------------------------------------- bad inputs
class _Sentinel:
    """Unpickling this runs os.mkdir(path): proof that pickled code was executed."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _bin_with_code(ck: Path, sentinel: Path) -> None:
    sd = load_file(str(ck / "model.safetensors"))
    (ck / "model.safetensors").unlink()
    sd["sentinel"] = _Sentinel(str(sentinel))
    torch.save(sd, ck / "pytorch_model.bin")


def _lying_header(f: Path) -> None:
    """wte claims twice its width; offsets (and bytes) unchanged."""
    b = f.read_bytes()
    n = int.from_bytes(b[:8], "little")
    header = json.loads(b[8:8 + n])
    header["transformer.wte.weight"]["shape"] = [512, 128]
    h = json.dumps(header).encode()
    f.write_bytes(len(h).to_bytes(8, "little") + h + b[8 + n:])


def _config(ck: Path, **changes) -> None:
    cfg = json.loads((ck / "config.json").read_text())
    cfg.update(changes)
    (ck / "config.json").write_text(json.dumps(cfg))


def _golden_case(kind):
    def build(tmp, ckpts, golden):
        g = tmp / f"{kind}.safetensors"
        if kind == "format":
            rewrite_golden(golden, g, edit_meta=lambda m: m.update(format="parity-golden/0"))
        elif kind == "nologits":
            rewrite_golden(golden, g, edit_tensors=lambda t: t.pop("logits"))
        elif kind == "ids":
            def ids(t):
                t["input_ids"][0, 2] = 600
            rewrite_golden(golden, g, edit_tensors=ids)
        elif kind == "vocab":
            rewrite_golden(golden, g, edit_tensors=lambda t: t.update(
                logits=t["logits"][:, :, :500].clone()))
        elif kind == "family":
            rewrite_golden(golden, g, edit_meta=lambda m: m.update(family="gptmeg"))
        return ["--golden", g]
    return build


def _prompts(text: str, name="prompts.txt"):
    def build(tmp, ckpts, golden):
        p = tmp / name
        p.write_text(text)
        return ["--prompts", p]
    return build


def _ckpt(edit):
    """A broken copy of the tiny GPT-2 as the checkpoint argument."""
    def build(tmp, ckpts, golden):
        ck = copy_ckpt(ckpts["gpt2"], tmp / "ck")
        edit(ck, tmp)
        return [ck]
    return build


def _policy(text):
    def build(tmp, ckpts, golden):
        p = tmp / "policy.toml"
        p.write_text(text.replace("{default}", DEFAULT_FILE.read_text()))
        return ["--policy", p]
    return build


def _unwritable_report(tmp, ckpts, golden):
    (tmp / "afile").write_text("not a folder")
    return ["--report", tmp / "afile" / "rep"]


def _drop(key):
    return lambda d: d.pop(key)


def _transpose(key):
    return lambda d: d.update({key: d[key].T.contiguous()})


# (case id, argv builder, substrings the error line must contain). A readable checkpoint whose
# weights do not match its config is not bad input but a structure FAIL (tests/test_gate_verdicts.py)
BAD_INPUTS = [
    ("missing-config", _ckpt(lambda ck, t: (ck / "config.json").unlink()), ["config.json",
                                                                             "missing"]),
    ("garbled-config", _ckpt(lambda ck, t: (ck / "config.json").write_text('{"model_type": "g')),
     ["config.json", "not valid JSON"]),
    ("unsupported-model-type", _ckpt(lambda ck, t: _config(ck, model_type="llama")),
     ["config.json", "unsupported model_type 'llama'"]),
    ("truncated-safetensors", _ckpt(lambda ck, t: (ck / "model.safetensors").write_bytes(
        (ck / "model.safetensors").read_bytes()[:100_000])), ["model.safetensors", "truncated"]),
    ("lying-safetensors-header", _ckpt(lambda ck, t: _lying_header(ck / "model.safetensors")),
     ["model.safetensors", "transformer.wte.weight", "claims shape [512, 128]"]),
    ("pickled-code-in-bin", _ckpt(lambda ck, t: _bin_with_code(ck, t / "SENTINEL")),
     ["pytorch_model.bin", "pickled"]),
    ("nonexistent-checkpoint", lambda t, c, g: [t / "no-such-dir"],
     ["no-such-dir", "not a checkpoint directory"]),
    ("prompt-id-out-of-range", _prompts("ids: 1 2 3\nids: 4 5 512\n"),
     ["prompts.txt", "token id 512", "vocab_size 512"]),
    ("prompt-too-long", _prompts("ids: " + " ".join(["7"] * 129) + "\n"),
     ["prompts.txt", "129 tokens", "128 positions"]),
    ("text-prompts-without-tokenizer", _prompts("hello world\n"),
     ["prompts.txt", "no tokenizer files"]),
    ("empty-prompts", _prompts("\n\n"), ["prompts.txt", "no prompts"]),
    ("golden-wrong-format-tag", _golden_case("format"), ["format.safetensors", "format tag"]),
    ("golden-without-logits", _golden_case("nologits"), ["nologits.safetensors", "'logits'"]),
    ("golden-ids-beyond-vocab", _golden_case("ids"),
     ["ids.safetensors", "token id 600", "vocab_size 512"]),
    ("golden-shape-mismatch", _golden_case("vocab"),
     ["vocab.safetensors", "logits", "[2, 6, 500]", "[2, 6, 512]"]),
    ("golden-other-family", _golden_case("family"), ["family.safetensors", "gptmeg"]),
    ("golden-missing-file", lambda t, c, g: ["--golden", t / "nope.safetensors"],
     ["nope.safetensors"]),
    ("garbled-policy", _policy('schema = "parity-budgets/1"\n[defaults.float16\n'),
     ["policy.toml", "not valid TOML"]),
    ("policy-override-without-reason", _policy(
        '{default}\n[[overrides]]\nsite = "logits"\nkl_max = 1.0\n'),
     ["policy.toml", "overrides[0] has no reason"]),
    ("unwritable-report-folder", _unwritable_report, ["afile", "cannot create the report folder"]),
    ("unknown-impl", lambda t, c, g: ["--impl", "torchscript"], ["--impl", "torchscript"]),
    ("unknown-device", lambda t, c, g: ["--device", "tpu"], ["--device", "tpu"]),
]


@pytest.mark.parametrize("case,build,expect", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_exit_2_with_one_error_line_and_no_pass(case, build, expect,
                                                             tiny_checkpoints, golden, tmp_path,
                                                             capsys):
    args = build(tmp_path, tiny_checkpoints, golden)
    ckpt = args.pop(0) if args and not str(args[0]).startswith("--") else tiny_checkpoints["gpt2"]
    opts = {"--device": "cpu", "--report": tmp_path / "rep"}
    for flag in opts:  # a case may bring its own --device / --report
        if flag in args:
            i = args.index(flag)
            opts[flag] = args.pop(i + 1)
            args.pop(i)
    rep = Path(opts["--report"])
    rc = cli.main(["gate", str(ckpt), *(str(x) for kv in opts.items() for x in kv),
                   *map(str, args)])
    out, err = capsys.readouterr()
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert rc == 2, (case, rc, out, err)
    assert len(errors) == 1 and len(err.strip().splitlines()) == 1, err
    assert "internal error" not in err and "Traceback" not in out + err, err
    for s in expect:
        assert s in errors[0], (s, errors[0])
    assert "PASS" not in out
    for f in REPORT_FILES:
        assert not (rep / f).exists(), f"{case}: {f} written after an error"
    if case == "pickled-code-in-bin":
        assert not (tmp_path / "SENTINEL").exists(), "pickled code was executed"


def test_the_pickle_sentinel_fires_when_unpickled_without_protection(tmp_path):
    """The sentinel above is a real payload: a plain torch.load runs it (so the bad-input case
    proves that the gate did not)."""
    ck = copy_ckpt(make_checkpoint("gpt2", tmp_path / "src", layers=1), tmp_path / "ck")
    _bin_with_code(ck, tmp_path / "SENTINEL")
    torch.load(ck / "pytorch_model.bin", weights_only=False)
    assert (tmp_path / "SENTINEL").is_dir()


# ----------------------------------------------------------------------------- prompts
def test_token_id_prompts_of_different_lengths_are_left_padded_and_pass(tiny_checkpoints,
                                                                        tmp_path, capsys):
    ck = tiny_checkpoints["gpt_neo"]
    p = tmp_path / "ids.txt"
    p.write_text("ids: 464 3 290 318 11 7 8 9 10 12 13\n\nids: 5, 6, 7\nids:1 2 3 4 5 6 7 8 9 10 11\n")
    inp = load_prompts(str(p), open_checkpoint(ck))
    assert inp.input_ids.shape == (3, 11)
    assert inp.attention_mask[1].tolist() == [0] * 8 + [1] * 3
    assert inp.input_ids[1, -3:].tolist() == [5, 6, 7]
    assert inp.position_ids[1, -3:].tolist() == [0, 1, 2]
    rep = tmp_path / "rep"
    rc, out, err = gate(capsys, ck, "--prompts", p, report=rep)
    assert (rc, err) == (0, ""), err
    assert {v["verdict"] for k, v in checks(rep).items() if k != "tokenizer"} == {"pass"}
    run = json.loads((rep / "run.json").read_text())
    assert run["subject"]["prompts"] == str(p)


def test_text_prompts_are_tokenized_with_the_checkpoint_tokenizer_and_pass(tiny_checkpoints,
                                                                           tmp_path, capsys):
    ck = with_tokenizer(tiny_checkpoints["gpt2"], tmp_path / "ck", 512)
    p = tmp_path / "text.txt"
    texts = ["the quick brown fox jumps over the lazy dog", "hello world"]
    p.write_text("\n".join(texts) + "\n")
    tok = bpe_tokenizer(512)
    want = [tok.encode(t).ids for t in texts]
    inp = load_prompts(str(p), open_checkpoint(ck))
    t = max(map(len, want))
    for row, ids in enumerate(want):
        assert inp.input_ids[row, t - len(ids):].tolist() == ids
        assert inp.attention_mask[row].sum() == len(ids)
    rep = tmp_path / "rep"
    rc, out, err = gate(capsys, ck, "--prompts", p, report=rep)
    assert (rc, err) == (0, ""), err
    c = checks(rep)
    assert {v["verdict"] for v in c.values()} == {"pass"}
    assert c["structure"]["figures"]["tokenizer_size"] == 512


# ----------------------------------------------------------------------------- vocabulary
def test_gptj_padding_rows_are_recognised(tiny_checkpoints, tmp_path, capsys):
    k = 12  # the real GPT-J has 143 (<|extratoken_1|> .. <|extratoken_143|>)
    ck = with_tokenizer(tiny_checkpoints["gptj"], tmp_path / "ck", 512 - k,
                        [f"<|extratoken_{i}|>" for i in range(1, k + 1)])
    rep = tmp_path / "rep"
    rc, out, err = gate(capsys, ck, report=rep)
    assert (rc, err) == (0, ""), err
    s = checks(rep)["structure"]
    assert s["verdict"] == "pass"
    assert s["figures"]["padding_rows"] == k
    assert s["figures"]["tokenizer_size"] == s["figures"]["embedding_rows"] == 512
    assert f"ids {512 - k}..511" in s["detail"]


def test_a_tokenizer_beyond_the_embedding_fails(tiny_checkpoints, tmp_path, capsys):
    ck = with_tokenizer(tiny_checkpoints["gpt2"], tmp_path / "ck", 512, ["<|a|>", "<|b|>"])
    rep = tmp_path / "rep"
    rc, out, err = gate(capsys, ck, report=rep)
    assert (rc, err) == (1, ""), err
    c = checks(rep)
    assert c["structure"]["verdict"] == "fail"
    assert "tokenizer ids reach 513" in c["structure"]["detail"]
    assert "512 rows" in c["structure"]["detail"]


def test_unused_embedding_rows_warn_outside_gptj(tiny_checkpoints, tmp_path, capsys):
    ck = with_tokenizer(tiny_checkpoints["gpt2"], tmp_path / "ck", 500)
    rep = tmp_path / "rep"
    rc, out, err = gate(capsys, ck, report=rep)
    assert (rc, err) == (0, ""), err  # a warning is not a failure
    s = checks(rep)["structure"]
    assert s["verdict"] == "warn"
    assert "12 embedding rows beyond the tokenizer" in s["detail"]
    assert json.loads((rep / "run.json").read_text())["verdict"] == "warn"


# ----------------------------------------------------------------------------- goldens
def test_a_reference_golden_passes_on_its_own_checkpoint(tiny_checkpoints, golden, tmp_path,
                                                         capsys):
    rep = tmp_path / "rep"
    rc, out, err = gate(capsys, tiny_checkpoints["gpt2"], "--golden", golden, report=rep)
    assert (rc, err) == (0, ""), err
    g = checks(rep)[f"golden:{golden.name}"]
    assert g["verdict"] == "pass"
    assert g["figures"]["tolerance_name"] == "golden_float64"
    assert g["figures"]["sites"] > 50 and g["figures"]["sites_failed"] == 0
    assert g["figures"]["worst_rel"] <= tolerance("golden_float64")


def _swap_layers(d, a=1, b=2):
    for k in [k for k in d if k.startswith(f"transformer.h.{a}.")]:
        kb = k.replace(f".h.{a}.", f".h.{b}.")
        d[k], d[kb] = d[kb], d[k]


def _scale(d, key="transformer.h.1.mlp.c_fc.weight", rel=1e-4):
    d[key] = d[key] * (1 + rel)


CONVERSION_BUGS = {
    "one-weight-scaled-by-1e-4": _scale,
    "square-projection-transposed": _transpose("transformer.h.2.attn.c_proj.weight"),
    "two-layers-swapped": _swap_layers,
}


@pytest.mark.parametrize("bug", list(CONVERSION_BUGS))
def test_the_golden_catches_a_conversion_bug_the_subject_check_cannot(
        bug, tiny_checkpoints, golden, tmp_path, capsys):
    ck = rewrite_weights(copy_ckpt(tiny_checkpoints["gpt2"], tmp_path / "ck"),
                         CONVERSION_BUGS[bug])
    rep, junit = tmp_path / "rep", tmp_path / "g.xml"
    rc, out, err = gate(capsys, ck, "--golden", golden, "--junit", junit, report=rep)
    assert (rc, err) == (1, ""), err
    c = checks(rep)
    g = c[f"golden:{golden.name}"]
    assert g["verdict"] == "fail" and str(golden) in g["detail"]
    assert g["figures"]["worst_rel"] > tolerance("golden_float64")
    # the wrong weights still make a self-consistent model: fast path and reference agree
    assert c["subject"]["verdict"] == "pass" and c["structure"]["verdict"] == "pass"
    failing = [t.get("name") for t in ET.parse(junit).getroot().findall("testcase")
               if t.find("failure") is not None]
    assert failing == [f"golden:{golden.name}"]


def test_a_float32_golden_passes_and_a_1e4_change_fails_it(tiny_checkpoints, tmp_path, capsys):
    """The tolerance of a float32 golden (another framework's precision) is tight enough that a
    1e-4 relative change of one weight fails it."""
    g = tmp_path / "fp32.safetensors"
    assert cli.main(["trace", str(tiny_checkpoints["gpt2"]), "--impl", "fast", "--variant",
                     "fp32", "--dtype", "float32", "--tokens", TOKENS, "--out", str(g)]) == 0
    capsys.readouterr()
    rc, _, err = gate(capsys, tiny_checkpoints["gpt2"], "--golden", g, report=tmp_path / "a")
    assert (rc, err) == (0, ""), err
    ok = checks(tmp_path / "a")[f"golden:{g.name}"]
    assert ok["verdict"] == "pass" and ok["figures"]["tolerance_name"] == "golden_float32"
    ck = rewrite_weights(copy_ckpt(tiny_checkpoints["gpt2"], tmp_path / "ck"), _scale)
    rc, _, err = gate(capsys, ck, "--golden", g, report=tmp_path / "b")
    assert (rc, err) == (1, ""), err
    bad = checks(tmp_path / "b")[f"golden:{g.name}"]
    assert bad["verdict"] == "fail" and str(g) in bad["detail"]
    assert bad["figures"]["worst_rel"] > tolerance("golden_float32")


# ----------------------------------------------------------------------------- lockstep
def test_lockstep_figures_equal_compare(tiny_checkpoints):
    """--impl fast runs reference, floor and subject one layer at a time; the figures must be
    those of the whole-model comparison, site by site and in both modes."""
    ck_dir = tiny_checkpoints["gptj"]
    res = run_gate(str(ck_dir))
    ck = open_checkpoint(ck_dir)
    want = compare(ck, gate_batch(ck.config, seed=0), [Subject()], label=ck_dir.name)
    key = ["mode", "site"]  # lockstep emits layer by layer, compare mode by mode
    got = res.divergence.sort_values(key, kind="stable").reset_index(drop=True)
    want = want.sort_values(key, kind="stable").reset_index(drop=True)
    assert len(got) == len(want) > 0 and not got.duplicated(key).any()
    assert got[key].values.tolist() == want[key].values.tolist()
    for col in ("rel_l2", "floor_ratio", "max_abs", "max_ulp", "nonfinite", "headroom", "top1",
                "kl"):
        assert np.array_equal(got[col].to_numpy(float), want[col].to_numpy(float),
                              equal_nan=True), col
    assert got["verdict"].tolist() == want["verdict"].tolist()

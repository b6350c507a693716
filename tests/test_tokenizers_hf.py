"""transformers' own tokenizer classes as a second oracle for the tokenizer reference (issue 8).

What it pins: the file-layout rules (`reference.tokenizers.read_layout`, shared by the reference
and `parity.checkpoints.tokenizer_check.build_tokenizer`) read vocab.json + merges.txt (+ added_tokens.json)
the way transformers' GPT2Tokenizer and OpenAIGPTTokenizer do: same ids on the gate's built-in
texts, generated corpus lines and drawn texts, <|endoftext|> and GPT-J's extra tokens included.
"""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import reference.tokenizers as rt  # noqa: E402
from parity.checkpoints import tokenizer_check as tc  # noqa: E402
from tests.strategies import texts  # noqa: E402
from tests.tokenizer_fixtures import corpus, write_tokenizer  # noqa: E402

pytestmark = pytest.mark.hf

CASES = [("gpt2", "slow"), ("gptj", "slow"), ("openai-gpt", "slow"), ("gptj", "all"),
         ("openai-gpt", "all")]
ADDED = ("<|endoftext|>", "<|extratoken_3|>", "<unk>")


@pytest.fixture(scope="module")
def tokenizer_trios(tmp_path_factory):
    """(kind, files) -> (reference, build_tokenizer's, transformers')."""
    import transformers

    root = tmp_path_factory.mktemp("tok-hf")
    out = {}
    for kind, files in CASES:
        d = write_tokenizer(kind, root / f"{kind}-{files}", files=files)
        cls = (transformers.OpenAIGPTTokenizer if kind == "openai-gpt"
               else transformers.GPT2Tokenizer)
        out[kind, files] = (rt.load(d), tc.build_tokenizer(d), cls.from_pretrained(str(d)))
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c))
def test_layout_reads_like_transformers(tokenizer_trios, case):
    ref, built, hf = tokenizer_trios[case]
    assert len(ref) == len(hf) == built.get_vocab_size(with_added_tokens=True)
    for text in [*tc.BUILTIN_TEXTS, *corpus(21, 80)]:
        want = hf(text)["input_ids"]
        assert ref.encode(text) == want, text
        assert built.encode(text).ids == want, text


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c))
@given(data=st.data())
def test_drawn_texts_read_like_transformers(tokenizer_trios, case, data):
    ref, _, hf = tokenizer_trios[case]
    text = data.draw(texts(added=ADDED), label="text")
    ids = hf(text)["input_ids"]
    assert ref.encode(text) == ids
    assert ref.decode(ids) == hf.decode(ids, skip_special_tokens=True)

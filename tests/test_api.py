"""`parity.compare(...)`: the notebook entry point of DESIGN's comparison API."""
import numpy as np
import pandas as pd
import pytest

import parity
from parity.checkpoints.checkpoint import load_checkpoint
from parity.engine.compare import COLUMNS, Subject, compare
from parity.errors import ParityError
from parity.checkpoints.inputs import default_batch


def test_parity_compare_is_the_long_frame(tiny_checkpoints):
    path = tiny_checkpoints["gpt2"]
    df = parity.compare(str(path), variants=["hf", "meg"], dtypes=["fp16", "bf16"])
    assert isinstance(df, pd.DataFrame) and list(df.columns) == COLUMNS
    assert set(df["variant"]) == {"hf", "meg"} and set(df["dtype"]) == {"float16", "bfloat16"}
    assert set(df["mode"]) == {"accumulated", "local"}
    # the same figures as the engine's own call on the same inputs
    ckpt = load_checkpoint(path)
    direct = compare(ckpt, default_batch(ckpt.config, 16),
                     [Subject(variant=v, dtype=d) for v in ("hf", "meg")
                      for d in ("float16", "bfloat16")],
                     label=path.name)
    pd.testing.assert_frame_equal(df.reset_index(drop=True), direct.reset_index(drop=True))


def test_parity_compare_takes_token_ids(tiny_checkpoints):
    df = parity.compare(tiny_checkpoints["gptj"], np.array([[1, 2, 3, 4, 5]]), variants="meg")
    logits = df[df["site"] == "logits"]
    assert len(logits) == 2 and (logits["verdict"] == "pass").all()


def test_parity_compare_refuses_bad_ids(tiny_checkpoints):
    with pytest.raises(ParityError, match="out of range"):
        parity.compare(tiny_checkpoints["gpt2"], np.array([[1, 2, 10**6]]))


def test_help_shows_one_public_function_with_its_real_signature():
    import inspect

    from parity import api
    from parity.engine import compare as engine

    f = parity.compare
    assert f is api.compare and f.__name__ == "compare"
    params = inspect.signature(f).parameters
    assert list(params)[:2] == ["checkpoint", "inputs"]
    assert {"variants", "dtypes", "device", "emulate", "modes", "policy", "label"} <= set(params)
    assert "InputError" in f.__doc__ and "left-padded" in f.__doc__
    assert api.MODES == engine.MODES
    assert not hasattr(engine, "run")  # no second entry point with another signature


@pytest.mark.parametrize("bad,needles", [
    ([[1.5, 2.0]], ["row 0 holds 1.5", "token ids are integers"]),
    (np.array([[1.5, 2.0]]), ["array of float64", "token ids must be integers"]),
    ([[1, 2], "x"], ["row 1 is str", "expected a list of token ids"]),
    ([[1, 2], []], ["row 1 is empty"]),
    ({"input_ids": [1, 2]}, ["got dict", "expected an Inputs"]),
    (np.zeros((1, 2, 3), np.int64), ["1-D or 2-D", "[1, 2, 3]"]),
])
def test_bad_input_raises_a_typed_error_that_says_what_is_expected(bad, needles,
                                                                   tiny_checkpoints):
    from parity.errors import InputError

    with pytest.raises(InputError) as e:
        parity.compare(tiny_checkpoints["gpt2"], bad)
    assert isinstance(e.value, ValueError)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_text_without_tokenizer_files_says_so(tiny_checkpoints):
    with pytest.raises(ParityError, match="tokenizer"):
        parity.compare(tiny_checkpoints["gpt2"], "hello world")


def test_ragged_rows_are_left_padded_and_compared(tiny_checkpoints):
    """Rows of different lengths become a left-padded batch: the same figures for the shorter
    row as when it is run on its own (the padding is masked, positions count from its first
    token)."""
    ck = tiny_checkpoints["gpt2"]
    both = parity.compare(ck, [[5, 6, 7, 8], [9, 10]], variants="meg", dtypes="fp32",
                          modes=("accumulated",))
    assert (both["verdict"].isin(["pass", "not_exposed"])).all()
    from parity.checkpoints.inputs import as_inputs

    inp = as_inputs([[5, 6, 7, 8], [9, 10]], ck)
    assert inp.attention_mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert inp.position_ids[1].tolist() == [0, 0, 0, 1]

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

"""Small shared helpers: atomic writes, padding, the deterministic split."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import lens_roles as lr
from lens_roles.inputs.sets import split_point
from lens_roles.io import atomic_write, write_csv
from lens_roles.runtime.batching import pad_batch


def test_atomic_write_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "sub" / "out.csv"

    def failing(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, failing)
    assert list((tmp_path / "sub").iterdir()) == []
    write_csv(pd.DataFrame({"a": [1]}), target)
    assert target.read_text() == "a\n1\n" and list((tmp_path / "sub").iterdir()) == [target]


def test_pad_batch_right_and_left():
    tokens, mask = pad_batch([[1, 2, 3], [4]], pad=0)
    assert tokens.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    tokens, mask = pad_batch([[1, 2, 3], [4], []], pad=9, side="left")
    assert tokens.tolist() == [[1, 2, 3], [9, 9, 4], [9, 9, 9]] and mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert tokens.dtype == mask.dtype == torch.long


def test_split_point_and_set_splits():
    assert split_point(72, 0.75) == 54 and split_point(2, 0.99) == 1 and split_point(2, 0.01) == 1
    with pytest.raises(lr.DataError, match="split fraction"):
        split_point(10, 1.0)
    with pytest.raises(lr.DataError, match="1 item"):
        lr.PromptSet("one", (lr.Prompt("x"),)).split(0.75)
    pairs = lr.PairSet("p", tuple(lr.ContrastPair(f"u{i}", "a", "b") for i in range(8)))
    train, held = pairs.split(0.75)
    assert (len(train), len(held)) == (6, 2) and train.pairs + held.pairs == pairs.pairs

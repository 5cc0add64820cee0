"""What a person is told that they would otherwise not know (issue 20): fewer misclassified queries than
``queries.n`` asked for, why a list of a result is empty."""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_fastif.cli.inputs import QuerySelection, _select_queries


def test_fewer_misclassified_queries_than_asked_for_are_announced(caplog):
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
        model.bias.zero_()
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    y = torch.tensor([0, 0, 0, 1, 1])  # the model predicts argmax(x): ids 1 and 4 are wrong
    with caplog.at_level(logging.INFO):
        ids = _select_queries(model, TensorDataset(x, y), None, QuerySelection(n=20))
    assert ids == [1, 4]
    (line,) = [r.getMessage() for r in caplog.records if "queries.n" in r.getMessage()]
    assert "queries.n=20 asked for, but the model gets only 2 of the 5 test examples wrong" in line
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert _select_queries(model, TensorDataset(x, y), None, QuerySelection(n=2)) == [1, 4]
    assert not [r for r in caplog.records if "queries.n" in r.getMessage()]


def test_an_empty_harmful_or_helpful_list_says_why():
    from lightning_fastif.influence.predict import result_flags

    some, none = torch.tensor([3, 5]), torch.tensor([], dtype=torch.long)
    (flag,) = result_flags(0.4, some, none)
    assert flag.startswith("no_harmful: no candidate has a positive score")
    (flag,) = result_flags(0.4, none, some)
    assert flag.startswith("no_helpful: no candidate has a negative score")
    assert result_flags(0.4, some, some) == []


def test_self_influence_prints_the_head_of_its_ranking():
    from lightning_fastif.reporting.self_influence_html import screen_ranking

    records = [
        {"rank": r + 1, "train_id": i, "self_influence": v, "loss": 2.0 - r, "label": r}
        for r, (i, v) in enumerate([(17, 9.5), (3, 4.25), (40, 0.5)])
    ]
    text = screen_ranking(records, class_names=["zero", "one", "two"], top=2)
    lines = text.splitlines()
    assert lines[0].startswith(
        "lightning_fastif: the 2 training examples most likely mislabelled or atypical"
    )
    assert lines[2].split() == ["1", "17", "9.5", "2", "0", "(zero)"]
    assert lines[3].split() == ["2", "3", "4.25", "1", "1", "(one)"] and len(lines) == 4


def test_dependency_lines_nobody_can_act_on_are_dropped():
    import warnings

    from lightning_fastif.cli.support import _WANDB_ANONYMOUS, LightningInfoGate, quiet_dependency_noise

    gate = LightningInfoGate()

    def record(text):
        return logging.LogRecord("lightning.pytorch", logging.INFO, "", 0, text, None, None)

    assert not gate.filter(record("GPU available: False, used: False"))
    assert not gate.filter(record("TPU available: False, using: 0 TPU cores"))
    assert gate.filter(record("GPU available: True (cuda), used: True"))  # a GPU is worth a line
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_dependency_noise(wandb=True)
        warnings.warn(
            "`isinstance(treespec, LeafSpec)` is deprecated, use ...", DeprecationWarning, stacklevel=1
        )
        warnings.warn("something else", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else"]
    from wandb.errors import term

    assert f"{term.WARN_STRING} {_WANDB_ANONYMOUS}" in term._printed_messages

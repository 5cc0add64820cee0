"""Feature extraction: the input of the feature layer, in order, in eval mode, with no hook left behind."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from lightning_fastif.errors import ConfigurationError
from lightning_fastif.retrieval.features import (
    extract_features,
    extract_features_and_outputs,
    find_feature_layer,
    ordered_loader,
)


class Net(nn.Module):
    """Registers ``head`` before ``body`` (call order differs), has an unused Linear, and a ReLU applied in place
    to the head's input after the head has read it."""

    def __init__(self, p_drop: float = 0.0) -> None:
        super().__init__()
        self.head = nn.Linear(16, 3)
        self.body = nn.Linear(6, 16)
        self.drop = nn.Dropout(p_drop)
        self.relu = nn.ReLU(inplace=True)
        self.unused = nn.Linear(3, 3)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(torch.tanh(self.body(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        out = self.head(h)
        self.relu(h)  # in place on the feature, after the head read it
        return out + 0.0 * h.sum(1, keepdim=True)


class Wrapper(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.model = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class DictNet(nn.Module):
    """Called as ``model(**inputs)``; returns an object with ``.logits``, like Hugging Face models."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(5, 7)
        self.cls = nn.Linear(7, 2)

    def forward(self, input_ids: torch.Tensor) -> object:
        return type("Out", (), {"logits": self.cls(torch.relu(self.enc(input_ids)))})()


class DictSet(Dataset):
    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": torch.tensor(i % 2)}


@pytest.fixture
def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(23, 6, generator=g), torch.randint(0, 3, (23,), generator=g))


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_features_equal_head_input_despite_inplace_relu(data: TensorDataset) -> None:
    torch.manual_seed(0)
    net = Net()
    feats = extract_features(net, ordered_loader(data, batch_size=5), feature_layer="head")
    with torch.no_grad():
        expected = torch.tanh(net.body(data.tensors[0]))
    assert feats.dtype == torch.float32 and feats.shape == (23, 16)
    assert (expected < 0).any()  # the in-place ReLU would have zeroed these without the clone
    torch.testing.assert_close(feats, expected)
    assert not feats.requires_grad


def test_default_layer_is_last_linear_called_not_last_registered(data: TensorDataset) -> None:
    net = Net()
    name, module = find_feature_layer(net, data.tensors[0][:4])
    assert name == "head" and module is net.head
    torch.testing.assert_close(
        extract_features(net, ordered_loader(data, 8)), extract_features(net, ordered_loader(data, 8), "head")
    )


def test_layer_given_as_module_and_by_name_under_wrapper_prefixes() -> None:
    net = Net()
    wrapped = Wrapper(net)
    assert find_feature_layer(wrapped, None, net.head) == ("model.head", net.head)
    assert find_feature_layer(wrapped, None, "head") == ("model.head", net.head)  # unique suffix
    assert find_feature_layer(net, None, "model.head") == ("head", net.head)  # wrapper prefix the model lacks
    assert find_feature_layer(wrapped, torch.randn(2, 6))[0] == "model.head"
    with pytest.raises(ConfigurationError, match=r"not one of its modules"):
        find_feature_layer(net, None, nn.Linear(2, 2))


def test_wrong_layer_name_lists_available_names() -> None:
    with pytest.raises(
        ConfigurationError, match=r"`feature_layer`.*'hed'.*Available module names: .*'head'.*'body'"
    ):
        find_feature_layer(Net(), None, "hed")


def test_ambiguous_suffix_and_bad_types_are_errors() -> None:
    two = nn.ModuleDict({"a": Wrapper(nn.Linear(2, 2)), "b": Wrapper(nn.Linear(2, 2))})
    with pytest.raises(ConfigurationError, match=r"matches several"):
        find_feature_layer(two, None, "model")
    with pytest.raises(ConfigurationError, match=r"`feature_layer`.*got 3"):
        find_feature_layer(Net(), None, 3)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"`batch`"):
        find_feature_layer(Net(), None, None)
    with pytest.raises(ConfigurationError, match=r"no.*nn.Linear|has none"):
        find_feature_layer(nn.Sequential(nn.Tanh()), torch.randn(2, 3))


def test_eval_mode_is_used_and_training_flags_are_restored(data: TensorDataset) -> None:
    net = Net(p_drop=0.9)
    net.train()
    net.body.eval()  # a mixed state must come back exactly
    seen: list[bool] = []
    net.drop.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    loader = ordered_loader(data, 10)
    first = extract_features(net, loader, "head")
    second = extract_features(net, loader, "head")
    torch.testing.assert_close(first, second)  # dropout off
    assert seen and not any(seen)
    assert net.training and net.drop.training and net.head.training and not net.body.training


def test_hooks_removed_and_mode_restored_even_on_error(data: TensorDataset) -> None:
    class Failing(Net):
        calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("boom")
            return super().forward(x)

    net = Net().train()
    before = _hooks(net)
    extract_features(net, ordered_loader(data, 4))
    assert _hooks(net) == before and net.training
    failing = Failing().train()
    with pytest.raises(RuntimeError, match=r"boom"):
        extract_features(failing, ordered_loader(data, 4))  # default layer: one discovery pass, then batches
    assert _hooks(failing) == 0 and all(m.training for m in failing.modules())


def test_outputs_are_the_logits_in_dataloader_order() -> None:
    torch.manual_seed(1)
    net = DictNet()
    x = torch.randn(11, 5)
    feats, logits = extract_features_and_outputs(net, ordered_loader(DictSet(x), 4))
    with torch.no_grad():
        torch.testing.assert_close(feats, torch.relu(net.enc(x)))
        torch.testing.assert_close(logits, net(input_ids=x).logits)
    assert logits.dtype == torch.float32 and logits.shape == (11, 2)


def test_rows_follow_dataset_order_across_batch_sizes(data: TensorDataset) -> None:
    net = Net()
    one = extract_features(net, ordered_loader(data, 1), "head")
    many = extract_features(net, ordered_loader(data, 7), "head")
    torch.testing.assert_close(one, many)
    torch.testing.assert_close(one[17], extract_features(net, [data[17][0][None]], "head")[0])


def test_layer_not_called_and_outputs_without_logits_are_errors(data: TensorDataset) -> None:
    net = Net()
    with pytest.raises(ConfigurationError, match=r"'unused'.*not called"):
        extract_features(net, ordered_loader(data, 8), "unused")
    with pytest.raises(ConfigurationError, match=r"logits"):
        extract_features_and_outputs(nn.Sequential(nn.Linear(6, 4), nn.Flatten(0)), [torch.randn(3, 6)], "0")
    assert _hooks(net) == 0


def test_ordered_loader_checks_its_arguments(data: TensorDataset) -> None:
    loader = ordered_loader(data, 5)
    assert isinstance(loader, DataLoader) and len(loader) == 5  # last short batch kept
    assert torch.equal(torch.cat([b[1] for b in loader]), data.tensors[1])

    class Stream(IterableDataset):
        def __iter__(self):  # type: ignore[no-untyped-def]
            yield torch.zeros(2)

    with pytest.raises(ConfigurationError, match=r"map-style"):
        ordered_loader(Stream(), 2)
    with pytest.raises(ConfigurationError, match=r"`batch_size`.*0"):
        ordered_loader(data, 0)
    with pytest.raises(ConfigurationError, match=r"at least one batch"):
        extract_features(Net(), [], "head")

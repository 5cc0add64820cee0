"""InfluenceModule.s_test / influence on plain modules and LightningModules (full scan)."""

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import lightning_fastif as lf
from lightning_fastif.errors import ConfigurationError, LossResolutionError, NonFiniteError
from lightning_fastif.functional.params import fingerprint


class TinyClassifier(pl.LightningModule):
    """A LightningModule that knows nothing of influence functions."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Dropout(0.5))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _data(n=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return TensorDataset(x, y)


def _slow_influence(model, train, batch, damping):
    """Reference: explicit per-example gradients by backward, dense Hessian by autograd, eval mode, float64."""
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]

    def flat_grad(x, y, create_graph=False):
        loss = nn.functional.cross_entropy(model(x), y)
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, create_graph=create_graph)])

    x_all, y_all = train.tensors
    g_all = flat_grad(x_all, y_all, create_graph=True)
    h = torch.stack(
        [torch.cat([g.flatten() for g in torch.autograd.grad(gi, params, retain_graph=True)]) for gi in g_all]
    )
    h = h + damping * torch.eye(len(g_all), dtype=h.dtype)
    out = []
    for q in range(len(batch[0])):
        s = torch.linalg.solve(h, flat_grad(batch[0][q : q + 1], batch[1][q : q + 1]))
        out.append(
            torch.stack([-(flat_grad(x_all[i : i + 1], y_all[i : i + 1]) @ s) for i in range(len(x_all))])
        )
    return torch.stack(out).detach()


def test_lightning_module_and_plain_module_give_the_reference_influence():
    torch.manual_seed(0)
    lm = TinyClassifier().double()
    lm.train()  # dropout on: the influence code must switch to eval mode itself
    plain = nn.Sequential(lm.body, lm.head)
    train = _data()
    batch = tuple(t[:3] for t in _data(seed=1).tensors)
    before = fingerprint(lm)
    a = lf.InfluenceModule(lm, train, solver=lf.ExactSolver(damping=0.01), num_candidates=None).influence(
        batch
    )
    b = lf.InfluenceModule(plain, train, solver=lf.ExactSolver(damping=0.01), num_candidates=None).influence(
        batch
    )
    assert lm.training and lm.body[2].training  # mode restored
    assert fingerprint(lm) == before  # weights untouched
    ref = _slow_influence(lm, train, batch, 0.01)
    torch.testing.assert_close(a, ref)
    torch.testing.assert_close(b, ref)


def test_influence_of_given_train_indices_is_the_matching_columns():
    lm = TinyClassifier().double()
    train = _data()
    batch = tuple(t[:2] for t in _data(seed=1).tensors)
    im = lf.InfluenceModule(lm, train, solver=lf.ExactSolver(damping=0.01), num_candidates=None, batch_size=4)
    full = im.influence(batch)
    ids = [7, 0, 29, 3]  # any order; a repeated id is an error (issue 17, tests/test_bad_input.py)
    torch.testing.assert_close(im.influence(batch, ids), full[:, ids])
    assert im.s_test(batch).shape == (2, sum(p.numel() for p in lm.parameters()))


def test_selected_params_only():
    lm = TinyClassifier().double()
    train = _data()
    batch = tuple(t[:2] for t in _data(seed=1).tensors)
    im = lf.InfluenceModule(
        lm, train, params=["head.*"], solver=lf.ExactSolver(damping=0.01), num_candidates=None
    )
    assert im.s_test(batch).shape == (2, 6 * 3 + 3)


def test_float32_inputs_are_cast_to_the_model_dtype():
    lm = TinyClassifier().double()
    x, y = _data().tensors
    train32 = TensorDataset(x.float(), y)
    batch = (x[:2].float(), y[:2])
    im = lf.InfluenceModule(lm, train32, solver=lf.ExactSolver(damping=0.01), num_candidates=None)
    ref = lf.InfluenceModule(lm, _data(), solver=lf.ExactSolver(damping=0.01), num_candidates=None)
    torch.testing.assert_close(im.influence(batch), ref.influence((x[:2], y[:2])), rtol=1e-5, atol=1e-6)


def test_non_finite_query_loss_is_a_clear_error():
    lm = TinyClassifier().double()
    im = lf.InfluenceModule(lm, _data(), solver=lf.ExactSolver(damping=0.01), num_candidates=None)
    x, y = _data().tensors
    x = x[:3].clone()
    x[1, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"query loss.*\[1\]"):
        im.s_test((x, y[:3]))


def test_bad_arguments_name_the_argument():
    lm = TinyClassifier()
    train = _data()
    with pytest.raises(ConfigurationError, match="`num_candidates`.*-3"):
        lf.InfluenceModule(lm, train, num_candidates=-3)
    with pytest.raises(ConfigurationError, match="`num_candidates`.*at most the training set size 30"):
        lf.InfluenceModule(lm, train, num_candidates=31)
    with pytest.raises(ConfigurationError, match="`top_k`"):
        lf.InfluenceModule(lm, train, top_k=0, num_candidates=None)
    with pytest.raises(ConfigurationError, match="`solver`"):
        lf.InfluenceModule(lm, train, solver="lissa", num_candidates=None)
    with pytest.raises(ConfigurationError, match="`params`.*'encoder.*'"):
        lf.InfluenceModule(lm, train, params=["encoder.*"], num_candidates=None)
    with pytest.raises(ConfigurationError, match="`train_dataset`"):
        lf.InfluenceModule(lm, iter([1, 2]))
    im = lf.InfluenceModule(lm.double(), train, solver=lf.ExactSolver(damping=0.1), num_candidates=None)
    with pytest.raises(ConfigurationError, match="`batch`.*empty"):
        im.s_test((torch.zeros(0, 5, dtype=torch.float64), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ConfigurationError, match=r"`train_indices`.*\[0, 30\)"):
        im.influence(tuple(t[:1] for t in train.tensors), [30])


def test_unreadable_batch_says_which_loss_to_provide():
    lm = TinyClassifier().double()
    train = TensorDataset(torch.randn(10, 5, dtype=torch.float64))  # no labels
    im = lf.InfluenceModule(lm, train, solver=lf.ExactSolver(damping=0.1), num_candidates=None)
    with pytest.raises(LossResolutionError, match="loss_fn.*per_example_loss"):
        im.s_test((torch.randn(2, 5, dtype=torch.float64),))

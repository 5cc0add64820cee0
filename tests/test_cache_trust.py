"""Every reused answer matches the question (issue 17): solver caches shared by modules, training data changed in
place after a cache was built, and factor folders that never touch what the library did not write."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_fastif.errors import ConfigurationError
from lightning_fastif.functional.curvature import TrainingCurvature
from lightning_fastif.functional.losses import PerExampleLoss
from lightning_fastif.functional.params import ParamSpec, select_params
from lightning_fastif.solvers.kronecker import EKFACSolver


def _mlp_problem(n: int = 30, seed: int = 0) -> tuple[nn.Module, TensorDataset]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(n, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    return model, TensorDataset(x, y)


def _curvature(model, ds, loss_fn=None, forward_fn=None, batch_size=7):
    loss = PerExampleLoss(model, loss_fn, forward_fn)
    params = select_params(model)
    spec = ParamSpec.of(params)
    return TrainingCurvature(loss, spec.flatten(params), spec, ds, batch_size=batch_size)


# ------------------------------------------------------------------------------------------------ item 6
def test_factors_dir_that_is_a_file_is_refused_and_left_untouched(tmp_path):
    target = tmp_path / "factors"
    target.write_text("the user's notes")
    with pytest.raises(ConfigurationError, match="`factors_dir`.*is a file"):
        EKFACSolver(damping=1e-2, factors_dir=target)
    # the file appears after the solver was made: still refused at the solve, before any pass, and kept as is
    later = tmp_path / "later"
    solver = EKFACSolver(damping=1e-2, factors_dir=later)
    later.write_text("made meanwhile")
    model, ds = _mlp_problem()
    cur = _curvature(model, ds)
    for overwrite in (False, True):
        solver.overwrite = overwrite
        with pytest.raises(ConfigurationError, match="`factors_dir`.*is a file"):
            solver.solve(cur, torch.randn(1, cur.spec.numel, dtype=torch.float64))
    assert target.read_text() == "the user's notes" and later.read_text() == "made meanwhile"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["factors", "later"]  # nothing hidden, nothing added


def test_factors_dir_holding_other_files_is_refused_with_overwrite(tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "results.csv").write_text("1,2,3")
    model, ds = _mlp_problem()
    cur = _curvature(model, ds)
    with pytest.raises(ConfigurationError, match="holds other files \\(results.csv\\)"):
        EKFACSolver(damping=1e-2, factors_dir=target, overwrite=True).solve(
            cur, torch.randn(1, cur.spec.numel, dtype=torch.float64)
        )
    assert (target / "results.csv").read_text() == "1,2,3"


def test_temporary_folders_of_a_killed_factor_save_are_cleaned(tmp_path):
    folder = tmp_path / "factors"
    # a writer that died mid-save: its pid no longer runs
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = int(proc.stdout)
    stale = tmp_path / f".factors.tmp-{dead}-0badc0de"
    stale.mkdir()
    (stale / "factors.pt").write_bytes(b"half")
    # a live writer's temp (this process) and a folder that only looks like one (holds a foreign file) are kept
    live = tmp_path / f".factors.tmp-{os.getpid()}-1234abcd"
    live.mkdir()
    foreign = tmp_path / f".factors.old-{dead}-feedbeef"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not ours")
    model, ds = _mlp_problem()
    cur = _curvature(model, ds)
    v = torch.randn(2, cur.spec.numel, dtype=torch.float64)
    x = EKFACSolver(damping=1e-2, factors_dir=folder, residual="none").solve(cur, v)
    assert not stale.exists()
    assert live.exists() and (foreign / "keep.txt").exists()
    assert (folder / "meta.json").is_file()
    # and a load (no save) cleans too
    stale.mkdir()
    again = EKFACSolver(damping=1e-2, factors_dir=folder, residual="none")
    torch.testing.assert_close(again.solve(cur, v), x, rtol=1e-12, atol=0)
    assert not stale.exists()


# ------------------------------------------------------------------------------------------------ item 2
def _s_test_reference(model, ds, query, loss_of, params, damping):
    """float64 ``(H + damping I)^-1 grad L(query)`` with H the exact Hessian of the mean loss (one example at a time).

    ``loss_of(model, batch) -> [B]`` per-example losses; ``params``: the names differentiated (others constant).
    """
    from torch.func import functional_call, grad, hessian

    base = {n: p.detach() for n, p in model.named_parameters()}
    sizes = [base[n].numel() for n in params]
    theta = torch.cat([base[n].reshape(-1) for n in params])

    def total(flat, batch):
        ps = dict(base)
        for n, piece in zip(params, torch.split(flat, sizes)):
            ps[n] = piece.reshape(base[n].shape)
        return functional_call(
            _Bound(model, loss_of), {f"model.{k}": v for k, v in ps.items()}, (batch,)
        ).sum()

    x, y = ds.tensors
    h = sum(hessian(total)(theta, (x[i : i + 1], y[i : i + 1])) for i in range(len(x))) / len(x)
    g = torch.stack(
        [grad(total)(theta, (query[0][j : j + 1], query[1][j : j + 1])) for j in range(len(query[0]))]
    )
    return torch.linalg.solve(h + damping * torch.eye(len(theta), dtype=torch.float64), g.T).T


class _Bound(nn.Module):
    def __init__(self, model, loss_of):
        super().__init__()
        self.model, self.loss_of = model, [loss_of]

    def forward(self, batch):
        return self.loss_of[0](self.model, batch)


def _smooth_loss(outputs, batch):
    return torch.nn.functional.cross_entropy(outputs, batch[1], reduction="none", label_smoothing=0.3)


def _scaled_forward(model, batch):
    return model(2.0 * batch[0])


def _solvers():
    from lightning_fastif import AutoSolver, CGSolver, ExactSolver, LiSSASolver
    from lightning_fastif.solvers.kronecker import KFACSolver

    return {
        "exact": lambda: ExactSolver(damping=0.5),
        "exact_auto_damping": lambda: ExactSolver(damping="auto"),
        "cg_auto_damping": lambda: CGSolver(damping="auto", tol=1e-10, max_iter=300),
        "auto": lambda: AutoSolver(),
        "ekfac": lambda: EKFACSolver(damping=1e-2, residual="none"),
        "kfac": lambda: KFACSolver(damping=1e-2, residual="none"),
        "lissa_auto_scale": lambda: LiSSASolver(
            damping=0.1, scale="auto", depth=8, batch_size=4, calibration_batches=2
        ),
    }


@pytest.mark.parametrize("name", list(_solvers()))
def test_one_solver_shared_by_modules_with_other_losses_or_forward_fn_matches_fresh_solvers(name):
    import warnings

    import lightning_fastif as lf

    model, ds = _mlp_problem(n=24)
    query = (torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 1, 2]))
    make = _solvers()[name]
    shared = make()
    kinds = [{}, {"loss_fn": _smooth_loss}, {"forward_fn": _scaled_forward}, {}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings of the approximate solvers: not what is tested
        for kw in kinds:  # the last one goes back to the first loss: the shared solver's cache must follow
            got = lf.InfluenceModule(
                model, ds, solver=shared, num_candidates=None, progress=False, **kw
            ).s_test(query)
            fresh = lf.InfluenceModule(
                model, ds, solver=make(), num_candidates=None, progress=False, **kw
            ).s_test(query)
            torch.testing.assert_close(got, fresh, rtol=1e-9, atol=1e-12)
    if name == "exact":  # and the fresh answer is the float64 reference, for each loss
        names = [n for n, _ in model.named_parameters()]
        for kw, loss_of in (
            ({}, lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")),
            ({"loss_fn": _smooth_loss}, lambda m, b: _smooth_loss(m(b[0]), b)),
            (
                {"forward_fn": _scaled_forward},
                lambda m, b: torch.nn.functional.cross_entropy(m(2.0 * b[0]), b[1], reduction="none"),
            ),
        ):
            im = lf.InfluenceModule(model, ds, solver=shared, num_candidates=None, progress=False, **kw)
            ref = _s_test_reference(model, ds, query, loss_of, names, 0.5)
            torch.testing.assert_close(im.s_test(query), ref, rtol=1e-7, atol=1e-10)


def test_shared_solver_follows_frozen_weights_and_batchnorm_statistics():
    """Only the head is differentiated: the rest of the model (a frozen weight, BatchNorm's running statistics) still
    shapes the curvature, so a shared solver must not reuse a factorisation made before they changed."""
    import lightning_fastif as lf

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    x, y = torch.randn(24, 4, dtype=torch.float64), torch.randint(0, 3, (24,))
    ds = TensorDataset(x, y)
    query = (x[:2] + 0.1, y[:2])
    shared = lf.ExactSolver(damping=1e-2)

    def s_test(solver):
        return lf.InfluenceModule(model, ds, params=["3.*"], solver=solver, num_candidates=None).s_test(query)

    s_test(shared)
    with torch.no_grad():
        model[0].weight.mul_(1.5)  # frozen (unselected) weight
    torch.testing.assert_close(s_test(shared), s_test(lf.ExactSolver(damping=1e-2)), rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        model[1].running_var.mul_(3.0)  # a buffer
    torch.testing.assert_close(s_test(shared), s_test(lf.ExactSolver(damping=1e-2)), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------ item 3
def test_dataset_fingerprint_covers_every_in_memory_byte():
    from _models import DictDataset
    from torch.utils.data import ConcatDataset, Subset

    from lightning_fastif.functional.params import DATA_SAMPLE, dataset_fingerprint

    torch.manual_seed(0)
    x, y = torch.randn(500, 3), torch.zeros(500, dtype=torch.long)
    ds = TensorDataset(x, y)
    before = dataset_fingerprint(ds)
    sampled = {round(i * 499 / (DATA_SAMPLE - 1)) for i in range(DATA_SAMPLE)}
    i, j = next((k, k + 1) for k in range(1, 499) if k not in sampled and k + 1 not in sampled)
    x[[i, j]] = x[[j, i]]  # two same-label rows, both outside the sample
    after = dataset_fingerprint(ds)
    assert after["labels"] == before["labels"] and after["inputs"] == before["inputs"]  # what the sample sees
    assert after["content"] != before["content"]
    # datasets holding their data in attributes, subsets and concatenations are covered in full too
    dd = DictDataset(input_ids=torch.arange(400).reshape(100, 4), labels=torch.zeros(100, dtype=torch.long))
    fp = dataset_fingerprint(dd)["content"]
    dd.tensors["input_ids"][50, 1] += 1
    assert dataset_fingerprint(dd)["content"] != fp
    sub = Subset(ds, list(range(0, 500, 2)))
    cat = ConcatDataset([ds, dd])
    fp_sub, fp_cat = dataset_fingerprint(sub)["content"], dataset_fingerprint(cat)["content"]
    sub.indices[3] = 1
    assert dataset_fingerprint(sub)["content"] != fp_sub
    x[10, 0] += 1.0
    assert dataset_fingerprint(cat)["content"] != fp_cat

    # a dataset with no in-memory arrays has no content digest (only the sample covers it)
    class Computed(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.full((2,), float(i)), i

    assert dataset_fingerprint(Computed())["content"] is None


def test_training_data_changed_in_place_recomputes_the_cached_curvature_bn_cnn(caplog):
    """The BatchNorm CNN, Exact on its head: after the first influence() the training inputs change in place; the
    second call must equal a fresh module's (it reused the first factorisation before: scores 0.38-5.9x off)."""
    import logging

    from _models import bn_cnn

    import lightning_fastif as lf

    model, train, query = bn_cnn(n_train=64)
    model = model.double()
    train = TensorDataset(train.tensors[0].double(), train.tensors[1])

    def module(solver):
        return lf.InfluenceModule(
            model, train, params=["fc.*"], solver=solver, num_candidates=None, progress=False
        )

    im = module(lf.ExactSolver(damping=1e-2))
    first = im.influence(query)
    with torch.no_grad():
        train.tensors[0][:32] = train.tensors[0][:32].flip(
            -1
        )  # in place: the same dataset object, same length
    with caplog.at_level(logging.INFO):
        second = im.influence(query)
    fresh = module(lf.ExactSolver(damping=1e-2)).influence(query)
    torch.testing.assert_close(second, fresh, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(first, second)
    assert "the training data held in memory differs" in caplog.text and "recomputing" in caplog.text


def _head_problem(tmp_path):
    from _models import tuple_net

    import lightning_fastif as lf

    model, train, query = tuple_net(n_train=300)
    folder = tmp_path / "index"
    lf.FeatureIndexCallback(folder, forward_fn=_logits).build(model, train)
    return model, train, query, folder


def _logits(model, batch):
    return model(batch[0])[1]  # tuple_net's forward returns (features, logits)


def _swap_same_label_rows(train):
    """Swap two same-label rows outside the 64-row sample of ``dataset_fingerprint`` (labels and sample unchanged)."""
    from lightning_fastif.functional.params import DATA_SAMPLE

    x, y = train.tensors
    n = len(x)
    sampled = {round(i * (n - 1) / (DATA_SAMPLE - 1)) for i in range(DATA_SAMPLE)}
    free = [i for i in range(n) if i not in sampled]
    i, j = next((a, b) for a in free for b in free if a < b and y[a] == y[b] and not torch.equal(x[a], x[b]))
    with torch.no_grad():
        x[[i, j]] = x[[j, i]]
    return i, j


def test_rows_swapped_after_the_index_was_built_are_refused_on_the_head_path(tmp_path):
    """The (features, logits) model on the head fast path with an index folder: two same-label rows swapped in place
    pass the labels and the 64-row sample, and the head path used to score with the stale cached features."""
    import lightning_fastif as lf
    from lightning_fastif.errors import IndexMismatchError

    model, train, query, folder = _head_problem(tmp_path)
    im = lf.InfluenceModule(
        model,
        train,
        params=["head.*"],
        solver=lf.ExactSolver(damping=1e-2),
        num_candidates=50,
        index=folder,
        forward_fn=_logits,
    )
    im.explain(query)
    assert im._head_fast_path(im._theta()[1]) is not None  # the cached-feature path is the one in use
    i, j = _swap_same_label_rows(train)
    with pytest.raises(IndexMismatchError, match="training data held in memory differs.*Rebuild it"):
        im.explain(query)
    # scores of given training ids need no index: they are computed on the changed data (jvp), never the cache
    ids = torch.tensor([i, j, 0])
    jvp = lf.InfluenceModule(
        model,
        train,
        params=["head.*"],
        solver=lf.ExactSolver(damping=1e-2),
        num_candidates=None,
        score_method="jvp",
        forward_fn=_logits,
    ).influence(query, train_indices=ids)
    torch.testing.assert_close(im.influence(query, train_indices=ids), jvp, rtol=1e-5, atol=1e-7)
    # a new module on the same folder is refused too (the folder's fingerprint covers every byte)
    with pytest.raises(IndexMismatchError, match="training data held in memory differs"):
        lf.InfluenceModule(
            model,
            train,
            params=["head.*"],
            solver=lf.ExactSolver(damping=1e-2),
            num_candidates=50,
            index=folder,
            forward_fn=_logits,
        ).explain(query)
    # after a rebuild the answers are those of a fresh module scoring with fresh features
    lf.FeatureIndexCallback(folder, forward_fn=_logits).build(model, train)
    got = im.explain(query)
    fresh = lf.InfluenceModule(
        model,
        train,
        params=["head.*"],
        solver=lf.ExactSolver(damping=1e-2),
        num_candidates=50,
        index=folder,
        forward_fn=_logits,
    ).explain(query)
    for a, b in zip(got, fresh):
        assert a.harmful_ids == b.harmful_ids and a.helpful_ids == b.helpful_ids
        torch.testing.assert_close(torch.tensor(a.harmful_scores), torch.tensor(b.harmful_scores))


def test_rows_swapped_under_an_in_memory_index_rebuild_it_and_match_the_jvp_scores():
    """index=None (built in memory with cached features): after a swap the index and its cache are rebuilt, and the
    head path's scores equal the jvp path's on the changed data."""
    from _models import tuple_net

    import lightning_fastif as lf

    model, train, query = tuple_net(n_train=300)
    im = lf.InfluenceModule(
        model,
        train,
        params=["head.*"],
        solver=lf.ExactSolver(damping=1e-2),
        num_candidates=40,
        forward_fn=_logits,
    )
    im.explain(query)
    i, j = _swap_same_label_rows(train)
    ids = torch.tensor([i, j, 0, 5])
    im.explain(query)  # rebuilds the in-memory index and its cached features
    head = im.influence(query, train_indices=ids)
    assert im._head_fast_path(im._theta()[1]) is not None
    jvp = lf.InfluenceModule(
        model,
        train,
        params=["head.*"],
        solver=lf.ExactSolver(damping=1e-2),
        num_candidates=None,
        score_method="jvp",
        forward_fn=_logits,
    ).influence(query, train_indices=ids)
    torch.testing.assert_close(head, jvp, rtol=1e-4, atol=1e-6)


class _FileRows(torch.utils.data.Dataset):
    """Examples read from one file each (no array in memory): only a full read can tell two rows were swapped."""

    def __init__(self, folder, n):
        self.folder, self.n = folder, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        x, y = torch.load(self.folder / f"{i}.pt")
        return x, y


def test_rows_swapped_on_disk_after_the_index_was_built_are_refused(tmp_path):
    """A dataset that reads its rows from files: the index folder records a hash of every row, and a module loading
    it after two same-label files were swapped (outside the 64-row sample) refuses it."""
    import lightning_fastif as lf
    from lightning_fastif.errors import IndexMismatchError
    from lightning_fastif.functional.params import DATA_SAMPLE

    model, train, query = __import__("_models").tuple_net(n_train=150, steps=5)
    rows = tmp_path / "rows"
    rows.mkdir()
    x, y = train.tensors
    for i in range(len(x)):
        torch.save((x[i].clone(), y[i].clone()), rows / f"{i}.pt")
    ds = _FileRows(rows, len(x))
    folder = tmp_path / "index"
    lf.FeatureIndexCallback(folder, forward_fn=_logits).build(model, ds)

    def module():
        return lf.InfluenceModule(
            model,
            ds,
            params=["head.*"],
            solver=lf.ExactSolver(damping=1e-2),
            num_candidates=20,
            index=folder,
            forward_fn=_logits,
        )

    module().explain(query)  # the same rows: accepted
    sampled = {round(k * (len(x) - 1) / (DATA_SAMPLE - 1)) for k in range(DATA_SAMPLE)}
    free = [k for k in range(len(x)) if k not in sampled]
    i, j = next((a, b) for a in free for b in free if a < b and y[a] == y[b] and not torch.equal(x[a], x[b]))
    (rows / f"{i}.pt").rename(rows / "tmp.pt")
    (rows / f"{j}.pt").rename(rows / f"{i}.pt")
    (rows / "tmp.pt").rename(rows / f"{j}.pt")
    with pytest.raises(IndexMismatchError, match="training examples differ \\(every row read.*Rebuild it"):
        module().explain(query)


def test_an_index_object_used_before_the_data_changed_is_refused():
    """An index passed as an object cannot be rebuilt by the module: after the rows it indexed changed, a clear
    error says to rebuild it (instead of searching stale features)."""
    from _models import tuple_net

    import lightning_fastif as lf
    from lightning_fastif.errors import IndexMismatchError
    from lightning_fastif.retrieval.build import build_index

    model, train, query = tuple_net(n_train=150, steps=5)
    index = build_index(model, train, forward_fn=_logits).index
    im = lf.InfluenceModule(
        model,
        train,
        params=["head.*"],
        solver=lf.ExactSolver(damping=1e-2),
        num_candidates=20,
        index=index,
        forward_fn=_logits,
    )
    im.explain(query)
    _swap_same_label_rows(train)
    with pytest.raises(
        IndexMismatchError, match="passed as `index`.*training data held in memory differs.*rebuild"
    ):
        im.explain(query)
    with pytest.raises(IndexMismatchError, match="passed as `index`"):  # every time, not only once
        im.explain(query)

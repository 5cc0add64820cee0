"""Gradient-space candidates (issue 11): sketches against per-example gradients, the search, the folder, DDP.

Ground truth: per-example gradients by a float64 loop of ``torch.autograd.grad``; explicit projection matrices;
the full-scan influence of every training example (the candidates' scores must equal it exactly).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import lightning_fastif as lf
from lightning_fastif.errors import ConfigurationError, IndexMismatchError
from lightning_fastif.functional.losses import resolve_loss
from lightning_fastif.functional.params import ParamSpec, select_params
from lightning_fastif.retrieval.gradients.folder import (
    build_gradient_index,
    load_gradient_index,
    save_gradient_index,
)
from lightning_fastif.retrieval.gradients.search import mips_union
from lightning_fastif.retrieval.gradients.sketch import (
    DenseProjection,
    KroneckerProjection,
    head_query,
    head_sketch,
)
from lightning_fastif.retrieval.gradients.sketcher import GradientSketcher


class Net(nn.Module):
    def __init__(self, d_in: int = 12, hidden: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _data(n: int = 240, d: int = 12, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes * 2, d, generator=g) * 1.5
    comp = torch.randint(0, classes * 2, (n,), generator=g)
    return centers[comp] + torch.randn(n, d, generator=g), comp % classes


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    x, y = _data(300)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:240]), y[:240]).backward()
        opt.step()
    model.eval()
    return model, TensorDataset(x[:240], y[:240]), (x[240:], y[240:])


def _loop_grads(
    model: nn.Module, ds: TensorDataset, patterns, dtype=torch.float64
) -> tuple[torch.Tensor, ParamSpec]:
    """Per-example gradients [N, P] by one backward per example (the reference)."""
    m = model.to(dtype)
    params = select_params(m, patterns)
    spec = ParamSpec.of(params)
    named = dict(m.named_parameters())
    rows = []
    for i in range(len(ds)):
        x, y = ds[i]
        loss = nn.functional.cross_entropy(m(x[None].to(dtype)), y[None])
        gs = torch.autograd.grad(loss, [named[n] for n in spec.names])
        rows.append(torch.cat([g.flatten() for g in gs]))
    model.float()
    return torch.stack(rows), spec


# ------------------------------------------------------------------------------------------------ sketch math
def test_head_sketch_equals_the_per_example_gradient_of_the_head(trained):
    model, ds, _ = trained
    ref, spec = _loop_grads(model, ds, ["head.*"])
    m64 = model.double()
    feats = m64.body(ds.tensors[0].double())
    got = head_sketch(feats, m64.head(feats), ds.tensors[1])
    model.float()
    assert spec.names == ("head.weight", "head.bias")
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    # the query side: sketch . query = g . s for any s
    s = torch.randn(3, spec.numel, dtype=torch.float64)
    parts = spec.unflatten(s)
    torch.testing.assert_close(got @ head_query(parts["head.weight"], parts["head.bias"]).T, ref @ s.T)
    # the sketcher (float32 model, from the features and logits of a forward pass) agrees
    sk = GradientSketcher(model, resolve_loss(model), ["head.*"], batch=ds[:2])
    assert sk.method == "head" and sk.dim == 4 * 17
    x, feats32, logits32 = sk.sketch_rows(ds, batch_size=64)
    torch.testing.assert_close(x.double(), ref, rtol=1e-4, atol=1e-5)
    assert feats32.shape == (240, 16) and logits32.shape == (240, 4)


def test_dense_projection_is_an_explicit_seeded_matrix_and_unbiased():
    x = torch.randn(5, 300, dtype=torch.float64)
    proj = DenseProjection(300, 64, seed=3, block=128)  # three column blocks
    r = proj.matrix().double()
    assert r.shape == (64, 300)
    torch.testing.assert_close(proj(x), x @ r.T)
    uncached = DenseProjection(
        300, 64, seed=3, block=128, cache_bytes=0
    )  # regenerated blocks: the same matrix
    torch.testing.assert_close(uncached(x), proj(x))
    assert not torch.equal(DenseProjection(300, 64, seed=4, block=128).matrix(), proj.matrix())
    # E[(Rx).(Ry)] = x.y: mean over 400 seeds within 4 standard errors
    a, b = torch.randn(300, dtype=torch.float64), torch.randn(300, dtype=torch.float64)
    for kind in ("gaussian", "rademacher"):
        est = torch.stack(
            [
                (lambda p: p(a[None]) @ p(b[None]).T)(DenseProjection(300, 16, s, kind))[0, 0]
                for s in range(400)
            ]
        )
        assert abs(float(est.mean()) - float(a @ b)) < 4 * float(est.std()) / 20


def test_dense_projection_blocks_are_generated_once_per_device_and_dtype_within_the_budget(monkeypatch):
    from lightning_fastif.retrieval.gradients import sketch as sketch_mod

    calls = []
    real = sketch_mod.random_matrix
    monkeypatch.setattr(sketch_mod, "random_matrix", lambda *a, **k: calls.append(a) or real(*a, **k))
    x = torch.randn(4, 300, dtype=torch.float64)
    want = x @ DenseProjection(300, 64, seed=3, block=128).matrix().double().T
    calls.clear()
    proj = DenseProjection(300, 64, seed=3, block=128)
    for _ in range(3):  # float64 inputs: three blocks generated once, kept in float64
        torch.testing.assert_close(proj(x), want)
    assert len(calls) == 3 and {k[2] for k in proj._blocks} == {torch.float64}
    proj(x.float())  # float32 inputs: the same blocks in float32, kept apart
    assert len(calls) == 6 and {k[2] for k in proj._blocks} == {torch.float32, torch.float64}
    # over the CPU budget (P > 65,536 at D = 1,024 with the default 256 MiB): regenerated each call, same values;
    # an accelerator has its own (larger) budget
    small = DenseProjection(300, 64, seed=3, block=128, cache_bytes=64 * 300 * 8 - 1)
    calls.clear()
    torch.testing.assert_close(small(x), want)
    torch.testing.assert_close(small(x), want)
    assert len(calls) == 6 and not small._blocks
    assert small._cacheable(torch.device("cuda", 0), torch.float64)
    # a Kronecker projection converts its factors once per device and dtype too
    kp = KroneckerProjection(5, 3, bias=True, k_in=4, k_out=2, seed=0)
    a, g = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    first = kp.sketch(a, g)
    held = dict(kp._copies)
    torch.testing.assert_close(kp.sketch(a, g), first)
    assert len(held) == 2 and all(kp._copies[k] is v for k, v in held.items())


def test_dense_sketcher_projects_the_per_example_gradients(trained):
    model, ds, _ = trained
    ref, spec = _loop_grads(model, ds, None)
    m64 = Net().double()
    m64.load_state_dict(model.state_dict())
    sk = GradientSketcher(m64, resolve_loss(m64), None, "dense", dim=32, seed=5)
    x, _, _ = sk.sketch_rows(ds, batch_size=100)
    r = DenseProjection(spec.numel, 32, seed=5).matrix().double()
    torch.testing.assert_close(x.double(), ref @ r.T, rtol=1e-5, atol=1e-6)
    s = torch.randn(2, spec.numel, dtype=torch.float64)
    torch.testing.assert_close(sk.query(s).double(), s @ r.T, rtol=1e-5, atol=1e-6)


def test_kronecker_sketch_is_the_projected_layer_gradient_without_per_example_gradients(trained):
    model, ds, _ = trained
    ref, spec = _loop_grads(model, ds, None)
    m64 = Net().double()
    m64.load_state_dict(model.state_dict())
    sk = GradientSketcher(m64, resolve_loss(m64), None, "kronecker", dim=300, seed=1)
    assert [n for n, _ in sk.layers] == ["body.0", "body.2", "head"]
    x, _, _ = sk.sketch_rows(ds, batch_size=64)
    parts = spec.unflatten(ref)
    want = []
    for name, proj in sk.layers:  # vec(R_g [G_W | g_b] R_a^T) per layer
        full = torch.cat([parts[f"{name}.weight"], parts[f"{name}.bias"].unsqueeze(-1)], -1)
        ra = torch.eye(proj.in_dim, dtype=torch.float64) if proj.r_in is None else proj.r_in.double()
        rg = torch.eye(proj.out_dim, dtype=torch.float64) if proj.r_out is None else proj.r_out.double()
        want.append((rg @ full @ ra.T).flatten(1))
    torch.testing.assert_close(x.double(), torch.cat(want, 1), rtol=1e-5, atol=1e-6)
    # the query side matches: sketch . query = vec(R_g G R_a^T) . vec(R_g S R_a^T)
    s = torch.randn(2, spec.numel, dtype=torch.float64)
    sp = spec.unflatten(s)
    q_want = []
    for name, proj in sk.layers:
        full = torch.cat([sp[f"{name}.weight"], sp[f"{name}.bias"].unsqueeze(-1)], -1)
        ra = torch.eye(proj.in_dim, dtype=torch.float64) if proj.r_in is None else proj.r_in.double()
        rg = torch.eye(proj.out_dim, dtype=torch.float64) if proj.r_out is None else proj.r_out.double()
        q_want.append((rg @ full @ ra.T).flatten(1))
    torch.testing.assert_close(sk.query(s).double(), torch.cat(q_want, 1), rtol=1e-5, atol=1e-6)
    # factors as large as the layer are identities: the sketch inner product is the exact gradient inner product
    exact = GradientSketcher(m64, resolve_loss(m64), None, "kronecker", dim=10**6)
    xe, _, _ = exact.sketch_rows(ds, batch_size=64)
    torch.testing.assert_close(xe.double() @ exact.query(s).double().T, ref @ s.T, rtol=1e-4, atol=1e-5)


def test_kronecker_sums_over_sequence_positions():
    proj = KroneckerProjection(5, 3, bias=True, k_in=4, k_out=2, seed=0)
    a, g = torch.randn(2, 7, 5, dtype=torch.float64), torch.randn(2, 7, 3, dtype=torch.float64)
    want = sum(proj.sketch(a[:, t], g[:, t]) for t in range(7))
    torch.testing.assert_close(proj.sketch(a, g), want)


def test_mips_union_takes_half_of_each_side_deduplicated_and_tops_up():
    pos = torch.tensor([[1, 2, 3, 4, 5, 6]])
    neg = torch.tensor([[2, 9, 8, 7, 6, 5]])
    assert mips_union(pos, neg, 4)[0].tolist() == [1, 2, 9, 3]  # 1,2 | 2(dup),9 | top-up alternately: 3
    assert mips_union(pos, neg, 6)[0].tolist() == [1, 2, 3, 9, 8, 4]
    with pytest.raises(ConfigurationError, match="distinct candidates"):
        mips_union(torch.tensor([[1, 2]]), torch.tensor([[2, 1]]), 3)


# ------------------------------------------------------------------------------------------------ the module
def _module(model, ds, params, k, candidates="gradients", index=None, **kw):
    return lf.InfluenceModule(
        model,
        ds,
        params=params,
        solver=lf.ExactSolver(damping=1e-2),
        num_candidates=k,
        top_k=5,
        index=index,
        candidates=candidates,
        batch_size=64,
        progress=False,
        **kw,
    )


@pytest.mark.parametrize(
    ("params", "sketch", "k"),
    [
        (["head.*"], {}, 20),
        (None, {"method": "kronecker", "dim": 512}, 100),
        (None, {"method": "dense", "dim": 256}, 100),
    ],
)
def test_gradient_candidates_hold_the_full_scan_top_and_scores_are_exact(trained, params, sketch, k):
    model, ds, (xq, yq) = trained
    im = _module(model, ds, params, k, sketch=sketch)
    batch = (xq[:6], yq[:6])
    s = im.s_test(batch)
    full = im.score(s)  # [Q, N], the reference
    _, cand = im.search(batch, s)
    assert cand.shape == (6, k) and all(len(set(row.tolist())) == k for row in cand)
    found = []
    for q in range(6):
        top_help = set(full[q].argsort()[:5].tolist())
        top_harm = set(full[q].argsort(descending=True)[:5].tolist())
        found.append(len((top_help | top_harm) & set(cand[q].tolist())) / len(top_help | top_harm))
    if params == [
        "head.*"
    ]:  # exact sketches: the k/2 most positive and k/2 most negative g.s are found exactly
        assert min(found) == 1.0
    else:
        assert sum(found) / len(found) >= 0.9, found
    results = im.explain(batch)
    for q, r in enumerate(results):
        ids = r.helpful_ids + r.harmful_ids
        assert set(ids) <= set(cand[q].tolist())  # within the candidate set
        torch.testing.assert_close(torch.tensor(r.helpful_scores + r.harmful_scores), full[q, ids].float())
        assert r.extra["candidates"] == "gradients" and r.num_candidates == k
        # exact ranking inside the candidates: the helpful list is the most negative of the candidate scores
        inside = full[q, cand[q]]
        assert r.helpful_ids == cand[q][inside.argsort()[:5]].tolist()


def test_candidates_argument_is_checked(trained):
    model, ds, _ = trained
    with pytest.raises(ConfigurationError, match="`candidates`"):
        _module(model, ds, None, 10, candidates="neighbours")
    with pytest.raises(ConfigurationError, match="`sketch`"):
        _module(model, ds, None, 10, sketch={"dims": 3})


# ------------------------------------------------------------------------------------------------ the folder
def test_folder_round_trip_mmap_float16_and_space_mismatch(trained, tmp_path):
    model, ds, (xq, yq) = trained
    loss = resolve_loss(model)
    built = build_gradient_index(model, ds, loss, None, "kronecker", dim=128, seed=2)
    meta = save_gradient_index(built, tmp_path / "g")
    disk = json.loads((tmp_path / "g" / "meta.json").read_text())
    assert (
        disk["space"] == "gradients"
        and disk["sketch"]["method"] == "kronecker"
        and disk["sketch"]["seed"] == 2
    )
    assert disk["sketch"]["params"] == [n for n, _ in model.named_parameters()]
    assert meta.ntotal == 240
    loaded = load_gradient_index(tmp_path / "g", sketcher=built.sketcher)  # memory-mapped FAISS file
    s = torch.randn(3, built.sketcher.spec.numel)
    d1, i1 = built.candidates(s, 30)
    d2, i2 = loaded.candidates(s, 30)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(d1, d2)
    # float16 storage: half the bytes, the same candidates up to float16 ties
    half = build_gradient_index(model, ds, loss, None, "kronecker", dim=128, seed=2, float16=True)
    save_gradient_index(half, tmp_path / "h")
    size = lambda p: sum(f.stat().st_size for f in p.iterdir())  # noqa: E731
    assert size(tmp_path / "h") < 0.6 * size(tmp_path / "g")
    _, i3 = load_gradient_index(tmp_path / "h", sketcher=half.sketcher).candidates(s, 30)
    assert len(set(i3[0].tolist()) & set(i1[0].tolist())) >= 27
    # other sketch settings: refused
    other = GradientSketcher(model, loss, None, "kronecker", dim=128, seed=3)
    with pytest.raises(IndexMismatchError, match="seed"):
        load_gradient_index(tmp_path / "g", sketcher=other)
    # a feature index asked for gradients, and the other way round: a clear mismatch
    lf.FeatureIndexCallback(tmp_path / "f", progress=False).build(model, ds)
    with pytest.raises(IndexMismatchError, match="features-space candidates, but candidates='gradients'"):
        _module(model, ds, None, 10, index=tmp_path / "f").candidate_index()
    with pytest.raises(IndexMismatchError, match="gradients-space candidates, but candidates='features'"):
        _module(model, ds, None, 10, candidates="features", index=tmp_path / "g").candidate_index()
    # the module reads the folder's sketch settings and ranks exactly as with the in-memory index
    im = _module(model, ds, None, 30, index=tmp_path / "g")
    mem = _module(model, ds, None, 30, index=built)
    a, b = im.explain((xq[:2], yq[:2])), mem.explain((xq[:2], yq[:2]))
    assert [r.helpful_ids for r in a] == [r.helpful_ids for r in b]


def test_head_index_folder_from_callback_gives_the_head_fast_path(trained, tmp_path):
    model, ds, (xq, yq) = trained
    lf.GradientIndexCallback(tmp_path / "gh", params=["head.*"], progress=False).build(model, ds)
    im = _module(model, ds, ["head.*"], 20, index=tmp_path / "gh")
    im.candidate_index()
    assert im._cache is not None and im._feature_layer_name == "head"
    ref = _module(model, ds, ["head.*"], 20, score_method="jvp")
    s = im.s_test((xq[:2], yq[:2]))
    torch.testing.assert_close(
        im.score(s, torch.arange(50)), ref.score(s, torch.arange(50)), rtol=1e-4, atol=1e-6
    )


# ------------------------------------------------------------------------------------------------ real models
def test_dense_sketch_of_a_batchnorm_cnn_projects_its_per_example_gradients():
    _models = pytest.importorskip("_models")
    model, train, _ = _models.bn_cnn(n_train=24, steps=3)
    model.eval()
    loss = resolve_loss(model)
    sk = GradientSketcher(model, loss, None, "auto", dim=48, seed=0)
    assert sk.method == "dense"  # convolutions: neither head nor Kronecker
    x, _, _ = sk.sketch_rows(train, batch_size=8)
    from lightning_fastif.functional.grads import per_example_grads

    params = select_params(model, None)
    spec = ParamSpec.of(params)
    g = per_example_grads(loss, spec.flatten(params), spec, train[:24])
    # the per-example gradient of example 0 by its own backward pass (eval mode: running statistics)
    named = dict(model.named_parameters())
    l0 = nn.functional.cross_entropy(model(train[0][0][None]), train[0][1][None])
    ref0 = torch.cat([t.flatten() for t in torch.autograd.grad(l0, [named[n] for n in spec.names])])
    torch.testing.assert_close(g[0], ref0, rtol=1e-4, atol=1e-6)
    r = DenseProjection(spec.numel, 48, seed=0).matrix()
    torch.testing.assert_close(x, g @ r.T, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ DDP
class _FitNothing(__import__("lightning.pytorch", fromlist=["LightningModule"]).LightningModule):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.distributed
def test_gradient_index_built_under_ddp_equals_one_process(trained, tmp_path):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lightning_fastif.retrieval.store import load_index
    from lightning_fastif.trainer.strategy import InfluenceStrategy

    saved = dict(os.environ)
    try:
        model, ds, _ = trained
        wrapped = _FitNothing(model)
        settings = {"params": None, "sketch": "kronecker", "sketch_dim": 96, "seed": 4, "progress": False}
        lf.GradientIndexCallback(tmp_path / "one", **settings).build(wrapped, ds)
        cb = lf.GradientIndexCallback(tmp_path / "ddp", **settings)
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=2,
            strategy=InfluenceStrategy(start_method="fork", timeout=60.0),
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            callbacks=[cb],
            max_epochs=1,
            limit_train_batches=1,
        )
        trainer.fit(wrapped, DataLoader(ds, batch_size=120, shuffle=True))
        one, m1 = load_index(tmp_path / "one", expected={"space": "gradients"})
        ddp, m2 = load_index(tmp_path / "ddp", expected={"space": "gradients"})
        assert m1.sketch == m2.sketch and m1.ntotal == m2.ntotal == 240
        q = torch.randn(4, m1.dim)
        d1, i1 = one.search(q, 240)
        d2, i2 = ddp.search(q, 240)
        torch.testing.assert_close(d2, d1, rtol=1e-5, atol=1e-5)  # every row, in dataset order, once
        assert torch.equal(i1[:, :20], i2[:, :20])
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)


# ------------------------------------------------------------------------------------------------ command line
@pytest.mark.slow
def test_cli_index_influence_and_evaluate_in_gradient_space(tmp_path, capsys):
    from pathlib import Path

    from lightning_fastif.cli.app import main

    configs = Path(__file__).resolve().parents[1] / "configs"
    common = [
        "-c",
        str(configs / "digits.yaml"),
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=false",
    ]
    quiet = ["--trainer.enable_progress_bar=false"]
    main(["fit", *common, "-c", str(configs / "digits_fit.yaml"), "--trainer.max_epochs=1", *quiet])
    ckpt = f"--ckpt_path={tmp_path / 'checkpoints' / 'model.ckpt'}"
    main(
        [
            "index",
            *common,
            ckpt,
            f"--index_dir={tmp_path / 'grad'}",
            "--space=gradients",
            '--params=["head.*"]',
        ]
    )
    meta = json.loads((tmp_path / "grad" / "meta.json").read_text())
    assert meta["space"] == "gradients" and meta["sketch"]["method"] == "head"  # exact head sketches
    main(
        [
            "influence",
            *common,
            "-c",
            str(configs / "digits_influence.yaml"),
            f"--index_dir={tmp_path / 'grad'}",
            "--candidates=gradients",
            "--num_candidates=100",
            '--params=["head.*"]',
            "--queries.n=2",
            "--report=false",
            *quiet,
        ]
    )
    lines = [json.loads(x) for x in (tmp_path / "influence" / "influence.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(r["extra"]["candidates"] == "gradients" for r in lines)
    # the feature-space folder of the fit is refused for gradient candidates
    with pytest.raises(SystemExit):  # the CLI prints the error in one line and exits with 2
        main(
            [
                "influence",
                *common,
                "-c",
                str(configs / "digits_influence.yaml"),
                "--candidates=gradients",
                '--params=["head.*"]',
                "--queries.n=1",
                "--report=false",
                *quiet,
            ]
        )
    assert "features-space candidates, but candidates='gradients'" in capsys.readouterr().err
    main(
        [
            "evaluate",
            *common,
            "-c",
            str(configs / "digits_evaluate.yaml"),
            "--queries.n=2",
            "--ks=[10,100]",
            "--loo_removals=0",
            '--params=["head.*"]',
            *quiet,
        ]
    )
    ev = json.loads((tmp_path / "evaluate" / "evaluation.json").read_text())
    rows = ev["candidate_recall"]["rows"]
    assert {(r["space"], r["k"]) for r in rows} == {
        (s, k) for s in ("features", "gradients") for k in (10, 100)
    }
    assert {r["queries"] for r in rows} == {"all", "misclassified", "correct"}
    head_all = [r for r in rows if r["space"] == "gradients" and r["queries"] == "all" and r["k"] == 100]
    assert (
        head_all[0]["recall_helpful"] == 1.0
    )  # params ["head.*"]: exact head sketches, top-10 within k/2 = 50


def test_results_and_html_report_say_which_candidate_space_was_used(trained):
    from lightning_fastif.reporting.html import render_html_report

    model, ds, (xq, yq) = trained
    results = _module(model, ds, ["head.*"], 20).explain((xq[:1], yq[:1]))
    assert results[0].to_dict()["extra"]["candidates"] == "gradients"
    html = render_html_report(results, ds, TensorDataset(xq[:1], yq[:1]))
    assert "<th>candidate space</th><td>gradients</td>" in html


def test_ivf_and_hnsw_inner_product_indexes_agree_with_the_exact_search(trained, tmp_path):
    model, ds, _ = trained
    loss = resolve_loss(model)
    flat = build_gradient_index(model, ds, loss, None, "kronecker", dim=128)
    s = torch.randn(3, flat.sketcher.spec.numel)
    _, want = flat.candidates(s, 40)
    ivf = build_gradient_index(model, ds, loss, None, "kronecker", dim=128, factory="IVF4,Flat", nprobe=4)
    _, got = ivf.candidates(s, 40)  # every list probed: exact
    assert [set(r) for r in got.tolist()] == [set(r) for r in want.tolist()]
    hnsw = build_gradient_index(model, ds, loss, None, "kronecker", dim=128, factory="HNSW16", ef_search=240)
    _, got = hnsw.candidates(s, 40)
    overlap = [len(set(a) & set(b)) / 40 for a, b in zip(got.tolist(), want.tolist())]
    assert min(overlap) >= 0.9, overlap
    for name, built in (
        ("ivf", ivf),
        ("hnsw", hnsw),
    ):  # their folders read back (memory-mapped) to the same search
        save_gradient_index(built, tmp_path / name)
        loaded = load_gradient_index(tmp_path / name, sketcher=built.sketcher)
        assert torch.equal(loaded.candidates(s, 40)[1], built.candidates(s, 40)[1])
    torch_index = build_gradient_index(model, ds, loss, None, "kronecker", dim=128, backend="torch")
    _, got = torch_index.candidates(s, 40)
    assert [set(r) for r in got.tolist()] == [set(r) for r in want.tolist()]


def test_exact_head_search_in_factored_form_equals_the_sketch_search(trained, tmp_path):
    import dataclasses

    model, ds, _ = trained
    built = build_gradient_index(model, ds, resolve_loss(model), ["head.*"])
    assert built.sketcher.method == "head" and built.head_grads.shape == (240, 4)
    s = torch.randn(3, built.sketcher.spec.numel)
    dots, ids = built.candidates(s, 30)  # g^T (S phi + s_b) from features and g: no [N, C (d+1)] scan
    unfactored = dataclasses.replace(
        built, head_grads=None
    )  # the FAISS inner-product search over the sketches
    d2, i2 = unfactored.candidates(s, 30)
    assert torch.equal(ids, i2)
    torch.testing.assert_close(dots, d2, rtol=1e-4, atol=1e-5)
    save_gradient_index(built, tmp_path / "head")
    loaded = load_gradient_index(tmp_path / "head", sketcher=built.sketcher)
    assert loaded.head_grads is not None and torch.equal(loaded.candidates(s, 30)[1], ids)


def test_kronecker_sketch_of_hf_bert_layers_sums_over_tokens_and_matches_per_example_gradients():
    _models = pytest.importorskip("_models")
    pytest.importorskip("transformers")
    from lightning_fastif.functional.batch import fetch

    model, train, _ = _models.hf_bert("eager", n_train=12)
    model.eval()
    patterns = [
        "bert.encoder.layer.0.output.dense.*",
        "classifier.*",
    ]  # a token-wise Linear [B, T, 24] and the head
    loss = resolve_loss(model)
    sk = GradientSketcher(
        model, loss, patterns, "kronecker", dim=10**6
    )  # factors as large as the layers: exact
    assert sk.method == "kronecker" and all(p.r_in is None and p.r_out is None for _, p in sk.layers)
    x, _, _ = sk.sketch_rows(train, batch_size=5)
    params = select_params(model, patterns)
    spec = ParamSpec.of(params)
    ref = []
    for i in range(len(train)):  # one backward per example
        p = {n: t.detach().requires_grad_(True) for n, t in params.items()}
        g = torch.autograd.grad(loss(p, fetch(train, [i])).sum(), [p[n] for n in spec.names])
        ref.append(torch.cat([t.flatten() for t in g]))
    s = torch.randn(3, spec.numel)
    torch.testing.assert_close(x @ sk.query(s).T, torch.stack(ref) @ s.T, rtol=1e-4, atol=1e-5)


def test_gradient_index_calls_the_model_through_forward_fn(tmp_path):
    """A forward that needs more than ``batch[0]`` is called through ``forward_fn`` by the gradient callback and the
    exact head sketches, and the gradient candidates then rank like the full scan."""
    import lightning_fastif as lf

    class NeedsTemperature(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor, temperature: float) -> torch.Tensor:
            return self.head(self.body(x)) / temperature

    def fwd(model, batch):
        return model(batch[0], 2.0)

    torch.manual_seed(0)
    model = NeedsTemperature()
    x, y = torch.randn(80, 6), torch.randint(0, 3, (80,))
    train = TensorDataset(x, y)
    folder = lf.GradientIndexCallback(
        tmp_path / "grad", params=["head.*"], forward_fn=fwd, progress=False
    ).build(model, train)
    kwargs = dict(
        params=["head.*"], solver=lf.ExactSolver(damping=0.1), top_k=3, forward_fn=fwd, progress=False
    )
    knn = lf.InfluenceModule(model, train, num_candidates=40, candidates="gradients", index=folder, **kwargs)
    full = lf.InfluenceModule(model, train, num_candidates=None, **kwargs)
    query = (torch.randn(2, 6), torch.randint(0, 3, (2,)))
    for got, want in zip(knn.explain(query), full.explain(query)):
        assert got.helpful_ids == want.helpful_ids and got.harmful_ids == want.harmful_ids
        assert got.extra["candidates"] == "gradients"


def test_kronecker_sketch_of_gpt2_conv1d_layers_matches_explicit_per_example_gradients():
    """GPT-2's ``Conv1D`` (weight ``[in, out]``) is a Kronecker layer: sketches and queries against a float64 loop."""
    from _models import DictDataset
    from torch.utils.data.dataloader import default_collate
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=20, n_positions=8, n_embd=8, n_layer=1, n_head=2, n_inner=12, num_labels=3, pad_token_id=0,
        use_cache=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = GPT2ForSequenceClassification(cfg).double().eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 20, (9, 5), generator=g)
    ds = DictDataset(
        input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.randint(0, 3, (9,), generator=g)
    )
    patterns = ["transformer.h.0.attn.c_attn.*", "transformer.h.0.mlp.c_proj.weight"]
    loss = resolve_loss(model)
    params = select_params(model, patterns)
    spec = ParamSpec.of(params)
    theta = spec.flatten(params)
    ref = torch.stack(
        [torch.func.grad(lambda t, b: loss(spec.unflatten(t), b).sum())(theta, default_collate([ds[i]])) for i in range(9)]
    )  # fmt: skip
    s = torch.randn(2, spec.numel, generator=g, dtype=torch.float64)
    exact = GradientSketcher(model, loss, patterns, "kronecker", dim=10**6)
    assert [n for n, _ in exact.layers] == ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj"]
    x, _, _ = exact.sketch_rows(ds, batch_size=4)
    torch.testing.assert_close(x.double() @ exact.query(s).double().T, ref @ s.T, rtol=1e-4, atol=1e-6)
    # projected: the sketch is vec(R_g [G_W^T | g_b] R_a^T) with the Conv1D weight gradient transposed
    sk = GradientSketcher(model, loss, patterns, "kronecker", dim=40, seed=3)
    xs, _, _ = sk.sketch_rows(ds, batch_size=4)
    parts, want = spec.unflatten(ref), []
    for name, proj in sk.layers:
        cols = [parts[f"{name}.weight"].transpose(1, 2)]
        if proj.bias:
            cols.append(parts[f"{name}.bias"].unsqueeze(-1))
        full = torch.cat(cols, -1)
        ra = torch.eye(proj.in_dim, dtype=torch.float64) if proj.r_in is None else proj.r_in.double()
        rg = torch.eye(proj.out_dim, dtype=torch.float64) if proj.r_out is None else proj.r_out.double()
        want.append((rg @ full @ ra.T).flatten(1))
    torch.testing.assert_close(xs.double(), torch.cat(want, 1), rtol=1e-4, atol=1e-6)

"""Candidate indexes: FAISS against the exact torch oracle, approximate recall, the shape contract and its errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_fastif.errors import ConfigurationError
from lightning_fastif.retrieval import factory as factory_mod
from lightning_fastif.retrieval.factory import index_from_bytes, make_index
from lightning_fastif.retrieval.faiss_index import FaissIndex
from lightning_fastif.retrieval.index import TorchIndex


def _gaussian(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _clustered(n: int, d: int, clusters: int, spread: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, d, generator=g) * spread
    return centers[torch.randint(0, clusters, (n,), generator=g)] + torch.randn(n, d, generator=g)


def _recall(approx: torch.Tensor, exact: torch.Tensor) -> float:
    hits = [len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx, exact)]
    return sum(hits) / exact.numel()


@pytest.fixture(scope="module")
def oracle() -> tuple[torch.Tensor, torch.Tensor, TorchIndex]:
    x, q = _gaussian(3000, 24, 0), _gaussian(60, 24, 1)
    exact = TorchIndex(compute_dtype=torch.float64)
    exact.add(x)
    return x, q, exact


def test_faiss_flat_matches_torch_oracle(oracle: tuple[torch.Tensor, torch.Tensor, TorchIndex]) -> None:
    x, q, exact = oracle
    flat = FaissIndex("Flat")
    flat.add(x)
    d_f, i_f = flat.search(q, 20)
    d_t, i_t = exact.search(q, 20)
    assert d_f.dtype == torch.float32 and i_f.dtype == torch.int64 and d_f.shape == i_f.shape == (60, 20)
    assert torch.equal(i_f, i_t)
    torch.testing.assert_close(d_f, d_t, rtol=1e-4, atol=1e-4)
    brute = ((q[:, None, :].double() - x[None].double()) ** 2).sum(-1)
    torch.testing.assert_close(d_t, brute.sort(1).values[:, :20].float(), rtol=1e-5, atol=1e-5)


def test_torch_index_chunking_and_float32_agree_with_oracle(oracle) -> None:  # type: ignore[no-untyped-def]
    x, q, exact = oracle
    small = TorchIndex(max_block=997)  # many query and database chunks
    small.add(x[:1000])
    small.add(x[1000:])  # two adds
    d_s, i_s = small.search(q, 15)
    d_t, i_t = exact.search(q, 15)
    assert torch.equal(i_s, i_t)
    torch.testing.assert_close(d_s, d_t, rtol=1e-4, atol=1e-4)


def test_custom_ids_come_back_from_every_backend(oracle) -> None:  # type: ignore[no-untyped-def]
    x, q, exact = oracle
    ids = torch.randperm(3000, generator=torch.Generator().manual_seed(3)) * 7 + 5
    results = []
    for index in (TorchIndex(), FaissIndex("Flat"), FaissIndex("IVF16,Flat", nprobe=16)):
        index.add(x.numpy(), ids)  # numpy features work too
        assert torch.equal(torch.sort(index.ids).values, torch.sort(ids).values)
        results.append(index.search(q, 5)[1])
    expected = ids[exact.search(q, 5)[1]]
    for got in results:
        assert torch.equal(got, expected)


def test_ivf_recall_on_clustered_data() -> None:
    # 20,000 points in 200 overlapping Gaussian clusters (d = 32), 300 perturbed queries, recall@10 against exact.
    # Measured (faiss-cpu 1.15.1, one thread): nprobe 1: 0.881, default nprobe = nlist // 8 = 8: 0.991,
    # nprobe 16: 0.998, nprobe 64 (every list): 1.0.
    x = _clustered(20_000, 32, 200, 1.5, seed=0)
    g = torch.Generator().manual_seed(1)
    q = x[torch.randperm(20_000, generator=g)[:300]] + 0.3 * torch.randn(300, 32, generator=g)
    exact = TorchIndex()
    exact.add(x)
    truth = exact.search(q, 10)[1]
    recalls = {}
    for nprobe in (1, None, 64):
        ivf = make_index("IVF64,Flat", nprobe=nprobe)
        ivf.add(x)
        recalls[nprobe] = _recall(ivf.search(q, 10)[1], truth)
    print(f"IVF64,Flat recall@10 by nprobe: {recalls}")
    assert recalls[None] >= 0.97
    assert recalls[1] < recalls[None]
    assert recalls[64] == 1.0


def test_hnsw_smoke(oracle) -> None:  # type: ignore[no-untyped-def]
    x, q, exact = oracle
    hnsw = make_index("HNSW16", ef_search=32)
    hnsw.add(x)
    d, i = hnsw.search(q, 40)  # k > ef_search: ef_search is raised to k
    assert i.shape == (60, 40) and (i >= 0).all()
    assert _recall(i[:, :10], exact.search(q, 10)[1]) >= 0.9
    assert torch.all(d[:, 1:] >= d[:, :-1] - 1e-5)


def test_approximate_search_never_returns_missing_ids() -> None:
    x = _clustered(2000, 8, 20, 4.0, seed=2)
    ivf = FaissIndex("IVF32,Flat", nprobe=1)
    ivf.add(x)
    _, ids = ivf.search(x[:10], 500)  # one list holds far fewer than 500 rows
    assert (ids >= 0).all() and all(len(set(r.tolist())) == 500 for r in ids)


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat", "HNSW8", "torch"])
def test_bytes_round_trip(factory: str, oracle) -> None:  # type: ignore[no-untyped-def]
    x, q, _ = oracle
    index = (
        TorchIndex() if factory == "torch" else FaissIndex(factory, nprobe=4 if "IVF" in factory else None)
    )
    index.add(x[:1000], torch.arange(1000) + 10)
    back = index_from_bytes(index.to_bytes(), index.backend, index.factory, config=index.config())
    assert (
        type(back) is type(index)
        and back.ntotal == 1000
        and back.dim == 24
        and back.config() == index.config()
    )
    assert torch.equal(torch.sort(back.ids).values, torch.arange(1000) + 10)
    for a, b in zip(index.search(q, 7), back.search(q, 7)):
        assert torch.equal(a, b)


def test_k_must_be_in_range(oracle) -> None:  # type: ignore[no-untyped-def]
    _, q, exact = oracle
    for k in (0, -1, 3001, True, 2.0):
        with pytest.raises(ConfigurationError, match=rf"`k`.*ntotal=3000.*got {k!r}"):
            exact.search(q, k)  # type: ignore[arg-type]


def test_feature_and_query_validation() -> None:
    index = FaissIndex("Flat")
    index.add(torch.arange(12).reshape(4, 3))  # integers are converted to float32
    assert index.dim == 3 and index.ntotal == 4
    assert torch.equal(index.search(np.zeros((1, 3), dtype=np.float64), 1)[1], torch.tensor([[0]]))
    with pytest.raises(ConfigurationError, match=r"`queries`.*3 columns.*\(2, 5\)"):
        index.search(torch.zeros(2, 5), 1)
    with pytest.raises(ConfigurationError, match=r"`queries`.*at least one row"):
        index.search(torch.zeros(0, 3), 1)
    with pytest.raises(ConfigurationError, match=r"`queries`.*shape \[n, d\]"):
        index.search(torch.zeros(3), 1)
    with pytest.raises(ConfigurationError, match=r"`queries`.*finite.*1 rows"):
        index.search(torch.tensor([[0.0, 1.0, 2.0], [float("nan"), 0.0, 0.0]]), 1)
    with pytest.raises(ConfigurationError, match=r"`features`.*finite"):
        index.add(torch.tensor([[float("inf"), 0.0, 0.0]]))
    with pytest.raises(ConfigurationError, match=r"`features`.*tensor or numpy"):
        index.add([[1.0, 2.0, 3.0]])  # type: ignore[arg-type]
    assert index.ntotal == 4  # nothing was added by the failed calls


def test_id_validation() -> None:
    index = TorchIndex()
    index.add(torch.zeros(3, 2), [4, 5, 6])
    with pytest.raises(ConfigurationError, match=r"already indexed"):
        index.add(torch.zeros(1, 2), [5])
    with pytest.raises(ConfigurationError, match=r"unique"):
        index.add(torch.zeros(2, 2), [8, 8])
    with pytest.raises(ConfigurationError, match=r"non-negative"):
        index.add(torch.zeros(1, 2), [-1])
    with pytest.raises(ConfigurationError, match=r"shape \(2,\)"):
        index.add(torch.zeros(2, 2), [9])
    with pytest.raises(ConfigurationError, match=r"integers"):
        index.add(torch.zeros(1, 2), torch.tensor([1.5]))
    index.add(torch.ones(2, 2))  # default ids continue after the largest
    assert index.ids.tolist() == [4, 5, 6, 7, 8]


def test_make_index_arguments_and_faiss_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(make_index(), FaissIndex) and isinstance(make_index(backend="torch"), TorchIndex)
    with pytest.raises(ConfigurationError, match=r"`backend`.*'annoy'"):
        make_index(backend="annoy")
    with pytest.raises(ConfigurationError, match=r"`factory`.*'Flat' with backend='torch'"):
        make_index("IVF8,Flat", backend="torch")
    with pytest.raises(ConfigurationError, match=r"`factory`.*'NotAnIndex'"):
        make_index("NotAnIndex").add(torch.zeros(4, 2))
    with pytest.raises(ConfigurationError, match=r"`nprobe`"):
        make_index("IVF8,Flat", nprobe=0)
    with pytest.raises(ConfigurationError, match=r"enough vectors to train.*'IVF64,Flat'.*got 10"):
        make_index("IVF64,Flat").add(torch.randn(10, 4))

    def no_faiss() -> None:
        raise ImportError("No module named 'faiss'")

    monkeypatch.setattr(factory_mod, "_import_faiss", no_faiss)
    with pytest.warns(UserWarning, match=r"FAISS cannot be imported.*exact torch index"):
        index = make_index("IVF64,Flat", nprobe=4)
    assert isinstance(index, TorchIndex)

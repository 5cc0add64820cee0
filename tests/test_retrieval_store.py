"""Index folders: round trip, provenance checks, corruption errors, and atomic replacement under SIGKILL."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import lightning_fastif
from lightning_fastif._files import leftovers
from lightning_fastif.errors import ConfigurationError, IndexCorruptError, IndexMismatchError
from lightning_fastif.functional.params import fingerprint
from lightning_fastif.retrieval.faiss_index import FaissIndex
from lightning_fastif.retrieval.index import TorchIndex
from lightning_fastif.retrieval.store import IndexMeta, load_arrays, load_index, save_index

REPO = Path(__file__).resolve().parents[1]
N, D = 40_000, 64  # 10 MB of float32 per index: a save takes long enough to be killed in the middle
CHILD = r"""
import os, sys
import numpy as np
from lightning_fastif.retrieval import FaissIndex, save_index

folder, mode = sys.argv[1], sys.argv[2]
n, d = int(sys.argv[3]), int(sys.argv[4])
base = np.random.default_rng(0).standard_normal((n, d), dtype=np.float32)
indexes = []
for v in range(3):
    indexes.append(FaissIndex("Flat"))
    indexes[-1].add(base + v)
if mode == "window":  # die between the two renames of the swap
    real = os.rename
    def rename(src, dst):
        real(src, dst)
        if ".old-" in os.fspath(dst):
            os.kill(os.getpid(), 9)
    os.rename = rename
print("ready", flush=True)
i = 0
while True:
    save_index(indexes[i % 3], folder, {"dataset_length": n, "version": i % 3})
    print("saved", i, flush=True)
    i += 1
"""


def _small_index(backend: str = "faiss", shift: float = 0.0) -> FaissIndex | TorchIndex:
    index = FaissIndex("Flat") if backend == "faiss" else TorchIndex()
    index.add(torch.randn(50, 8, generator=torch.Generator().manual_seed(0)) + shift)
    return index


def _meta(**kw: object) -> dict[str, object]:
    return {"feature_layer": "model.head", "dataset_length": 50, "model_fingerprint": "abc123", **kw}


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_round_trip_keeps_index_meta_and_arrays(tmp_path: Path, backend: str) -> None:
    index = _small_index(backend)
    logits = torch.randn(50, 3)
    model = nn.Linear(8, 3)
    written = save_index(
        index, tmp_path / "idx", _meta(model_fingerprint=fingerprint(model)), arrays={"logits": logits}
    )
    loaded, meta = load_index(tmp_path / "idx", expected={"model_fingerprint": fingerprint(model), "dim": 8})
    assert meta == written and type(loaded) is type(index)
    assert (meta.dim, meta.ntotal, meta.dataset_length, meta.backend, meta.factory) == (
        8,
        50,
        50,
        backend,
        "Flat",
    )
    assert meta.library_version == lightning_fastif.__version__ and meta.created
    index_file = tmp_path / "idx" / meta.index_file
    assert meta.files[index_file.name]["sha256"] == hashlib.sha256(index_file.read_bytes()).hexdigest()
    q = torch.randn(5, 8)
    for a, b in zip(index.search(q, 4), loaded.search(q, 4)):
        assert torch.equal(a, b)
    assert torch.equal(loaded.ids, torch.arange(50))
    assert torch.equal(load_arrays(tmp_path / "idx")["logits"], logits)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temporary folder left
    assert json.loads((tmp_path / "idx" / "meta.json").read_text())["feature_layer"] == "model.head"


def test_mismatch_names_every_differing_field(tmp_path: Path) -> None:
    save_index(_small_index(), tmp_path / "idx", _meta())
    expected = {"model_fingerprint": "fff999", "dataset_length": 60, "feature_layer": "head"}
    with pytest.raises(IndexMismatchError) as info:
        load_index(tmp_path / "idx", expected=expected)
    msg = str(info.value)
    assert "model_fingerprint: the index has 'abc123', expected 'fff999'" in msg
    assert "dataset_length: the index has 50, expected 60" in msg
    assert "feature_layer" not in msg  # "head" and "model.head" differ only by a wrapper prefix
    with pytest.warns(UserWarning, match=r"dataset_length"):
        index, meta = load_index(tmp_path / "idx", expected=expected, ignore_mismatch=True)
    assert index.ntotal == 50 and meta.dataset_length == 50
    load_index(tmp_path / "idx", expected={"model_fingerprint": None, "dataset_length": 50})
    with pytest.raises(
        IndexMismatchError, match=r"feature_layer: the index has 'model.head', expected 'body'"
    ):
        load_index(tmp_path / "idx", expected={"feature_layer": "body"})
    with pytest.raises(ConfigurationError, match=r"`expected`.*'colour'"):
        load_index(tmp_path / "idx", expected={"colour": "red"})


def test_missing_or_damaged_folders_are_corrupt_errors(tmp_path: Path) -> None:
    with pytest.raises(IndexCorruptError, match=r"No candidate index exists.*does not exist.*Rebuild"):
        load_index(tmp_path / "nowhere")
    folder = tmp_path / "idx"
    meta = save_index(_small_index(), folder, _meta())
    data = (folder / "index.faiss").read_bytes()
    (folder / "index.faiss").write_bytes(data[: len(data) // 2])
    with pytest.raises(IndexCorruptError, match=r"index.faiss.*truncated or corrupt.*bytes.*Rebuild"):
        load_index(folder)
    (folder / "index.faiss").unlink()
    with pytest.raises(IndexCorruptError, match=r"missing index.faiss.*Rebuild"):
        load_index(folder)
    save_index(_small_index(), folder, _meta())
    (folder / "ids.npy").write_bytes(b"\x93NUMPY")
    with pytest.raises(IndexCorruptError, match=r"ids.npy.*truncated"):
        load_index(folder)
    (folder / "meta.json").write_text("{not json")
    with pytest.raises(IndexCorruptError, match=r"meta.json.*cannot be read"):
        load_index(folder)
    (folder / "meta.json").unlink()
    with pytest.raises(IndexCorruptError, match=r"no meta.json.*not a complete index"):
        load_index(folder)
    assert meta.files["index.faiss"]["bytes"] == len(data)
    save_index(_small_index(), folder, _meta())  # a damaged index folder may be overwritten
    assert load_index(folder)[0].ntotal == 50


def test_save_refuses_what_it_must_not_replace(tmp_path: Path) -> None:
    save_index(_small_index(), tmp_path / "idx", _meta())
    with pytest.raises(ConfigurationError, match=r"overwrite=True"):
        save_index(_small_index(), tmp_path / "idx", _meta(), overwrite=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigurationError, match=r"other files.*notes.txt"):
        save_index(_small_index(), tmp_path / "mine", _meta())
    assert (tmp_path / "mine" / "notes.txt").exists()
    with pytest.raises(ConfigurationError, match=r"empty index"):
        save_index(TorchIndex(), tmp_path / "empty", _meta())
    with pytest.raises(ConfigurationError, match=r"`arrays`"):
        save_index(_small_index(), tmp_path / "idx", _meta(), arrays={"ids": np.zeros(3)})


def test_meta_round_trips_unknown_keys_as_extra() -> None:
    meta = IndexMeta.from_dict({"dataset_length": 3, "version": 2, "extra": {"a": 1}})
    assert meta.extra == {"a": 1, "version": 2} and IndexMeta.from_dict(meta.to_dict()) == meta


def _spawn(folder: Path, mode: str, n: int = N, d: int = D) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(folder), mode, str(n), str(d)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", proc.stderr.read()  # type: ignore[union-attr]
    return proc


def _check_complete(folder: Path, base: np.ndarray) -> int:
    index, meta = load_index(folder)
    version = meta.extra["version"]
    assert version in (0, 1, 2) and index.ntotal == meta.ntotal == meta.dataset_length == len(base)
    distances, ids = index.search(base[:4] + version, 1)
    assert ids[:, 0].tolist() == [0, 1, 2, 3] and float(distances.max()) < 1e-3
    return version


def test_killed_writer_leaves_previous_index_or_none(tmp_path: Path) -> None:
    base = np.random.default_rng(0).standard_normal((N, D), dtype=np.float32)
    folder = tmp_path / "idx"
    rng = random.Random(0)
    saved_before = False
    outcomes = []
    for trial in range(5):
        proc = _spawn(folder, "loop")
        time.sleep(rng.uniform(0.0, 0.01 if trial == 0 else 0.6))  # the first kill lands in the first save
        proc.kill()
        out, _ = proc.communicate()
        saves = out.count("saved")
        outcomes.append(f"leftovers {sorted(kind for kind, _, _ in leftovers(folder))}:")
        try:
            outcomes[-1] += f" v{_check_complete(folder, base)} after {saves} saves"
        except IndexCorruptError as err:
            assert not saved_before and saves == 0 and "does not exist" in str(err), err
            outcomes[-1] += " none"
        saved_before = saved_before or saves > 0
    print("outcomes after SIGKILL:", outcomes)
    assert saved_before
    save_index(_small_index(), folder, _meta())  # cleans dead writers' leftovers
    assert leftovers(folder) == [] and load_index(folder)[0].ntotal == 50


def test_kill_between_the_two_renames_keeps_the_previous_index(tmp_path: Path) -> None:
    n, d = 2000, 16
    base = np.random.default_rng(0).standard_normal((n, d), dtype=np.float32)
    folder = tmp_path / "idx"
    proc = _spawn(folder, "window", n, d)
    proc.wait(timeout=60)
    assert proc.returncode == -9
    assert not folder.exists() and {kind for kind, _, _ in leftovers(folder)} == {"old", "tmp"}
    assert _check_complete(folder, base) == 0  # the previous index, read from the renamed-away folder
    save_index(_small_index(), folder, _meta())
    assert leftovers(folder) == [] and load_index(folder)[1].dataset_length == 50


def test_importing_retrieval_imports_neither_lightning_nor_wandb_nor_faiss() -> None:
    code = "import sys, lightning_fastif.retrieval; print(sorted(m for m in ('lightning', 'wandb', 'faiss') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.stdout.strip() == "[]", out.stderr

"""JSON Lines: round trip, durability line by line, and tolerance of a run killed mid-write."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from lightning_fastif.errors import ConfigurationError
from lightning_fastif.reporting.jsonl import JsonlWriter, read_jsonl
from lightning_fastif.results import InfluenceResult

REPO = Path(__file__).resolve().parents[1]


def _result(query_id: int) -> InfluenceResult:
    return InfluenceResult(
        query_id=query_id,
        label=query_id % 3,
        prediction=(query_id + 1) % 3,
        helpful_ids=[query_id + 10, 4],
        helpful_scores=[-0.25, -0.125],
        harmful_ids=[7],
        harmful_scores=[0.5],
        num_candidates=100,
        query_loss=0.75,
        helpful_distances=[1.0, 2.0],
        harmful_distances=[3.0],
        extra={"timing": {"s_test_s": 0.5}, "note": "ü"},
    )


def test_round_trip_across_writers_appends(tmp_path: Path) -> None:
    path = tmp_path / "out" / "influence.jsonl"
    with JsonlWriter(path) as writer:
        assert writer.write_many([_result(0), _result(1)]) == 2
    with JsonlWriter(path) as writer:
        writer.write(_result(2).to_dict())  # dicts are accepted too
    assert read_jsonl(path) == [_result(0), _result(1), _result(2)]
    assert all(json.loads(line) for line in path.read_text(encoding="utf-8").splitlines())


def test_non_finite_scores_are_written_as_null(tmp_path: Path) -> None:
    result = _result(0)
    result.helpful_scores = [float("nan"), -1.0]
    with JsonlWriter(tmp_path / "r.jsonl") as writer:
        writer.write(result)
    assert "NaN" not in (tmp_path / "r.jsonl").read_text()
    assert read_jsonl(tmp_path / "r.jsonl")[0].helpful_scores == [None, -1.0]


def test_truncated_last_line_is_skipped_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "influence.jsonl"
    with JsonlWriter(path) as writer:
        writer.write_many([_result(i) for i in range(3)])
    line = json.dumps(_result(3).to_dict())
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line[: len(line) // 2])
    with pytest.warns(UserWarning, match="truncated last line"):
        results = read_jsonl(path)
    assert [r.query_id for r in results] == [0, 1, 2]


def test_corrupt_line_in_the_middle_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "influence.jsonl"
    path.write_text(json.dumps(_result(0).to_dict()) + "\n{oops\n" + json.dumps(_result(1).to_dict()) + "\n")
    with pytest.raises(ConfigurationError, match=r"`path`.*line 2"):
        read_jsonl(path)


def test_writer_cuts_a_partial_last_line_before_appending(tmp_path: Path) -> None:
    path = tmp_path / "influence.jsonl"
    path.write_text(json.dumps(_result(0).to_dict()) + "\n" + '{"query_id": 1, "lab')
    with pytest.warns(UserWarning, match="partial line"), JsonlWriter(path) as writer:
        writer.write(_result(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [r.query_id for r in read_jsonl(path)] == [0, 2]


def test_writer_keeps_a_complete_last_line_that_lacks_its_newline(tmp_path: Path) -> None:
    path = tmp_path / "influence.jsonl"
    path.write_text(json.dumps(_result(0).to_dict()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with JsonlWriter(path) as writer:
            writer.write(_result(1))
        assert [r.query_id for r in read_jsonl(path)] == [0, 1]


def test_lines_are_on_disk_when_the_process_dies_without_closing(tmp_path: Path) -> None:
    path = tmp_path / "influence.jsonl"
    code = textwrap.dedent(
        f"""
        import os
        from lightning_fastif.reporting.jsonl import JsonlWriter
        from lightning_fastif.results import InfluenceResult
        writer = JsonlWriter({str(path)!r})
        for i in range(3):
            writer.write(InfluenceResult(i, 0, 0, [1], [-1.0], [2], [1.0], num_candidates=3))
        os._exit(1)  # killed: no close, no interpreter clean-up
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60, check=False)
    assert done.returncode == 1, done.stderr.decode()
    assert [r.query_id for r in read_jsonl(path)] == [0, 1, 2]


def test_writer_is_lazy_and_pickles(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "influence.jsonl"
    writer = JsonlWriter(path)
    assert not path.exists()
    writer.write(_result(0))
    clone = pickle.loads(pickle.dumps(writer))
    writer.close()
    clone.write(_result(1))
    clone.close()
    assert [r.query_id for r in read_jsonl(path)] == [0, 1]


def test_bad_inputs_name_the_argument(tmp_path: Path) -> None:
    writer = JsonlWriter(tmp_path / "x.jsonl")
    with pytest.raises(ConfigurationError, match=r"`results\[0\]`.*InfluenceResult.*str"):
        writer.write("not a result")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"`results\[0\]`.*complete InfluenceResult"):
        writer.write({"query_id": 0})
    writer.close()
    with pytest.raises(ConfigurationError, match="closed"):
        writer.write(_result(0))
    with pytest.raises(ConfigurationError, match="`path`"):
        JsonlWriter(3)  # type: ignore[arg-type]

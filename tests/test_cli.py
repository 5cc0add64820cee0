"""The lightning-fastif command line: every shipped config end to end with tiny overrides, and its errors."""

import glob
import json
import os
import re
from pathlib import Path

import pytest

from lightning_fastif.cli.app import main
from lightning_fastif.errors import ConfigurationError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
MNIST = ROOT.parent / "shared" / "data" / "mnist" / "mnist.npz"
QUIET = ["--trainer.enable_progress_bar=false"]


def _run(*args):
    main([str(a) for a in args])


@pytest.fixture(autouse=True)
def _debug(monkeypatch):
    """Errors propagate as exceptions here (LIGHTNING_FASTIF_DEBUG=1); tests/test_cli_errors.py checks what a
    person sees without it."""
    monkeypatch.setenv("LIGHTNING_FASTIF_DEBUG", "1")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """fit (with the index callback) on digits, once for the module: a few epochs only."""
    import logging

    root = tmp_path_factory.mktemp("digits")
    os.environ["WANDB_MODE"] = "offline"
    said: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = said.append  # type: ignore[method-assign]
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    rank_zero.addHandler(handler)
    _run(
        "fit",
        "-c",
        CONFIGS / "digits.yaml",
        "-c",
        CONFIGS / "digits_fit.yaml",
        f"--trainer.default_root_dir={root}",
        "--trainer.max_epochs=4",
        *QUIET,
    )
    rank_zero.removeHandler(handler)
    (root / "fit_messages.txt").write_text("\n".join(r.getMessage() for r in said))
    yield root
    import wandb

    wandb.finish()  # Lightning never finishes the run: a later WandbLogger of the session would reuse it


def _influence_args(root, *extra):
    return [
        "influence",
        "-c",
        CONFIGS / "digits.yaml",
        "-c",
        CONFIGS / "digits_influence.yaml",
        f"--trainer.default_root_dir={root}",
        "--solver.init_args.tol=1e-4",  # the shipped AutoSolver: CG on Gauss-Newton here, to a looser tolerance
        "--queries.n=3",
        *QUIET,
        *extra,
    ]


def test_digits_fit_influence_evaluate_with_wandb_offline(digits_run, caplog):
    import logging

    root = digits_run
    assert (root / "checkpoints" / "model.ckpt").is_file() and (root / "index" / "meta.json").is_file()
    with caplog.at_level(logging.INFO):
        _run(*_influence_args(root))
    # the W&B run folder is printed, with the command that uploads it (`make demo` shows it)
    assert re.search(
        r"run folder \S*/wandb/offline-run-\S+ \(offline: upload it with `wandb sync ", caplog.text
    )
    lines = (root / "influence" / "influence.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(len(json.loads(line)["helpful_ids"]) == 8 for line in lines)
    html = (root / "influence" / "report.html").read_text()
    assert html.count("data:image/png;base64") > 3 * 16  # queries and their training examples rendered
    tables = glob.glob(
        str(root / "wandb" / "offline-run-*" / "files" / "media" / "table" / "influence_*.table.json")
    )
    assert tables, "the W&B table is in the offline run files"
    table = json.loads(Path(tables[-1]).read_text())
    assert "train_id" in table["columns"] and len(table["data"]) == 3 * 2 * 8
    import wandb

    wandb.finish()
    _run(
        "evaluate",
        "-c",
        CONFIGS / "digits.yaml",
        "-c",
        CONFIGS / "digits_evaluate.yaml",
        f"--trainer.default_root_dir={root}",
        "--trainer.logger=false",
        "--queries.n=2",
        "--ks=[10,100]",
        "--loo_removals=3",
        *QUIET,
    )
    ev = json.loads((root / "evaluate" / "evaluation.json").read_text())
    assert [r["k"] for r in ev["knn_recall"]["rows"]] == [10, 100]
    assert (
        ev["solver_agreement"]["spearman"] >= 0.99
    )  # the default (auto: Exact on the head) vs a tight reference
    assert len(ev["leave_one_out"]["actual"]) == 3


def test_fit_announces_its_wandb_run_folder(digits_run):
    said = (digits_run / "fit_messages.txt").read_text()
    assert re.search(
        r"training curves are in the W&B run folder \S*/wandb/offline-run-\S+ \(offline: upload it with "
        r"`wandb sync ",
        said,
    ), said


def test_index_subcommand_rebuilds_the_fit_index(digits_run, tmp_path):
    _run(
        "index",
        "-c",
        CONFIGS / "digits.yaml",
        f"--trainer.default_root_dir={digits_run}",
        f"--ckpt_path={digits_run / 'checkpoints' / 'model.ckpt'}",
        f"--index_dir={tmp_path / 'idx'}",
        "--trainer.logger=false",
    )
    a = json.loads((digits_run / "index" / "meta.json").read_text())
    b = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert a["model_fingerprint"] == b["model_fingerprint"] and a["ntotal"] == b["ntotal"]


def test_influence_rerun_reuses_same_settings_recomputes_other_params_and_overwrite(
    digits_run, tmp_path, caplog
):
    """Issue 17: a rerun into the same folder says what it reuses; other `params` (the README's head-only run after
    the demo) recompute and say which setting changed; `--overwrite` recomputes everything."""
    import logging

    out = tmp_path / "out"
    args = [f"--output_dir={out}", "--trainer.logger=false", "--report=false"]

    def run(*extra):
        import warnings

        caplog.clear()
        with caplog.at_level(logging.INFO), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _run(*_influence_args(digits_run, *args, *extra))
        return caplog.text + "\n".join(str(w.message) for w in caught)

    run()
    first = (out / "influence.jsonl").read_text()
    said = run()
    assert "reusing 3 records made with the same settings; --overwrite to recompute" in said
    assert "explained no new query: all 3 were reused from records made with the same settings" in said
    assert "stages: )" not in said and (out / "influence.jsonl").read_text() == first
    said = run("--params=[head.*]")
    assert "settings changed: params -> recomputing" in said and "explained 3 queries" in said
    said = run("--params=[head.*]", "--overwrite")
    assert "overwrite: recomputing every query" in said and "explained 3 queries" in said


def test_unknown_config_key_is_a_parser_error_not_a_traceback(digits_run, capsys, monkeypatch):
    monkeypatch.delenv("LIGHTNING_FASTIF_DEBUG")
    with pytest.raises(SystemExit) as exc:
        _run(*_influence_args(digits_run, "--num_candidatez=5"))
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert "num_candidatez" in err and "Traceback" not in err


def test_checkpoint_that_does_not_match_the_model(digits_run, tmp_path):
    import torch

    from lightning_fastif.zoo.digits import DigitsClassifier

    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": DigitsClassifier(hidden=32).state_dict()}, other)  # weights of another shape
    with pytest.raises(ConfigurationError, match="does not match the model.*shape mismatches.*body.1.weight"):
        _run(*_influence_args(digits_run, f"--ckpt_path={other}", "--trainer.logger=false"))


def test_index_folder_that_does_not_exist(digits_run, tmp_path):
    with pytest.raises(ConfigurationError, match="`index_dir`.*does not exist"):
        _run(*_influence_args(digits_run, f"--index_dir={tmp_path / 'missing'}", "--trainer.logger=false"))


def test_index_folder_recoverable_from_its_old_sibling_is_accepted(digits_run, tmp_path):
    import shutil

    # a save killed between its two renames leaves only the complete old folder, hidden beside the index path
    shutil.copytree(digits_run / "index", tmp_path / ".index.old-999999-abc123")
    _run(
        *_influence_args(
            digits_run,
            f"--index_dir={tmp_path / 'index'}",
            f"--output_dir={tmp_path / 'out'}",
            "--trainer.logger=false",
            "--queries.n=1",
        )
    )
    assert len((tmp_path / "out" / "influence.jsonl").read_text().splitlines()) == 1


def test_query_id_out_of_range(digits_run):
    with pytest.raises(ConfigurationError, match=r"`queries.ids`.*\[0, 359\).*\[5000\]"):
        _run(
            *_influence_args(
                digits_run, "--queries.select=ids", "--queries.ids=[1,5000]", "--trainer.logger=false"
            )
        )


def test_missing_checkpoint_file(digits_run, tmp_path):
    with pytest.raises(ConfigurationError, match="`ckpt_path`"):
        _run(*_influence_args(digits_run, f"--ckpt_path={tmp_path / 'none.ckpt'}", "--trainer.logger=false"))


@pytest.mark.skipif(not MNIST.is_file(), reason=f"needs the shared MNIST file at {MNIST}")
def test_mnist_configs_with_ivf_index_and_fast_lissa(tmp_path):
    common = [
        "-c",
        CONFIGS / "mnist.yaml",
        f"--trainer.default_root_dir={tmp_path}",
        f"--data.init_args.path={MNIST}",
        "--data.init_args.train_size=3000",
        "--trainer.logger=false",
        *QUIET,
    ]
    _run(
        "fit",
        *common[:2],
        "-c",
        CONFIGS / "mnist_fit.yaml",
        *common[2:],
        "--trainer.max_epochs=1",
        "--trainer.callbacks.index_factory=IVF16,Flat",
    )
    meta = json.loads((tmp_path / "index" / "meta.json").read_text())
    assert meta["factory"] == "IVF16,Flat" and meta["ntotal"] == 3000
    _run(
        "influence",
        *common[:2],
        "-c",
        CONFIGS / "mnist_influence.yaml",
        *common[2:],
        "--solver.init_args.tol=1e-4",
        "--queries.n=2",
        "--num_candidates=200",
    )
    lines = (tmp_path / "influence" / "influence.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["num_candidates"] == 200

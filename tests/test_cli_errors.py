"""The command line as a person meets it (issue 9, items 15 and 16): one clear line per error, exit code 2 for
usage and configuration errors, a traceback only with --debug, "did you mean" for typos, the library's options
first in --help, and --threads. None of these needs a trained model: each fails before one would be loaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lightning_fastif.cli.app import main
from lightning_fastif.threads import default_threads, set_num_threads

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("LIGHTNING_FASTIF_DEBUG", raising=False)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _influence(tmp_path, *extra):
    return [
        "influence",
        "-c",
        str(CONFIGS / "digits.yaml"),
        "-c",
        str(CONFIGS / "digits_influence.yaml"),
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=false",
        *extra,
    ]


def _fails(capsys, argv) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "usage:" not in err, err
    return exc.value.code, err


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("lightning-fastif")]


def test_a_typo_says_did_you_mean_in_one_line_with_exit_code_2(tmp_path, capsys):
    code, err = _fails(capsys, _influence(tmp_path, "--top_kk=3"))
    assert code == 2
    (line,) = _error_lines(err)
    assert line == (
        "lightning-fastif influence: error: unrecognized arguments: --top_kk=3; did you mean --top_k?"
    )
    code, err = _fails(capsys, _influence(tmp_path, "--queries.splt=test"))
    assert code == 2 and "did you mean --queries.split?" in err


def test_debug_flag_and_env_give_the_traceback(tmp_path, monkeypatch):
    with pytest.raises(Exception, match="unrecognized arguments"):
        main(["--debug", *_influence(tmp_path, "--top_kk=3")])
    assert (
        "LIGHTNING_FASTIF_DEBUG" not in os.environ
    )  # --debug ends with its command (main called in-process)
    monkeypatch.setenv("LIGHTNING_FASTIF_DEBUG", "1")
    with pytest.raises(Exception, match="unrecognized arguments"):
        main(_influence(tmp_path, "--top_kk=3"))


def test_score_batch_size_zero_is_reported_under_its_own_name(tmp_path, capsys):
    code, err = _fails(capsys, _influence(tmp_path, "--score_batch_size=0"))
    assert code == 2
    assert _error_lines(err) == [
        "lightning-fastif influence: error: Expected `score_batch_size` to be a positive int, but got 0."
    ]


def test_a_text_file_as_checkpoint_is_a_clear_error_not_a_key_error(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("epoch 3 looked good\n")
    code, err = _fails(capsys, _influence(tmp_path, f"--ckpt_path={text}"))
    assert code == 2 and "KeyError" not in err and "Unpickl" not in err
    (line,) = _error_lines(err)
    assert "`ckpt_path` to be a checkpoint written by Lightning or torch.save" in line
    assert "'epoch 3 looked good'" in line


def test_an_output_dir_that_is_a_file_fails_before_the_checkpoint_is_read(tmp_path, capsys):
    blocker = tmp_path / "results"
    blocker.write_text("x")
    code, err = _fails(capsys, _influence(tmp_path, f"--output_dir={blocker}", "--ckpt_path=null"))
    assert code == 2 and "`output_dir`" in err and "is an existing file" in err


def test_a_configuration_error_at_run_time_exits_2_with_the_message_alone(tmp_path, capsys):
    code, err = _fails(capsys, _influence(tmp_path, "--queries.split=foo"))
    assert code == 2
    assert _error_lines(err) == [
        "lightning-fastif influence: error: Expected `queries.split` to be train, val, test or predict, "
        "but got 'foo'."
    ]


def test_influence_help_lists_the_library_options_before_lightnings(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["influence", "--help-all"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    own = [out.index(f"  --{name} ") for name in ("ckpt_path", "index_dir", "output_dir", "top_k")]
    assert max(own) < out.index("--trainer.accelerator") < out.index("--model ")
    assert len(out.splitlines()[0]) < 160  # the usage line no longer lists every option


def test_influence_help_is_short_and_lists_threads_and_debug(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["influence", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--top_k" in out and "--queries.n" in out and "--trainer.accelerator" not in out
    assert "--threads N|auto" in out and "--debug" in out and "--help-all" in out
    assert len(out.splitlines()) < 150, len(out.splitlines())  # was 529 with Lightning's options


def _fresh(argv: list[str]) -> tuple[str, str]:
    """Run ``lightning_fastif.cli.main`` (the console script) in a fresh interpreter: (stderr, what it reports)."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom lightning_fastif.cli import main\ntry:\n    main(sys.argv[1:])\n"
        "except SystemExit as e:\n    print('exit', e.code, 'lightning imported:', 'lightning' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    return proc.stderr, proc.stdout.strip()


def test_a_mistyped_subcommand_says_did_you_mean_before_importing_lightning():
    err, report = _fresh(["influense", "-c", "configs/digits.yaml"])
    assert report == "exit 2 lightning imported: False"
    assert err.strip().startswith(
        "lightning-fastif: error: unknown subcommand 'influense'; did you mean influence?"
    ), err


def test_a_missing_config_file_is_named_before_importing_lightning():
    err, report = _fresh(["influence", "-c", "configs/digit.yaml", "--threads", "2"])
    assert report == "exit 2 lightning imported: False"
    assert "Expected `-c` to name a config file, but 'configs/digit.yaml' does not exist" in err
    assert "did you mean configs/digits.yaml?" in err
    err, report = _fresh(["--threads", "many", "influence"])
    assert report == "exit 2 lightning imported: False" and "but got 'many'" in err


def test_the_early_subcommand_list_is_the_clis():
    from lightning_fastif.cli.app import FastIFCLI
    from lightning_fastif.cli.support import SUBCOMMANDS

    assert set(SUBCOMMANDS) == set(FastIFCLI.subcommands())


def test_threads_option_sets_torch_threads_and_rejects_bad_values(capsys):
    with pytest.raises(SystemExit):
        main(["--threads", "1", "influence", "--help"])
    assert torch.get_num_threads() == 1
    capsys.readouterr()
    code, err = _fails(capsys, ["--threads=0", "influence", "--help"])
    assert code == 2 and "`threads` to be a positive int or 'auto', but got '0'" in err
    with pytest.raises(Exception, match="threads"):
        set_num_threads(-2)


def test_default_threads_counts_the_cores_not_already_busy(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    for load, want in ((0.0, 4), (5.2, 3), (7.9, 1), (30.0, 1)):
        monkeypatch.setattr("os.getloadavg", lambda load=load: (load, load, load))
        assert default_threads() == want, load
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr("os.getloadavg", lambda: (0.0, 0.0, 0.0))
    assert default_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's or a launcher's choice wins
    assert default_threads() == 3


def test_lightnings_start_up_lines_do_not_precede_an_error(tmp_path, capsys, caplog):
    import logging

    with caplog.at_level(logging.INFO):
        code, _ = _fails(capsys, _influence(tmp_path, "--score_batch_size=0"))
    assert code == 2
    lightning = [r.getMessage() for r in caplog.records if r.name.startswith("lightning")]
    assert not [m for m in lightning if m.startswith(("Seed set", "GPU available", "TPU available", "💡"))]


def test_a_missing_interpolation_exits_2_with_one_line_naming_the_key(tmp_path, capsys):
    """Issue 17: a `${...}` naming no key was an InterpolationKeyError over three lines, exit 1."""
    config = tmp_path / "extra.yaml"
    config.write_text("top_k: ${missing.key}\n")
    code, err = _fails(capsys, [*_influence(tmp_path), "-c", str(config)])
    assert code == 2
    assert _error_lines(err) == [
        "lightning-fastif influence: error: Expected every `${...}` interpolation to name a key of the "
        "configuration, but `influence.top_k` holds one that does not (Interpolation key 'missing.key' not found)."
    ]
    assert len(err.strip().splitlines()) == 1
    code, err = _fails(capsys, _influence(tmp_path, "--top_k=${nope"))  # not even an interpolation
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "`influence.top_k` could not be resolved (GrammarParseError" in err


def test_a_full_disk_while_writing_results_is_one_line_naming_the_file():
    """Issue 17: ENOSPC / EFBIG under `influence` end in one line (the JSONL keeps the records written before)."""
    import errno

    from lightning_fastif.cli.support import describe
    from lightning_fastif.errors import ResultsWriteError

    err = ResultsWriteError(
        errno.ENOSPC, "Expected to append results to 'out/influence.jsonl', but the write failed: No space"
    )
    try:  # as Lightning re-raises it: the library's error is found in the chain
        try:
            raise err
        except ResultsWriteError as inner:
            raise RuntimeError("predict failed") from inner
    except RuntimeError as outer:
        code, message = describe(outer, ["influence"], {"influence": None})
    assert code == 1
    assert message == (
        "lightning-fastif influence: error: Expected to append results to 'out/influence.jsonl', but the write "
        "failed: No space"
    )


def test_an_own_module_that_python_cannot_import_says_what_to_do(tmp_path, capsys):
    code, err = _fails(capsys, _influence(tmp_path, "--model.class_path=mymodule_nowhere.MyNet"))
    assert code == 2
    assert "No module named 'mymodule_nowhere'" in err
    assert "Run from the folder that holds it, or put that folder on PYTHONPATH" in err


def test_an_own_module_in_the_current_folder_is_found(tmp_path, monkeypatch, capsys):
    (tmp_path / "mymodule_here.py").write_text(
        "from lightning_fastif.zoo.digits import DigitsClassifier\n\n\nclass MyNet(DigitsClassifier):\n    pass\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    argv = _influence(tmp_path, "--model.class_path=mymodule_here.MyNet", "--ckpt_path=missing.ckpt")
    _code, err = _fails(capsys, argv)
    assert "No module named" not in err and "missing.ckpt" in err, err


def test_wandb_banners_are_quiet_unless_asked_for(monkeypatch, capsys):
    monkeypatch.delenv("WANDB_SILENT", raising=False)
    with pytest.raises(SystemExit):
        main(["influence", "--help"])
    assert (
        os.environ["WANDB_SILENT"] == "true"
    )  # lightning_fastif prints the run folder and `wandb sync` itself
    monkeypatch.setenv("WANDB_SILENT", "false")
    with pytest.raises(SystemExit):
        main(["influence", "--help"])
    assert os.environ["WANDB_SILENT"] == "false"


def test_the_librarys_warnings_print_as_one_plain_line_in_the_cli():
    """A warning of ours read `.../reporting/writer.py:217: UserWarning: lightning_fastif: settings changed...`."""
    import warnings

    import lightning_fastif.reporting.writer as writer_module
    from lightning_fastif.cli.support import format_warning

    ours = format_warning(
        "lightning_fastif: settings changed: params", UserWarning, writer_module.__file__, 217
    )
    assert ours == "lightning_fastif: settings changed: params\n"
    assert (
        format_warning("vmap failed", UserWarning, writer_module.__file__, 3)
        == "lightning_fastif: vmap failed\n"
    )
    theirs = format_warning("deprecated", DeprecationWarning, warnings.__file__, 10)
    assert theirs.startswith(f"{warnings.__file__}:10: DeprecationWarning: deprecated")

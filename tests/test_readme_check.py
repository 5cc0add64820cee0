"""The README check (issue 20): which shell blocks ``scripts/check_readme.py`` runs, which it skips and why, and
that the README itself keeps its promises (the CLI named where it lives, the first block runnable)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_readme", ROOT / "scripts" / "check_readme.py")
check_readme = importlib.util.module_from_spec(_spec)
sys.modules["check_readme"] = check_readme  # dataclasses look their module up there
_spec.loader.exec_module(check_readme)


def test_shell_blocks_are_found_in_order_with_their_skip_markers():
    text = "\n".join(
        [
            "# Title",
            "```bash",
            "make demo",
            "```",
            "```python",
            "print('not shell')",
            "```",
            "<!-- readme-check: skip (needs ../shared/data) -->",
            "",
            "```sh",
            "long job",
            "```",
        ]
    )
    blocks = check_readme.shell_blocks(text)
    assert [(b.line, b.text, b.skip) for b in blocks] == [
        (2, "make demo", None),
        (10, "long job", "(needs ../shared/data)"),
    ]


def test_the_environment_of_the_blocks_is_plain(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    env = check_readme.plain_env()
    assert not {"PYTHONPATH", "WANDB_MODE", "OMP_NUM_THREADS"} & set(env) and "PATH" in env


def test_the_readme_runs_its_cli_from_the_venv_and_its_first_block_is_checked():
    blocks = check_readme.shell_blocks((ROOT / "README.md").read_text())
    assert blocks[0].skip is None and "make demo" in blocks[0].text
    for block in blocks:
        for line in block.text.splitlines():
            command = line.split("#")[0].strip()
            if command.startswith("lightning-fastif") or command.startswith("python "):
                raise AssertionError(f"README.md:{block.line}: {line!r} needs .venv/bin/ (not on PATH)")

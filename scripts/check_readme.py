"""Run every shell block of README.md, as written, in a plain shell of a fresh copy of the repository.

A newcomer pastes the README's commands into a new terminal of a fresh clone: this does the same. The working tree's
files (tracked and untracked, not ignored: what a clone of a commit of them would hold) are copied into a temporary
folder; each ```bash block runs there with ``bash -eo pipefail``, in order, in an environment without this
session's Python settings (no ``PYTHONPATH``, ``VIRTUAL_ENV``, thread or W&B variables), so a block that relies on
something the README does not say fails here.

A block that needs data outside the repository or runs too long for CI says so with an HTML comment on the line
before its fence (invisible on GitHub), and is listed as skipped with its reason::

    <!-- readme-check: skip (needs ../shared/data/mnist) -->

The README's first block (the set-up and the demo) may not be skipped.

Run: ``python scripts/check_readme.py [--keep] [--timeout SECONDS]`` (``.ci/run`` runs it). Exit code 1 when a block
fails; the last lines of its output are printed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = re.compile(r"<!--\s*readme-check:\s*skip\s*(.*?)\s*-->")
FENCE = re.compile(r"^```(bash|sh|shell|console)\s*$")
DROPPED_ENV = ("PYTHONPATH", "VIRTUAL_ENV", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONHOME")
DROPPED_PREFIXES = ("WANDB_", "LIGHTNING_FASTIF_", "PYTEST_")


@dataclass
class Block:
    """One fenced shell block of the README."""

    line: int  # 1-based line of its opening fence
    text: str
    skip: str | None  # the reason, when marked


def shell_blocks(readme: str) -> list[Block]:
    """The README's ```bash/sh/shell blocks in order, with the skip marker of the line before each."""
    lines = readme.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i].strip())
        if not match:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        previous = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = SKIP.search(previous)
        blocks.append(Block(start + 1, "\n".join(body), (marker.group(1) or "marked") if marker else None))
        i += 1
    return blocks


def fresh_copy(dest: Path) -> None:
    """The repository's files as a clone would have them (tracked + untracked, not ignored), into ``dest``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for raw in filter(None, listed):
        rel = raw.decode()
        src = ROOT / rel
        if not src.is_file():  # deleted but not yet committed
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)


def plain_env() -> dict[str, str]:
    """This process's environment without the Python, thread and W&B settings of a developer's session."""
    return {
        k: v for k, v in os.environ.items() if k not in DROPPED_ENV and not k.startswith(DROPPED_PREFIXES)
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy (its path is printed)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per block (default 1800)")
    parser.add_argument(
        "--leave-out",
        action="append",
        default=[],
        metavar="COMMAND",
        help="a command line to leave out where it stands alone in a block, e.g. 'make test' when the suite has "
        "just run (repeatable; said in the output)",
    )
    parser.add_argument("--log-dir", type=Path, default=None, help="save each block's output there")
    args = parser.parse_args()

    blocks = shell_blocks((ROOT / "README.md").read_text())
    if not blocks:
        print("check_readme: README.md has no shell block", file=sys.stderr)
        return 1
    if blocks[0].skip:
        print("check_readme: the README's first block (set-up and demo) may not be skipped", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="readme-check-"))
    fresh_copy(work)
    print(f"check_readme: {len(blocks)} shell blocks of README.md, in a fresh copy at {work}", flush=True)
    failed, total = 0, time.perf_counter()
    for n, block in enumerate(blocks, 1):
        first = block.text.strip().splitlines()[0] if block.text.strip() else ""
        if block.skip:
            print(f"  [{n}] README.md:{block.line} skipped {block.skip}: {first}", flush=True)
            continue
        text = block.text
        for command in args.leave_out:
            kept = [ln for ln in text.splitlines() if ln.split("#")[0].strip() != command]
            if len(kept) != len(text.splitlines()):
                print(f"  [{n}] README.md:{block.line} leaves out `{command}` (--leave-out)", flush=True)
            text = "\n".join(kept)
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                ["bash", "-eo", "pipefail", "-c", text],
                cwd=work,
                env=plain_env(),
                capture_output=True,
                text=True,
                timeout=args.timeout,
            )
            code, out = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as err:
            code, out = "timeout", f"{err.stdout or ''}{err.stderr or ''}"
        seconds = time.perf_counter() - start
        status = "ok" if code == 0 else f"FAILED (exit {code})"
        lines = len(out.splitlines()) if isinstance(out, str) else 0
        print(
            f"  [{n}] README.md:{block.line} {status} in {seconds:.0f} s, {lines} lines of output: {first}",
            flush=True,
        )
        if args.log_dir:
            args.log_dir.mkdir(parents=True, exist_ok=True)
            (args.log_dir / f"block{n}.log").write_text(out if isinstance(out, str) else "")
        if code != 0:
            failed += 1
            tail = out if isinstance(out, str) else out.decode(errors="replace")
            print("\n".join("      " + line for line in tail.splitlines()[-30:]), flush=True)
    print(f"check_readme: {failed} failed, {time.perf_counter() - total:.0f} s in all", flush=True)
    if args.keep:
        print(f"check_readme: kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Side by side: ``examples/python_api.py`` with 1 thread, torch's default (one per core) and
``lf.set_num_threads("auto")`` (what the CLI's ``--threads auto`` does), each in a fresh process, round-robin.

Run: ``python benchmarks/threads.py [rounds]`` (default 2; about 1-10 min a round depending on the machine's load).
Saves ``benchmarks/results/threads.json``. ``OMP_NUM_THREADS`` is removed from the children's environment: the point
is what a user gets without knowing about it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = (
    "import sys, runpy, torch, lightning_fastif as lf; mode = sys.argv[1]; "
    "n = lf.set_num_threads(1) if mode == '1' else (lf.set_num_threads('auto') if mode == 'auto' "
    "else torch.get_num_threads()); print('threads', n, file=sys.stderr); "
    "runpy.run_path('examples/python_api.py', run_name='__main__')"
)


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    rows = []
    for rnd in range(rounds):
        for mode in ("1", "default", "auto"):
            env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
            load = os.getloadavg()[0]
            start = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-c", RUN, mode], cwd=ROOT, env=env, capture_output=True, text=True
            )
            seconds = time.perf_counter() - start
            threads = [line for line in proc.stderr.splitlines() if line.startswith("threads")]
            rows.append(
                {
                    "round": rnd,
                    "mode": mode,
                    "seconds": round(seconds, 1),
                    "load1_at_start": round(load, 2),
                    "rc": proc.returncode,
                    "threads": threads[0] if threads else None,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    out = ROOT / "benchmarks" / "results" / "threads.json"
    out.write_text(json.dumps({"cpu_count": os.cpu_count(), "rows": rows}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()

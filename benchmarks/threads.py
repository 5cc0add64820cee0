"""Side by side: ``examples/python_api.py`` as written (no thread setting: since issue 20 the library lowers
oversubscribed threads itself), with 1 thread, with torch's default of one thread per core forced (``OMP_NUM_THREADS``
= the cores, which the library respects: what every Python user got before), and ``lf.set_num_threads("auto")``
(what the CLI's ``--threads auto`` does), each in a fresh process, round-robin.

Run: ``python benchmarks/threads.py [rounds]`` (default 2; about 1-10 min a round depending on the machine's load).
Saves ``benchmarks/results/threads.json``. ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` are removed from the children's environment: the point
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
    "else torch.get_num_threads()); print('threads at start', n, file=sys.stderr); "
    "runpy.run_path('examples/python_api.py', run_name='__main__'); "
    "print('threads at end', torch.get_num_threads(), file=sys.stderr)"
)


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    rows = []
    for rnd in range(rounds):
        for mode in ("as_written", "all_cores", "1", "auto"):
            env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
            if mode == "all_cores":  # torch's default, chosen explicitly: the library leaves it alone
                env["OMP_NUM_THREADS"] = str(len(os.sched_getaffinity(0)))
            load = os.getloadavg()[0]
            start = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-c", RUN, mode], cwd=ROOT, env=env, capture_output=True, text=True
            )
            seconds = time.perf_counter() - start
            threads = [line for line in proc.stderr.splitlines() if line.startswith("threads")]
            said = [line for line in proc.stderr.splitlines() if "CPU threads" in line]
            rows.append(
                {
                    "round": rnd,
                    "mode": mode,
                    "seconds": round(seconds, 1),
                    "load1_at_start": round(load, 2),
                    "rc": proc.returncode,
                    "threads": threads,
                    "library_said": said[0] if said else None,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    out = ROOT / "benchmarks" / "results" / "threads.json"
    out.write_text(json.dumps({"cpu_count": os.cpu_count(), "rows": rows}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()

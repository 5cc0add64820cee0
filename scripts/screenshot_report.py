"""Render an HTML report to a PNG with headless Chromium, to check what people will see.

Usage:
    python scripts/screenshot_report.py outputs/report.html outputs/report.png
    python scripts/screenshot_report.py --sample outputs/sample_report.html outputs/sample_report.png

``--sample`` first writes a report of made-up results on scikit-learn's bundled digits (8x8 images, no network),
so the layout can be checked without running influence. Chromium is Debian's ``chromium`` package
(``apt-get install -y chromium``); ``--chromium`` points elsewhere. Exit status 2 when Chromium is missing.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_CHROMIUM = "/usr/bin/chromium"


def screenshot(
    html_path: str | Path,
    png_path: str | Path,
    *,
    width: int = 1200,
    height: int = 1600,
    chromium: str = DEFAULT_CHROMIUM,
    timeout: float = 120.0,
) -> Path:
    """Take a ``width`` x ``height`` screenshot of a local HTML file with headless Chromium.

    Network access is disabled as far as Chromium's flags allow, so a report that needs the network shows up
    broken in the picture. Raises ``FileNotFoundError`` when Chromium or the page is missing and
    ``RuntimeError`` when Chromium produced no PNG.
    """
    html_path = Path(html_path).resolve()
    png_path = Path(png_path).resolve()
    if not html_path.is_file():
        raise FileNotFoundError(f"Expected `html_path` to be an existing file, but got {str(html_path)!r}.")
    if shutil.which(chromium) is None:
        raise FileNotFoundError(f"Expected `chromium` to be an executable, but got {chromium!r}.")
    png_path.parent.mkdir(parents=True, exist_ok=True)
    png_path.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        command = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--screenshot={png_path}",
            f"--window-size={width},{height}",
            html_path.as_uri(),
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if not png_path.is_file() or png_path.stat().st_size == 0:
        raise RuntimeError(
            f"Chromium exited with {done.returncode} and wrote no screenshot; stderr:\n{done.stderr[-2000:]}"
        )
    return png_path


def write_sample_report(path: str | Path, num_queries: int = 4, top_k: int = 6, seed: int = 0) -> Path:
    """Write a report of made-up influence results on scikit-learn's digits (images of shape (8, 8))."""
    import numpy as np
    from sklearn.datasets import load_digits

    from lightning_fastif.reporting.html import write_html_report
    from lightning_fastif.results import InfluenceResult

    digits = load_digits()
    images, labels = digits.data.astype(np.float32), digits.target
    rng = np.random.default_rng(seed)
    train_ids = np.arange(1500)
    results = []
    for query_id in range(num_queries):
        label = int(labels[1500 + query_id])
        same = train_ids[labels[train_ids] == label]
        other = train_ids[labels[train_ids] != label]
        helpful = rng.choice(same, size=top_k, replace=False)
        harmful = rng.choice(other, size=top_k, replace=False)
        results.append(
            InfluenceResult(
                query_id=query_id,
                label=label,
                prediction=label if query_id % 3 else int((label + 1) % 10),
                helpful_ids=helpful.tolist(),
                helpful_scores=np.sort(-rng.exponential(0.05, top_k)).tolist(),
                harmful_ids=harmful.tolist(),
                harmful_scores=np.sort(rng.exponential(0.02, top_k))[::-1].tolist(),
                num_candidates=200,
                query_loss=float(rng.exponential(0.5)),
                helpful_distances=np.sort(rng.uniform(5, 20, top_k)).tolist(),
                harmful_distances=np.sort(rng.uniform(10, 30, top_k)).tolist(),
            )
        )
    return write_html_report(
        results,
        path,
        train_lookup=lambda i: (images[i], int(labels[i])),
        query_lookup=lambda q: (images[1500 + q], int(labels[1500 + q])),
        title="Sample influence report: scikit-learn digits",
        summary={"solver": "LiSSASolver", "damping": 0.01, "top_k": top_k, "time/total_s": 1.234},
        image_shape=(8, 8),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path, help="the report to render (written first with --sample)")
    parser.add_argument("png", type=Path, help="where to save the screenshot")
    parser.add_argument("--sample", action="store_true", help="write a sample digits report to HTML first")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=1600)
    parser.add_argument("--chromium", default=DEFAULT_CHROMIUM)
    args = parser.parse_args(argv)
    if shutil.which(args.chromium) is None:
        print(f"Chromium not found at {args.chromium!r}: apt-get install -y chromium", file=sys.stderr)
        return 2
    if args.sample:
        write_sample_report(args.html)
    out = screenshot(args.html, args.png, width=args.width, height=args.height, chromium=args.chromium)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

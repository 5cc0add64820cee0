"""A real browser renders the sample digits report into a non-blank picture (headless Chromium)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"

pytestmark = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK),
    reason=f"headless Chromium is not installed at {CHROMIUM} (Debian: apt-get install -y chromium)",
)


def test_sample_digits_report_screenshot_is_not_blank(tmp_path: Path) -> None:
    html_path, png_path = tmp_path / "report.html", tmp_path / "report.png"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "screenshot_report.py"),
            "--sample",
            str(html_path),
            str(png_path),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with Image.open(png_path) as image:
        assert image.size == (1200, 1600)
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
    assert pixels.std() > 20.0  # a blank or single-colour page has (almost) no variance
    # The digits are drawn white on black: a good share of pure black pixels means the images rendered, not
    # only text on the light page background.
    assert (pixels < 10).mean() > 0.02  # about 0.07 with the sample; 0.0 for a text-only page
    assert (pixels > 240).mean() > 0.3

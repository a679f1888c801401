"""Render the HTML report of the shipped sample in headless Chromium and save a screenshot.

    apt-get install -y chromium            # Debian's package
    PYTHONPATH=. python docs/make_report_figure.py [--out docs/images/qc-report.png] [--keep DIR]

Runs `brainid predict --sample --task segmentation --uncertainty --report`, checks that the page is
one file that names nothing outside itself, and opens it in Chromium with every host unresolvable
(so only inline content can show), writing a full-page screenshot.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from BrainIDLib import cli  # noqa: E402


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("no Chromium found; install it (Debian: apt-get install -y chromium)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "images" / "qc-report.png")
    ap.add_argument("--keep", type=Path, default=None, help="write the outputs here instead of a temporary folder")
    ap.add_argument("--height", type=int, default=2300, help="screenshot height in pixels")
    args = ap.parse_args(argv)
    folder = args.keep or Path(tempfile.mkdtemp(prefix="brainid-report-"))
    rc = cli.main(["predict", "--sample", "--task", "segmentation", "--uncertainty", "--report", "--device", "cpu",
                   "--progress-format", "none", "-o", f"{folder}/"])
    if rc:
        return rc
    page = next(folder.glob("*_report.html"))
    text = page.read_text(encoding="utf-8")
    external = re.findall(r"(?:src|href)=['\"]((?:https?:|//|file:)[^'\"]*)", text)
    print(f"{page}: {page.stat().st_size / 1e6:.2f} MB, {text.count('data:image/png;base64,')} inline PNGs, "
          f"external references: {external or 'none'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--host-resolver-rules=MAP * ~NOTFOUND", f"--window-size=1150,{args.height}",
                    f"--screenshot={args.out.resolve()}", page.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    print(f"screenshot: {args.out}")
    if args.keep is None:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

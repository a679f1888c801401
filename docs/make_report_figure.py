"""Render the HTML report of the shipped sample in headless Chromium (or WeasyPrint) and save a screenshot.

    apt-get install -y chromium            # Debian's package; or, without a browser:
    pip install 'weasyprint>=68' pypdfium2 # a pure-Python HTML renderer and a PDF rasteriser
    PYTHONPATH=. python docs/make_report_figure.py [--out docs/images/qc-report.png] [--keep DIR]
                                           [--renderer auto|chromium|weasyprint]

Runs `brainid predict --sample --task segmentation --uncertainty --report`, checks that the page is
one file that names nothing outside itself, and renders it with nothing but inline content allowed:
Chromium with every host unresolvable, or WeasyPrint with a URL fetcher that refuses all but `data:`
URIs (one page as tall as the screenshot, rasterised by pypdfium2). `auto` takes Chromium where it
is installed: it is what people open reports in.
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


def chromium() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


def shoot_chromium(browser: str, page: Path, out: Path, width: int, height: int) -> None:
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--host-resolver-rules=MAP * ~NOTFOUND", f"--window-size={width},{height}",
                    f"--screenshot={out.resolve()}", page.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)


def shoot_weasyprint(page: Path, out: Path, width: int, height: int) -> None:
    """One CSS-pixel-exact page (1 px = 0.75 pt), cut at `height` like the browser's window."""
    import pypdfium2
    import weasyprint

    inline_only = weasyprint.URLFetcher(allowed_protocols={"data"}, fail_on_errors=True)
    css = weasyprint.CSS(string=f"@page {{ size: {width}px {height}px; margin: 0 }}")
    pdf = weasyprint.HTML(filename=str(page), url_fetcher=inline_only).write_pdf(stylesheets=[css])
    first = pypdfium2.PdfDocument(pdf)[0]
    first.render(scale=4 / 3).to_pil().convert("RGB").save(out)


def renderer(choice: str) -> str:
    """'chromium' where asked for or (auto) installed, else 'weasyprint' if it can be imported."""
    if choice != "weasyprint" and chromium():
        return "chromium"
    if choice == "chromium":
        raise SystemExit("no Chromium found; install it (Debian: apt-get install -y chromium)")
    try:
        import pypdfium2  # noqa: F401
        import weasyprint  # noqa: F401
    except ImportError:
        raise SystemExit("no renderer: install Chromium (Debian: apt-get install -y chromium) "
                         "or `pip install 'weasyprint>=68' pypdfium2`") from None
    return "weasyprint"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "images" / "qc-report.png")
    ap.add_argument("--keep", type=Path, default=None, help="write the outputs here instead of a temporary folder")
    ap.add_argument("--height", type=int, default=2300, help="screenshot height in pixels")
    ap.add_argument("--renderer", choices=("auto", "chromium", "weasyprint"), default="auto")
    args = ap.parse_args(argv)
    engine = renderer(args.renderer)
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
    if engine == "chromium":
        shoot_chromium(chromium(), page, args.out, 1150, args.height)
    else:
        shoot_weasyprint(page, args.out, 1150, args.height)
    print(f"screenshot ({engine}): {args.out}")
    if args.keep is None:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

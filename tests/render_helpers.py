"""Render a report as a person sees it: a headless Chromium screenshot of an HTML page and
PNG pages of a PDF with pdftoppm. Used by the tests and to make the README screenshot;
the report itself never needs a browser (the PDF is written by fpdf2)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["CHROMIUM_FLAGS", "pdf_to_pngs", "screenshot_html"]

#: Flags for an offline, sandbox-less (root, containers) headless Chromium with no
#: background network traffic.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars")


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(
            f"{name} is not installed; install the Debian package '{package}' "
            "(scripts/install_system_deps.sh or `make system-deps`).")
    return path


def screenshot_html(html: str | Path, png: str | Path, *, width: int = 1280,
                    height: int = 2000, timeout: float = 120.0) -> Path:
    """Open ``html`` in headless Chromium and save a ``width`` x ``height`` screenshot."""
    chromium = _tool("chromium", "chromium")
    png = Path(png).resolve()
    with tempfile.TemporaryDirectory(prefix="icam-med-chromium-") as profile:
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                        f"--screenshot={png}", f"--window-size={width},{height}",
                        Path(html).resolve().as_uri()],
                       check=True, capture_output=True, timeout=timeout)
    if not png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot for {html}")
    return png


def pdf_to_pngs(pdf: str | Path, prefix: str | Path, *, dpi: int = 40,
                timeout: float = 120.0) -> list[Path]:
    """Every page of ``pdf`` as ``{prefix}-N.png`` (pdftoppm); returns them in order."""
    tool = _tool("pdftoppm", "poppler-utils")
    prefix = Path(prefix)
    subprocess.run([tool, "-r", str(dpi), "-png", str(pdf), str(prefix)], check=True,
                   capture_output=True, timeout=timeout)
    pages = sorted(prefix.parent.glob(f"{prefix.name}-*.png"),
                   key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    return pages

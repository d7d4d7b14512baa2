"""``build_report``: one audit folder in, a self-contained HTML report (and a PDF) out."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from icam_med._version import __version__
from icam_med.audit import LEDGER_NAME, utc_now
from icam_med.io.atomic import atomic_write_bytes, atomic_write_text

__all__ = ["REPORT_NAME", "ReportResult", "build_report"]

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"
PDF_NAME = "report.pdf"


@dataclass
class ReportResult:
    """What :func:`build_report` wrote and found.

    Attributes:
        html: the first (main) HTML page.
        pages: every HTML page, in order.
        pdf: the PDF, if asked for.
        ledger_ok: whether the folder verified when the report was built.
        problems: the verification problems (empty when ``ledger_ok``).
        n_scans: scans in the report.
        n_flagged: scans with at least one flag.
    """

    html: Path
    pages: list[Path] = field(default_factory=list)
    pdf: Path | None = None
    ledger_ok: bool = False
    problems: list[str] = field(default_factory=list)
    n_scans: int = 0
    n_flagged: int = 0

    def line(self) -> str:
        status = "ledger OK" if self.ledger_ok else f"ledger BROKEN ({len(self.problems)} problem(s))"
        extra = f" and {self.pdf}" if self.pdf else ""
        return (f"report {self.html}{extra}: {self.n_scans} scan(s), {self.n_flagged} flagged, "
                f"{status}")


def build_report(out_dir: str | Path, *, scans: Any = None, geometry: Any = None,
                 pdf: bool = False, per_page: int = 25, overwrite: bool = False,
                 report_dir: str | Path | None = None,
                 anchor: str | None = None,
                 model_card: str | Path | None = None) -> ReportResult:
    """Build the audit report of an output folder.

    Args:
        out_dir: a folder written by ``icam-med audit`` (or ``icam-med explain``), holding
            ``ledger.jsonl``. It is verified again now with :func:`icam_med.audit.verify_folder`.
        scans: the audited scans, to draw the maps over them: a mapping ``scan_id -> path``
            or the inputs given to ``icam-med audit`` (files, folders, CSV). A scan is drawn
            only if its voxel SHA-256 equals its record's. Optional.
        geometry: the config's ``geometry`` options, to load the scans as the audit did.
        pdf: also write ``report.pdf`` (fpdf2).
        per_page: scan sections per HTML page (``report.html``, ``report-page-002.html``...);
            every page is self-contained.
        overwrite: replace an existing report (it is a view of the folder, rebuilt at will).
        report_dir: where to write (default: ``out_dir``).
        anchor: an ``entry_sha256`` kept outside the folder (an earlier ledger head, as
            printed by ``icam-med verify``); the verification then also proves the ledger
            was not rewritten since.
        model_card: the model card (intended use, training data, limits) of the audited
            model, embedded in the report and linked from its model table (one model per
            folder; a folder with several models gets it under the first).

    Returns:
        A :class:`ReportResult`.

    Raises:
        FileNotFoundError: ``out_dir`` has no ledger.
        FileExistsError: a report exists and ``overwrite`` is false.
        ValueError: ``per_page`` < 1, or the model card is not UTF-8 text.
    """
    from icam_med.report.collect import cohort_metrics, collect
    from icam_med.report.content import ModelCard
    from icam_med.report.figures import confusion_png, score_distribution_png
    from icam_med.report.html import page_name, render_page

    folder = Path(out_dir)
    if not (folder / LEDGER_NAME).is_file():
        raise FileNotFoundError(
            f"{folder} has no {LEDGER_NAME}; give a folder written by `icam-med audit` or "
            "`icam-med explain`.")
    if per_page < 1:
        raise ValueError(f"per_page must be 1 or more, got {per_page}.")
    target = Path(report_dir) if report_dir is not None else folder
    main = target / REPORT_NAME
    existing = [p for p in (main, target / PDF_NAME if pdf else None) if p and p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{existing[0]} exists; pass --overwrite (overwrite=True) to rebuild the report.")
    card = ModelCard.read(model_card) if model_card is not None else None  # before any work
    target.mkdir(parents=True, exist_ok=True)

    data = collect(folder, scans=scans, geometry=geometry, anchor=anchor)
    metrics = cohort_metrics(data)
    from icam_med.report.collect import CONFIDENT_PROBABILITY

    figs: dict[str, bytes | None] = {
        "confusion": (confusion_png(metrics["confusion"], metrics["expected_labels"],
                                    metrics["predicted_labels"])
                      if metrics["confusion"] is not None else None),
        "scores": (score_distribution_png(metrics["score_groups"],
                                          threshold=CONFIDENT_PROBABILITY)
                   if any(metrics["score_groups"].values()) else None),
    }
    n_pages = max(1, math.ceil(len(data.scans) / per_page))
    for i, item in enumerate(data.scans):
        item.page = i // per_page + 1
    built = {"utc": utc_now(), "version": __version__}
    cards = ({str((data.models[0] or {}).get("name")): card}
             if card is not None and data.models else {})
    # Everything is rendered in memory first, so a failure leaves no half-built report.
    htmls = [render_page(data, metrics, figs, built, page=page, n_pages=n_pages, cards=cards)
             for page in range(1, n_pages + 1)]
    pdf_bytes = None
    if pdf:
        from icam_med.report.pdf import render_pdf

        pdf_bytes = render_pdf(data, metrics, figs, built, cards=cards)
    # Pages of an earlier, longer report would be stale: remove them.
    for old in target.glob("report-page-*.html"):
        old.unlink()
    pages = [atomic_write_text(target / page_name(i), html, overwrite=True)
             for i, html in enumerate(htmls, start=1)]
    result = ReportResult(html=pages[0], pages=pages, ledger_ok=data.verify.ok,
                          problems=[str(p) for p in data.verify.problems],
                          n_scans=len(data.scans), n_flagged=metrics["n_flagged"])
    if pdf_bytes is not None:
        result.pdf = atomic_write_bytes(target / PDF_NAME, pdf_bytes, overwrite=True)
    log.info(result.line())
    return result

"""The PDF report with fpdf2 (pure Python, no browser): the same sections as the HTML,
with the same matplotlib figures as PNG images and a Unicode font shipped by matplotlib."""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from icam_med.report.collect import CohortData, ScanItem
from icam_med.report.content import (
    ModelCard,
    cohort_rows,
    fmt,
    method_rows,
    methods_appendix,
    model_rows,
    review_rules,
    scan_rows,
    second_class_rows,
    signature_status,
)

__all__ = ["render_pdf"]


def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


class _Doc:
    def __init__(self, title: str) -> None:
        from fpdf import FPDF

        pdf = FPDF(format="A4", unit="mm")
        pdf.set_auto_page_break(True, margin=14)
        pdf.set_margins(14, 14, 14)
        fonts = _font_dir()
        pdf.add_font("DejaVu", "", str(fonts / "DejaVuSans.ttf"))
        pdf.add_font("DejaVu", "B", str(fonts / "DejaVuSans-Bold.ttf"))
        pdf.set_title(title)
        pdf.set_creator("icam-med")
        pdf.set_producer("icam-med (fpdf2)")
        pdf.add_page()
        self.pdf = pdf

    def h(self, text: str, size: int = 14) -> None:
        pdf = self.pdf
        if pdf.get_y() > pdf.h - 40:
            pdf.add_page()
        pdf.set_font("DejaVu", "B", size)
        pdf.ln(2)
        # Line height from the font size in mm (pt * 0.3528 * 1.25), so a wrapped heading's
        # lines never overlap each other or what follows.
        pdf.multi_cell(0, size * 0.45, text, new_x="LMARGIN", new_y="NEXT", align="L")
        pdf.ln(1.5)

    def p(self, text: str, size: float = 9, bold: bool = False,
          color: tuple[int, int, int] = (0, 0, 0)) -> None:
        pdf = self.pdf
        pdf.set_font("DejaVu", "B" if bold else "", size)
        pdf.set_text_color(*color)
        pdf.multi_cell(0, size * 0.48, text, new_x="LMARGIN", new_y="NEXT", align="L")
        pdf.set_text_color(0, 0, 0)
        pdf.ln(0.8)

    def kv(self, rows: list[tuple[str, Any]]) -> None:
        pdf = self.pdf
        for k, v in rows:
            key, text = str(k), fmt(v)  # formatted as the HTML formats it
            pdf.set_font("DejaVu", "B", 8)
            hk = pdf.multi_cell(52, 4, key, dry_run=True, output="HEIGHT")
            pdf.set_font("DejaVu", "", 8)
            width = pdf.w - pdf.r_margin - pdf.l_margin - 52
            hv = pdf.multi_cell(width, 4, text, dry_run=True, output="HEIGHT", align="L")
            need = max(hk, hv)
            if pdf.get_y() + need > pdf.page_break_trigger:
                pdf.add_page()
            y = pdf.get_y()
            pdf.set_font("DejaVu", "B", 8)
            pdf.set_xy(pdf.l_margin, y)
            pdf.multi_cell(52, 4, key)
            pdf.set_font("DejaVu", "", 8)
            pdf.set_xy(pdf.l_margin + 52, y)
            pdf.multi_cell(width, 4, text, align="L")
            pdf.set_xy(pdf.l_margin, y + need)

    def image(self, png: bytes | None, width: float) -> None:
        if not png:
            return
        from PIL import Image

        w_px, h_px = Image.open(io.BytesIO(png)).size
        height = width * h_px / w_px
        pdf = self.pdf
        if pdf.get_y() + height > pdf.h - 14:
            pdf.add_page()
        pdf.image(io.BytesIO(png), w=width)
        pdf.ln(1)


def _scan(doc: _Doc, s: ScanItem) -> None:
    doc.h(f"Scan {s.scan_id}", 11)
    for f in s.flags:
        doc.p("! " + f, 8.5, bold=True, color=(161, 42, 28))
    doc.kv(scan_rows(s))  # the HTML's rows, formatted the same way
    if s.status == "ok":
        doc.image(s.montage, 175)
        doc.image(s.weights_png, 95)


def render_pdf(data: CohortData, metrics: dict[str, Any], figs: dict[str, bytes | None],
               built: dict[str, Any], *, cards: Mapping[str, ModelCard] | None = None) -> bytes:
    """The whole report as PDF bytes (every scan, in report order); ``cards`` (model name
    -> model card) are embedded in the appendix."""
    cards = cards or {}
    doc = _Doc(f"icam-med audit report - {data.folder_name}")
    doc.h("icam-med audit report", 18)
    doc.p(f"Audit folder {data.folder_name}; built {built['utc']} by icam-med "
          f"{built['version']} from {len(data.entries)} ledger entries; ledger head entry "
          f"{data.head_sha256}; ledger.jsonl SHA-256 {data.ledger_sha256}", 8)
    v = data.verify
    if v.ok:
        doc.p(f"Ledger verification: OK (re-checked when this report was built): "
              f"{v.n_entries} entries chained, {v.n_scans} scan record(s), {v.n_failures} "
              f"failure(s), {v.n_files} file(s) re-hashed.", 10, bold=True, color=(46, 110, 26))
        doc.p(f"Anchored: the chain contains the externally kept entry {data.anchor}."
              if data.anchor else "Not anchored: no externally kept ledger hash was given.", 8)
    else:
        doc.p(f"Ledger verification: BROKEN - the audit evidence has been altered or is "
              f"incomplete ({len(v.problems)} problem(s)).", 11, bold=True, color=(192, 57, 43))
        for prob in v.problems[:30]:
            doc.p(f"- {prob}", 8, color=(192, 57, 43))
    sig, why = signature_status(v)
    doc.p(f"Signature: {sig} - {why}.", 9, bold=True,
          color=(46, 110, 26) if sig == "SIGNED" else (192, 57, 43))
    doc.h("Model")
    for m in data.models:
        m = m or {}
        doc.kv(model_rows(m))
        card = cards.get(str(m.get("name")))
        doc.p(f"Model card and intended use: {card.name} (embedded in the appendix, SHA-256 "
              f"{card.sha256})." if card else "No model card or intended use was given to "
              "this report.", 8, bold=card is None,
              color=(0, 0, 0) if card else (161, 42, 28))
    doc.h("Method and options")
    for m in data.methods:
        doc.kv(method_rows(m))
    for pre in data.preprocessing:
        doc.kv([(p.get("name"), p.get("params")) for p in pre or []])
    doc.h("Software")
    for ver in data.versions:
        doc.kv(sorted((ver or {}).items()))
    doc.h("Runs")
    for r in data.runs:
        doc.kv([(k, r.get(k)) for k in ("run_id", "started_utc", "ended_utc", "backend",
                                        "device", "seed", "operator", "n_scans", "n_done",
                                        "n_failed", "config_sha256") if r.get(k) is not None])
        doc.p("")
    doc.h("Cohort summary")
    doc.kv(cohort_rows(metrics))
    doc.image(figs.get("confusion"), 70)
    doc.image(figs.get("scores"), 100)
    for s in data.failed_scans:
        doc.p(f"failed: {s.scan_id}: {s.reason}", 8)
    doc.h("Review first")
    for rule in review_rules():
        doc.p("- " + rule, 8)
    ranked = sorted((s for s in data.scans if s.priority[0] < 9), key=lambda s: s.priority)
    for i, s in enumerate(ranked, start=1):
        doc.p(f"{i}. {s.scan_id}: " + "; ".join(s.flags), 8.5)
    if not ranked:
        doc.p("Nothing to review first.", 9)
    pairs = [s for s in ranked if s.second is not None and s.second.montage]
    if pairs:
        doc.h("Misclassification analysis", 12)
        doc.p("Top row: the map of the predicted class; bottom row: the map of the expected "
              "class (wrong prediction) or of the runner-up (right but unsure); each row "
              "through its own map's peak, with its per-layer weights.", 8)
        for s in pairs:
            doc.h(f"{s.scan_id}: predicted '{s.predicted_label}', {s.second.why} "
                  f"'{s.second.label}'", 10)
            doc.kv(second_class_rows(s))
            doc.image(s.second.montage, 180)
    doc.h("All scans")
    for s in data.scans:
        p = fmt(s.probability)
        doc.p(f"{s.scan_id}: {s.status}, predicted {s.predicted_label or '-'} (p = {p}), "
              f"expected {s.expected_label or '-'}, verified {'yes' if s.verified else 'NO'}, "
              f"{len(s.flags)} flag(s)", 8)
    for i, s in enumerate(data.scans):
        doc.pdf.add_page()  # one scan per page: figures and their facts stay together
        if i == 0:
            doc.h("Scan details")
        _scan(doc, s)
    doc.pdf.add_page()
    doc.h("Methods appendix")
    for heading, paragraphs in methods_appendix(data):
        doc.h(heading, 11)
        for para in paragraphs:
            doc.p(para, 8.5)
    for m in data.models:
        card = cards.get(str((m or {}).get("name")))
        if card is not None:
            doc.h(f"Model card and intended use: {card.name}", 11)
            doc.p(f"Embedded as given to the report (SHA-256 {card.sha256}).", 7.5)
            doc.p(card.text, 7.5)
    return bytes(doc.pdf.output())

"""The self-contained HTML report: inline CSS, images as ``data:`` URIs, no scripts and no
external references, so it opens offline and can be archived as one file per page.

The page is the Jinja2 template ``templates/report.html.j2`` (autoescaped); this module
only prepares its rows with the formatting shared with the PDF (:mod:`.content`)."""

from __future__ import annotations

import base64
import functools
from collections.abc import Mapping
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

__all__ = ["page_name", "render_page"]

CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;color:#1d2733;
background:#f4f6f8;font-size:14px;line-height:1.45}
main{max-width:1180px;margin:0 auto;padding:18px 26px;background:#fff}
h1{font-size:24px;margin:4px 0 2px}h2{font-size:19px;border-bottom:2px solid #d5dde5;
padding-bottom:3px;margin-top:30px}h3{font-size:16px;margin:18px 0 6px}
table{border-collapse:collapse;margin:6px 0 12px}td,th{border:1px solid #d5dde5;
padding:3px 8px;text-align:left;vertical-align:top}th{background:#eef2f6}
.kv th{width:210px}.status{padding:10px 14px;border-radius:6px;margin:10px 0;font-size:15px}
.ok{background:#e3f4e1;border:1px solid #4c9a2a}.broken{background:#fbe3e1;
border:2px solid #c0392b}.flag{color:#a12a1c;font-weight:600}.muted{color:#66727f}
.scan{border:1px solid #d5dde5;border-radius:6px;padding:8px 14px;margin:14px 0}
.scan.flagged{border-left:6px solid #c0392b}.figs{display:flex;flex-wrap:wrap;gap:10px;
align-items:flex-start}img{max-width:100%;height:auto}code,pre{font-family:Menlo,Consolas,
monospace;font-size:12px}pre{background:#f4f6f8;padding:6px;white-space:pre-wrap}
nav a{margin-right:10px}.grid{display:grid;grid-template-columns:1fr 1fr;gap:0 22px}
.glance{background:#eef2f6;border-radius:6px;padding:8px 14px;margin:10px 0}
.glance ol{margin:4px 0 0}.grid h2{margin-top:16px}.grid table{width:100%}.mono{font-family:Menlo,Consolas,monospace;font-size:12px;
word-break:break-all}
@media print{body{background:#fff}main{max-width:none;padding:0}.scan,table,img{break-inside:avoid}
nav{display:none}}
"""


def page_name(page: int) -> str:
    """``report.html`` for page 1, ``report-page-002.html`` for the next ones."""
    return "report.html" if page == 1 else f"report-page-{page:03d}.html"


@functools.cache
def template(name: str = "report.html.j2") -> Any:
    """A Jinja2 template of ``icam_med/report/templates`` (autoescaped, strict), loaded once."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("icam_med.report", "templates"),
                             autoescape=True, trim_blocks=True, lstrip_blocks=True,
                             undefined=jinja2.StrictUndefined)
    return env.get_template(name)


def _img(png: bytes | None, alt: str, width: int | None = None) -> Any:
    from markupsafe import Markup, escape

    if not png:
        return Markup('<p class="muted">({}: not available)</p>').format(alt)
    w = Markup(f' width="{int(width)}"') if width else ""
    data = base64.b64encode(png).decode("ascii")
    return Markup('<img alt="{}"{} loading="lazy" src="data:image/png;base64,{}">').format(
        escape(alt), w, data)


def _val(v: Any) -> Any:
    """A value for a table cell: formatted as in the PDF (:func:`.content.fmt`), long JSON
    in a ``pre``; markup already built (links, images) passes through."""
    import json

    from markupsafe import Markup

    if isinstance(v, Markup):
        return v
    if v is None or v == "":
        return Markup('<span class="muted">-</span>')
    if isinstance(v, (dict, list)):
        compact = json.dumps(v, sort_keys=True, default=str)
        if len(compact) <= 120:
            return Markup('<span class="mono">{}</span>').format(compact)
        return Markup("<pre>{}</pre>").format(json.dumps(v, indent=1, sort_keys=True,
                                                         default=str))
    return fmt(v)


def _link(item: ScanItem, current: int) -> Any:
    from markupsafe import Markup

    target = "" if item.page == current else page_name(item.page)
    return Markup('<a href="{}#{}">{}</a>').format(target, item.anchor, item.scan_id)


def render_page(data: CohortData, metrics: dict[str, Any], figs: dict[str, bytes | None],
                built: dict[str, Any], *, page: int, n_pages: int,
                cards: Mapping[str, ModelCard] | None = None) -> str:
    """One HTML page. Page 1 holds the header, cohort summary, review list, scan table,
    its share of scan sections and the appendix; later pages hold the status line and
    their scan sections.

    Args:
        cards: model name -> its model card (embedded in the appendix, linked from the
            model table).
    """
    from markupsafe import Markup

    cards = cards or {}
    ranked = sorted((s for s in data.scans if s.priority[0] < 9), key=lambda s: s.priority)
    acc = metrics["accuracy"]
    glance = [Markup("<b>{}</b> scans").format(metrics["n_scans"]),
              Markup("<b>{}</b> explained").format(metrics["n_ok"]),
              Markup("<b>{}</b> failed").format(metrics["n_failed"]),
              Markup("<b>{}</b> verified").format(metrics["n_verified"]),
              (Markup("accuracy <b>{:.1%}</b> ({}/{} with an expected label)").format(
                  acc, metrics["n_correct"], metrics["n_labelled"]) if acc is not None
               else "no expected labels"),
              Markup("<b>{}</b> confident wrong").format(metrics["n_confident_wrong"]),
              Markup("<b>{}</b> flagged").format(metrics["n_flagged"])]
    models = []
    for m in data.models:
        m = m or {}
        models.append({"rows": model_rows(m), "card": cards.get(str(m.get("name")))})
    cols = ("run_id", "started_utc", "ended_utc", "backend", "device", "seed", "operator",
            "n_scans", "n_done", "n_failed", "n_skipped", "seconds")
    runs = [[_val(r.get(k)) for k in cols] for r in data.runs]
    run_hashes = sorted({(r.get("config_sha256"), r.get("model_weights_sha256"))
                         for r in data.runs
                         if r.get("config_sha256") or r.get("model_weights_sha256")}, key=str)
    failures = [[s.scan_id, _val(s.time_utc), _val(s.reason)] for s in data.failed_scans]
    review_rows = [[str(i + 1), _link(s, page), _val(s.predicted_label), _val(s.probability),
                    _val(s.expected_label), Markup("<br>").join(s.flags)]
                   for i, s in enumerate(ranked)]
    overview_rows = [[_link(s, page), s.status, _val(s.predicted_label), _val(s.probability),
                      _val(s.score), _val(s.expected_label),
                      "yes" if s.verified else Markup('<span class="flag">no</span>'),
                      _val(None if s.outside_body is None else f"{s.outside_body:.0%}"),
                      str(len(s.flags))] for s in data.scans]
    return template().render(
        css=Markup(CSS), data=data, built=built, page=page, n_pages=n_pages,
        scans=[s for s in data.scans if s.page == page], ranked=ranked, glance=glance,
        signature=signature_status(data.verify), models=models,
        methods=[method_rows(m) for m in data.methods], runs=runs, run_hashes=run_hashes,
        cohort_rows=cohort_rows(metrics), failures=failures, rules=review_rules(),
        review_rows=review_rows, overview_rows=overview_rows,
        pairs=[s for s in ranked if s.second is not None and s.second.montage],
        second_rows=second_class_rows,
        appendix=methods_appendix(data), figs=figs,
        img=_img, val=_val, link=lambda s: _link(s, page), page_name=page_name,
        scan_rows=scan_rows, pre_rows=lambda pre: [(p.get("name"), p.get("params"))
                                                   for p in pre or []],
    ) + "\n"

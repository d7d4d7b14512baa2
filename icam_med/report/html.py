"""The self-contained HTML report: inline CSS, images as ``data:`` URIs, no scripts and no
external references, so it opens offline and can be archived as one file per page."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from html import escape
from typing import Any

from icam_med.report.collect import CohortData, ScanItem
from icam_med.report.content import methods_appendix, review_rules

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


def _img(png: bytes | None, alt: str, width: int | None = None) -> str:
    if not png:
        return f'<p class="muted">({escape(alt)}: not available)</p>'
    w = f' width="{width}"' if width else ""
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{escape(alt)}"{w} loading="lazy" src="data:image/png;base64,{data}">'


def _kv(rows: Sequence[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{escape(str(k))}</th><td>{_val(v)}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


def _val(v: Any) -> str:
    if v is None or v == "":
        return '<span class="muted">-</span>'
    if isinstance(v, float):
        return escape(f"{v:.4g}")
    if isinstance(v, (dict, list)):
        compact = json.dumps(v, sort_keys=True, default=str)
        if len(compact) <= 120:
            return f'<span class="mono">{escape(compact)}</span>'
        return f"<pre>{escape(json.dumps(v, indent=1, sort_keys=True, default=str))}</pre>"
    return escape(str(v))


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    h = "".join(f"<th>{escape(c)}</th>" for c in head)
    b = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{b}</table>"


def _link(item: ScanItem, current: int) -> str:
    target = "" if item.page == current else page_name(item.page)
    return f'<a href="{target}#{escape(item.anchor)}">{escape(item.scan_id)}</a>'


def _status(data: CohortData) -> str:
    v = data.verify
    anchored = (f" Anchored: the chain contains the externally kept entry "
                f'<span class="mono">{escape(data.anchor)}</span>.' if data.anchor else
                " Not anchored: no externally kept ledger hash was given (pass --anchor to "
                "prove the whole ledger was not rewritten).")
    if v.ok:
        return (f'<div class="status ok" id="ledger-status"><b>Ledger verification: OK</b> '
                f"(re-checked when this report was built). {v.n_entries} ledger entries "
                f"chained, {v.n_scans} scan record(s), {v.n_failures} failure(s) logged, "
                f"{v.n_files} file(s) re-hashed.{anchored}</div>")
    items = "".join(f"<li>{escape(str(p))}</li>" for p in v.problems[:50])
    more = f"<li>... and {len(v.problems) - 50} more</li>" if len(v.problems) > 50 else ""
    return (f'<div class="status broken" id="ledger-status"><b>Ledger verification: BROKEN - '
            f"the audit evidence has been altered or is incomplete</b> (re-checked when this "
            f"report was built; {len(v.problems)} problem(s)). Results below come from files "
            f"that may have been changed; scans marked 'not verified' must not be relied "
            f"on.<ul>{items}{more}</ul></div>")


def _glance(data: CohortData, metrics: dict[str, Any], current: int) -> str:
    """Key figures and the top of the review list, right under the ledger status."""
    acc = metrics["accuracy"]
    facts = [f"<b>{metrics['n_scans']}</b> scans", f"<b>{metrics['n_ok']}</b> explained",
             f"<b>{metrics['n_failed']}</b> failed",
             f"<b>{metrics['n_verified']}</b> verified",
             (f"accuracy <b>{acc:.1%}</b> ({metrics['n_correct']}/{metrics['n_labelled']} "
              "with an expected label)") if acc is not None else "no expected labels",
             f"<b>{metrics['n_confident_wrong']}</b> confident wrong",
             f"<b>{metrics['n_flagged']}</b> flagged"]
    ranked = sorted((s for s in data.scans if s.priority[0] < 9), key=lambda s: s.priority)
    top = "".join(f"<li>{_link(s, current)}: {escape(s.flags[0])}</li>" for s in ranked[:3])
    more = (f' <a href="#review">all {len(ranked)} in the review list</a>' if ranked else "")
    return (f'<div class="glance"><b>At a glance:</b> {" &middot; ".join(facts)}'
            + (f"<br><b>Review first:</b>{more}<ol>{top}</ol>" if ranked else "") + "</div>")


def _header(data: CohortData, built: dict[str, Any], metrics: dict[str, Any]) -> str:
    parts = [f"<h1>icam-med audit report</h1><p class=\"muted\">Audit folder "
             f"<b>{escape(data.folder_name)}</b>; report built {escape(built['utc'])} by "
             f"icam-med {escape(built['version'])} from {len(data.entries)} ledger entries; "
             f'ledger head entry <span class="mono">{escape(str(data.head_sha256))}</span>; '
             f'ledger.jsonl SHA-256 <span class="mono">{escape(str(data.ledger_sha256))}'
             "</span></p>", _status(data),
             _glance(data, metrics, 1)]
    parts.append('<div class="grid"><div>')
    parts.append("<h2 id=\"model\">Model</h2>")
    if not data.models:
        parts.append('<p class="muted">No readable audit record: model unknown.</p>')
    for m in data.models:
        m = m or {}
        contract = m.get("input_contract") or {}
        parts.append(_kv([
            ("name", m.get("name")), ("architecture", m.get("architecture")),
            ("architecture arguments", m.get("args")),
            ("weights file", m.get("weights_file")),
            ("weights SHA-256", m.get("weights_sha256")),
            ("weights format", m.get("weights_format")),
            ("parameters", m.get("n_parameters")),
            ("class labels", ", ".join(m.get("labels") or []) or None),
            ("input", f"{contract.get('channels')} channel(s), spatial size "
                      f"{contract.get('spatial_size')}, {contract.get('dtype')}"),
        ]))
    if len(data.models) > 1:
        parts.append('<p class="flag">More than one model appears in this folder\'s records.</p>')
    parts.append('<h2 id="software">Software (as recorded)</h2>')
    for v in data.versions:
        parts.append("<p>" + " &middot; ".join(
            f"{escape(k)} <b>{escape(str(x))}</b>" for k, x in sorted((v or {}).items(),
                                                                      key=lambda i: i[0].lower()))
            + "</p>")
    if len(data.versions) > 1:
        parts.append('<p class="flag">Records were produced with different software versions.</p>')
    parts.append('</div><div>')
    parts.append('<h2 id="method">Method and options</h2>')
    for m in data.methods:
        parts.append(_kv([("method", m.get("name")), ("layers", ", ".join(m.get("layers") or [])),
                          *sorted((m.get("options") or {}).items())]))
    if len(data.methods) > 1:
        parts.append('<p class="flag">Records use more than one method or option set.</p>')
    for i, pre in enumerate(data.preprocessing):
        rows = [(p.get("name"), p.get("params")) for p in pre or []]
        parts.append(f"<h3>Preprocessing{f' ({i + 1})' if i else ''}</h3>" + _kv(rows))
    parts.append('</div></div><h2 id="runs">Runs</h2>')
    cols = ("run_id", "started_utc", "ended_utc", "backend", "device", "seed", "operator",
            "n_scans", "n_done", "n_failed", "n_skipped", "seconds")
    heads = ("run", "started (UTC)", "ended (UTC)", "backend", "device", "seed", "operator",
             "scans", "done", "failed", "skipped", "seconds")
    rows = [[_val(r.get(k)) for k in cols] for r in data.runs]
    parts.append(_table(heads, rows)
                 if rows else '<p class="muted">No runs logged.</p>')
    hashes = sorted({(r.get("config_sha256"), r.get("model_weights_sha256")) for r in data.runs
                     if r.get("config_sha256") or r.get("model_weights_sha256")}, key=str)
    for cfg_hash, weights_hash in hashes:
        parts.append(f'<p class="muted">config SHA-256 <span class="mono">{_val(cfg_hash)}'
                     f'</span>; weights SHA-256 <span class="mono">{_val(weights_hash)}</span></p>')
    return "\n".join(parts)


def _cohort(data: CohortData, metrics: dict[str, Any], figs: dict[str, bytes | None],
            current: int) -> str:
    acc = metrics["accuracy"]
    rows = [
        ("scans in the ledger", metrics["n_scans"]), ("explained", metrics["n_ok"]),
        ("failed", metrics["n_failed"]), ("verified (files and records intact)",
                                          metrics["n_verified"]),
        ("with an expected label", metrics["n_labelled"]),
        ("accuracy against expected labels",
         f"{acc:.1%} ({metrics['n_correct']}/{metrics['n_labelled']})" if acc is not None
         else None),
        ("confident wrong predictions", metrics["n_confident_wrong"]),
        ("scans with a flag", metrics["n_flagged"]),
    ]
    out = ['<h2 id="cohort">Cohort summary</h2>', '<div class="figs">', _kv(rows)]
    out.append(_img(figs.get("confusion"), "confusion matrix (no expected labels given)"))
    out.append(_img(figs.get("scores"), "score distribution"))
    out.append("</div>")
    failed = data.failed_scans
    out.append("<h3>Failures</h3>")
    if failed:
        out.append(_table(["scan", "time (UTC)", "reason"],
                          [[escape(s.scan_id), _val(s.time_utc), _val(s.reason)] for s in failed]))
    else:
        out.append("<p>No failed scans.</p>")
    return "\n".join(out)


def _review(data: CohortData, current: int) -> str:
    ranked = sorted((s for s in data.scans if s.priority[0] < 9), key=lambda s: s.priority)
    out = ['<h2 id="review">Review first</h2>', "<ul>"]
    out.extend(f"<li>{escape(r)}</li>" for r in review_rules())
    out.append("</ul>")
    if not ranked:
        out.append("<p>Nothing to review first: no confident wrong prediction, suspicious map, "
                   "disagreement, failure or unverified scan.</p>")
        return "\n".join(out)
    rows = [[str(i + 1), _link(s, current), _val(s.predicted_label), _val(s.probability),
             _val(s.expected_label), "<br>".join(escape(f) for f in s.flags)]
            for i, s in enumerate(ranked)]
    out.append(_table(["#", "scan", "predicted", "p", "expected", "why"], rows))
    return "\n".join(out)


def _overview(data: CohortData, current: int) -> str:
    rows = [[_link(s, current), escape(s.status), _val(s.predicted_label), _val(s.probability),
             _val(s.score), _val(s.expected_label),
             "yes" if s.verified else '<span class="flag">no</span>',
             _val(None if s.outside_body is None else f"{s.outside_body:.0%}"),
             str(len(s.flags))] for s in data.scans]
    return ('<h2 id="scans">All scans</h2>' +
            _table(["scan", "status", "predicted", "p", "score", "expected", "verified",
                    "salient mass outside body", "flags"], rows))


def _scan_section(s: ScanItem) -> str:
    cls = "scan flagged" if s.flags else "scan"
    inp = s.record.input if s.record is not None else None
    rows = [
        ("status", s.status), ("predicted", s.predicted_label),
        ("probability of the predicted class", s.probability),
        ("explained class (target)", s.target_label), ("target score (logit)", s.score),
        ("expected label", s.expected_label),
        ("agrees with expected label", None if s.disagrees is None else not s.disagrees),
        ("salient map mass (values >= 0.5) outside the body", None if s.outside_body is None
         else f"{s.outside_body:.1%}"),
        ("map mass inside the given mask", None if s.mask_fraction is None
         else f"{s.mask_fraction:.1%}"),
        ("scan drawn under the map", {"matched": "yes (voxel SHA-256 matches the record)",
                                      "not given": "no (scan not given to the report)"}
         .get(s.scan_shown, f"no ({s.scan_shown})")),
        ("input", f"{inp.format} {inp.modality or ''}, shape {list(inp.shape)}, spacing "
                  f"{None if inp.spacing is None else list(inp.spacing)} mm, orientation "
                  f"{inp.orientation}" if inp else None),
        ("input voxel SHA-256", inp.voxel_sha256 if inp else None),
        ("record", s.record_path), ("ledger entry", s.seq), ("run", s.run_id),
        ("time (UTC)", s.time_utc),
        ("verified", "yes" if s.verified else "NO: " + "; ".join(s.problems)),
    ]
    flags = "".join(f'<li class="flag">{escape(f)}</li>' for f in s.flags)
    out = [f'<section class="{cls}" id="{escape(s.anchor)}"><h3>{escape(s.scan_id)}</h3>',
           f"<ul>{flags}</ul>" if flags else "", '<div class="figs">',
           _img(s.montage, "map over scan") if s.status == "ok" else "",
           "<div>", _kv(rows), _img(s.weights_png, "per-layer weights") if s.status == "ok"
           else "", "</div></div></section>"]
    return "\n".join(out)


def _appendix(data: CohortData) -> str:
    out = ['<h2 id="methods">Methods appendix</h2>']
    for heading, paragraphs in methods_appendix(data):
        out.append(f"<h3>{escape(heading)}</h3>")
        out.extend(f"<p>{escape(p)}</p>" for p in paragraphs)
    return "\n".join(out)


def _nav(n_pages: int, current: int) -> str:
    links = [f'<a href="{page_name(1)}#review">review first</a>',
             f'<a href="{page_name(1)}#cohort">cohort</a>',
             f'<a href="{page_name(1)}#scans">all scans</a>',
             f'<a href="{page_name(1)}#methods">methods</a>']
    if n_pages > 1:
        links.append("pages: " + " ".join(
            f"<b>{p}</b>" if p == current else f'<a href="{page_name(p)}">{p}</a>'
            for p in range(1, n_pages + 1)))
    return "<nav>" + " ".join(links) + "</nav>"


def render_page(data: CohortData, metrics: dict[str, Any], figs: dict[str, bytes | None],
                built: dict[str, Any], *, page: int, n_pages: int) -> str:
    """One HTML page. Page 1 holds the header, cohort summary, review list, scan table,
    its share of scan sections and the appendix; later pages hold the status line and
    their scan sections."""
    title = f"icam-med audit report - {data.folder_name}"
    scans = [s for s in data.scans if s.page == page]
    body = [_nav(n_pages, page)]
    if page == 1:
        body += [_header(data, built, metrics), _cohort(data, metrics, figs, page),
                 _review(data, page), _overview(data, page)]
    else:
        body += [f"<h1>icam-med audit report, page {page} of {n_pages}</h1>", _status(data)]
    body.append(f'<h2 id="details">Scan details (page {page} of {n_pages})</h2>')
    body += [_scan_section(s) for s in scans] or ['<p class="muted">No scans.</p>']
    if page == 1:
        body.append(_appendix(data))
    body.append(f'<p class="muted">Built {escape(built["utc"])} by icam-med '
                f"{escape(built['version'])} from {len(data.entries)} ledger entries.</p>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body><main>"
            + "\n".join(body) + "</main></body></html>\n")

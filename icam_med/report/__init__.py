"""Audit reports for regulatory documentation.

::

    from icam_med.report import build_report
    result = build_report("runs/audit", scans=["scans.csv"], pdf=True)
    result.html   # runs/audit/report.html: self-contained (images inline, no external assets)

One report per audit folder: model identity, method and every option, software versions,
runs, the ledger verification (re-checked at build time), the cohort's accuracy, confusion
matrix and score distribution, a "review first" list, per-scan slice montages of the map
over the scan with the per-layer weights, and a methods appendix. It reads only PHI-free
sources: the ledger, the audit records, the maps and the scans' voxels. See docs/report.md.
"""

from __future__ import annotations

from icam_med.report.build import REPORT_NAME, ReportResult, build_report

__all__ = ["REPORT_NAME", "ReportResult", "build_report"]

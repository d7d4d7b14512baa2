"""Scan discovery: turn command-line inputs (files, folders, CSV scan lists) into scans
with unique, filesystem-safe ids. Used by the batch audit and by the report, which both
need the same ids for the same inputs."""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icam_med.audit.record import safe_name
from icam_med.paths import is_nifti, scan_stem

__all__ = ["ScanSpec", "collect_scans"]

_CSV_PATH = ("path", "scan", "input", "image")
_CSV_LABEL = ("label", "expected_label", "expected")


@dataclass(frozen=True)
class ScanSpec:
    """One scan of a batch.

    Attributes:
        scan_id: its name in the output folder (``scans/<scan_id>/``).
        path: a DICOM series folder, a DICOM file or a NIfTI file.
        expected_label: the label a reader or the ground truth gives, if known.
        mask: a mask on the scan's grid (NIfTI or DICOM); the map's mass inside it is reported.
        region: a segmentation target's region mask for this scan (the scan list's
            ``region`` column): it replaces the config's ``target.region`` for this scan.
    """

    scan_id: str
    path: Path
    expected_label: str | None = None
    mask: Path | None = None
    region: Path | None = None


def _expand_folder(folder: Path) -> list[Path]:
    """A folder holding files is one DICOM series (unless every non-NIfTI file is a single
    2-D image, such as a radiograph: then each file is a scan); otherwise each NIfTI file
    and each series folder below it (any depth) is a scan."""
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    files = [p for p in entries if p.is_file() and not is_nifti(p)]
    if files:
        from icam_med.io.radiograph import radiograph_files  # single 2-D images: one scan each

        singles = radiograph_files(files)
        if singles is None:
            return [folder]
        return sorted([*singles, *(p for p in entries if p.is_file() and is_nifti(p))])
    out: list[Path] = []
    for p in entries:
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            out.extend(_expand_folder(p))
    return out


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = {c.strip().lower(): c for c in reader.fieldnames or ()}
        path_col = next((cols[c] for c in _CSV_PATH if c in cols), None)
        if path_col is None:
            raise ValueError(
                f"scan list {path} has no 'path' column (columns: {list(cols.values())}); "
                "expected a header 'path,label[,mask][,id]'."
            )
        label_col = next((cols[c] for c in _CSV_LABEL if c in cols), None)
        rows = []
        for n, row in enumerate(reader, start=2):
            raw = (row.get(path_col) or "").strip()
            if not raw:
                raise ValueError(f"scan list {path}, line {n}: empty '{path_col}'.")
            p = Path(raw).expanduser()
            p = p if p.is_absolute() else path.parent / p
            mp, rp = (_relative_path(row, cols, key, path) for key in ("mask", "region"))
            rows.append({
                "path": p,
                "label": ((row.get(label_col) or "").strip() or None) if label_col else None,
                "mask": mp,
                "region": rp,
                "id": (row.get(cols["id"]) or "").strip() or None if "id" in cols else None,
            })
        return rows


def _relative_path(row: dict[str, Any], cols: dict[str, str], key: str,
                   csv_path: Path) -> Path | None:
    """The path in column ``key`` of a scan list's row (relative to the list), or ``None``."""
    text = (row.get(cols[key]) or "").strip() if key in cols else ""
    if not text:
        return None
    p = Path(text).expanduser()
    return p if p.is_absolute() else csv_path.parent / p


def _kind(path: Path) -> str:
    """The format part of a scan's name: ``nii`` (``.nii``/``.nii.gz``), ``dcm``, ``dicom``
    (a folder, or a file without a suffix)."""
    suffixes = [x.lower().lstrip(".") for x in path.suffixes if x.lower() != ".gz"]
    return suffixes[-1] if suffixes else "dicom"


def collect_scans(inputs: Iterable[str | Path]) -> list[ScanSpec]:
    """Turn command-line inputs into scans with unique ids.

    Args:
        inputs: NIfTI files, DICOM files, DICOM series folders, folders of those, or CSV
            files with a ``path`` column and optional ``label``, ``mask``, ``region`` and
            ``id`` columns
            (relative paths are relative to the CSV). A path that does not exist is kept:
            that scan fails alone, with its reason recorded.

    Returns:
        Scans in input order. Ids come from the ``id`` column or the file/folder name; when
        two names clash, the format is appended when it tells them apart
        (``chest_dx_finding_dcm`` and ``chest_dx_finding_nii``), otherwise parent folder
        names are prefixed (``sub-01_T1w``).

    Raises:
        ValueError: a CSV without a path column, or no scans at all.
    """
    rows: list[dict[str, Any]] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.suffix.lower() == ".csv" and p.is_file():
            rows.extend(_read_csv(p))
        elif p.is_dir():
            rows.extend({"path": s, "label": None, "mask": None, "id": None}
                        for s in _expand_folder(p))
        else:
            rows.append({"path": p, "label": None, "mask": None, "id": None})
    if not rows:
        raise ValueError("no scans found in the inputs; give NIfTI files, DICOM series "
                         "folders or a CSV with a 'path' column.")
    def name(row: dict[str, Any], levels: int) -> str:
        path = row["path"]
        parts = [scan_stem(path), *(q.name for q in path.absolute().parents if q.name)]
        return safe_name("_".join(reversed(parts[: levels + 1])))

    explicit = [safe_name(r["id"]) for r in rows if r["id"]]
    if len(explicit) != len(set(explicit)):
        dup = next(x for x in explicit if explicit.count(x) > 1)
        raise ValueError(f"scan id '{dup}' is used twice in the scan list; ids must be unique.")
    ids = [safe_name(r["id"]) if r["id"] else name(r, 0) for r in rows]
    # Same name, different formats side by side (``x.dcm`` and ``x.nii.gz``): the format tells
    # them apart without the parent folders (which would reach up to the user's home).
    clashes = {i for i, x in enumerate(ids) if ids.count(x) > 1 and not rows[i]["id"]}
    for i in clashes:
        ids[i] = safe_name(f"{name(rows[i], 0)}_{_kind(rows[i]['path'])}")
    # Clashing names get as many parent folder names as it takes to tell them apart.
    for levels in range(1, 8):
        clashes = {i for i, x in enumerate(ids) if ids.count(x) > 1 and not rows[i]["id"]}
        if not clashes:
            break
        for i in clashes:
            ids[i] = name(rows[i], levels)
    seen: dict[str, int] = {}
    scans = []
    for row, scan_id in zip(rows, ids, strict=True):
        seen[scan_id] = seen.get(scan_id, 0) + 1
        if seen[scan_id] > 1:  # the very same path listed twice
            scan_id = f"{scan_id}-{seen[scan_id]}"
        scans.append(ScanSpec(scan_id, row["path"], row["label"], row["mask"],
                              row.get("region")))
    return scans

"""npe2 reader: DICOM series folders, DICOM files, NIfTI files and audit output folders.

Every layer is placed in physical space (napari world = LPS mm in (z, y, x) order; see
:mod:`napari_plugin._layers`), so a scan and its maps line up in 2D and 3D.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from napari_plugin._layers import audit_folder_layers, is_audit_folder, scan_layer

__all__ = ["get_reader", "read_audit_folder", "read_scan"]

_NIFTI = (".nii", ".nii.gz")


def _single(path: Any) -> str | None:
    if isinstance(path, (list, tuple)):
        return str(path[0]) if len(path) == 1 else None
    return str(path)


def get_reader(path: Any) -> Callable[[Any], list[tuple]] | None:
    """Return a reader for ``path`` if it is a scan or an audit folder, else ``None``."""
    p = _single(path)
    if p is None:
        return None  # a stack of several paths is not a single scan
    pp = Path(p)
    if pp.is_dir():
        if is_audit_folder(pp):
            return read_audit_folder
        from icam_med.io.reader import is_dicom_file

        if any(is_dicom_file(f) for f in sorted(pp.iterdir())[:50] if f.is_file()):
            return read_scan
        return None
    name = pp.name.lower()
    if name.endswith(_NIFTI) or name.endswith(".dcm"):
        return read_scan
    return None


def read_scan(path: Any) -> list[tuple]:
    """Load one scan through :func:`icam_med.io.load_volume` (geometry validated first)."""
    from icam_med.io import load_volume

    p = _single(path)
    image, info = load_volume(p)
    return [scan_layer(image, info)]


def read_audit_folder(path: Any) -> list[tuple]:
    """The scan (when found beside the folder) and its maps, with records in metadata."""
    return audit_folder_layers(_single(path))

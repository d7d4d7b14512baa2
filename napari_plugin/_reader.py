"""npe2 reader: DICOM series folders, DICOM files, NIfTI files and audit output folders.

Every layer is placed in physical space (napari world = LPS mm in (z, y, x) order; see
:mod:`napari_plugin._layers`), so a scan and its maps line up in 2D and 3D.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from icam_med.paths import is_nifti
from napari_plugin._layers import (
    audit_folder_layers,
    is_audit_folder,
    is_saved_map,
    map_file_layers,
    volume_layer,
)

__all__ = ["get_reader", "read_audit_folder", "read_map", "read_scan"]


def _radiological_current_viewer() -> None:
    """Superior up in the viewer the layers go to (napari's current one, if any)."""
    import napari

    from napari_plugin._view import radiological_view

    viewer = napari.current_viewer()
    if viewer is not None:
        radiological_view(viewer)

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
    if is_saved_map(pp):
        return read_map
    if is_nifti(pp) or pp.name.lower().endswith(".dcm"):
        return read_scan
    return None


MAX_VOLUMES = 8
"""A 4-D NIfTI with at most this many volumes opens as one 3D layer per volume."""


def _n_volumes(path: str) -> int:
    if not is_nifti(path):
        return 1
    import nibabel as nib

    shape = nib.load(path).shape
    return int(shape[3]) if len(shape) >= 4 else 1


def read_scan(path: Any) -> list[tuple]:
    """Load a scan through :func:`icam_med.io.load_volume` (geometry validated first).

    A mask (non-negative whole numbers, few values) opens as a Labels layer, a DICOM scan
    with its Window Center/Width.

    A 4-D NIfTI of up to :data:`MAX_VOLUMES` volumes gives one 3D layer per volume
    (``name [volume i]``), each explainable on its own.

    Raises:
        ValueError: a 4-D NIfTI with more volumes (the message says how to pick one).
    """
    from icam_med.io import load_volume

    p = _single(path)
    _radiological_current_viewer()
    n = _n_volumes(p)
    if n == 1:
        image, info = load_volume(p)
        return [volume_layer(image, info)]
    if n > MAX_VOLUMES:
        raise ValueError(
            f"{p}: is 4-D with {n} volumes; the viewer opens at most {MAX_VOLUMES} as separate "
            "layers. Extract the volume to review (e.g. nibabel: img.slicer[..., i]) or "
            "explain it with 'icam-med explain --volume-index i'.")
    layers = []
    for i in range(n):
        image, info = load_volume(p, volume_index=i)
        data, kwargs, kind = volume_layer(image, info)
        kwargs["name"] = f"{kwargs['name']} [volume {i}]"
        layers.append((data, kwargs, kind))
    return layers


def read_map(path: Any) -> list[tuple]:
    """A saved map with its record beside it, as a map overlay (see
    :func:`napari_plugin._layers.map_file_layers`)."""
    _radiological_current_viewer()
    return map_file_layers(_single(path))


def read_audit_folder(path: Any) -> list[tuple]:
    """The scan (when found beside the folder) and its maps, with records in metadata."""
    _radiological_current_viewer()
    return audit_folder_layers(_single(path))

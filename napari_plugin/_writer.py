"""npe2 writer: an image layer (a map) saved as NIfTI with its record, through the library.

The NIfTI is written by :func:`icam_med.io.write_nifti` with the layer's voxel-to-RAS
affine (the scanner position survives a round trip); the layer's audit record - or, for a
map not yet saved as an audit, its PHI-free JSON summary - goes beside it as
``<name>.record.json``. Both writes are atomic and never overwrite.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from icam_med.paths import is_nifti, sidecar_path_for
from napari_plugin._layers import METADATA_KEY, from_napari_array, ras_affine

__all__ = ["layer_ras_affine", "write_map"]


def layer_ras_affine(meta: dict[str, Any]) -> np.ndarray:
    """The voxel-to-RAS affine of a layer from its writer ``meta`` (napari's layer state)."""
    own = (meta.get("metadata") or {}).get(METADATA_KEY) or {}
    if own.get("affine_ras") is not None:
        return np.asarray(own["affine_ras"], dtype=np.float64)
    from napari.utils.transforms import Affine

    ndim = 3
    physical = Affine(scale=meta.get("scale", [1.0] * ndim),
                      translate=meta.get("translate", [0.0] * ndim),
                      rotate=meta.get("rotate"), shear=meta.get("shear"), ndim=ndim)
    outer = np.asarray(meta.get("affine", np.eye(ndim + 1)), dtype=np.float64)
    if hasattr(meta.get("affine"), "affine_matrix"):
        outer = meta["affine"].affine_matrix
    return ras_affine(outer @ physical.affine_matrix)


def write_map(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Write one 3D image layer as NIfTI (+ its record or summary as JSON).

    Raises:
        ValueError: the layer is not 3D or the path is not ``.nii``/``.nii.gz``.
        FileExistsError: the NIfTI or its sidecar exists already.
    """
    from icam_med.io.atomic import atomic_write_text, check_writable
    from icam_med.io.writers import write_nifti

    out = Path(path)
    if not is_nifti(out):
        raise ValueError(f"{out}: a map is saved as NIfTI; give a name ending in .nii.gz.")
    array = from_napari_array(data)
    affine = layer_ras_affine(meta)
    own = (meta.get("metadata") or {}).get(METADATA_KEY) or {}
    side = sidecar_path_for(out)
    check_writable(out)
    check_writable(side)  # refuse before writing anything
    write_nifti(array, out, affine=affine,
                description=f"icam-med map {meta.get('name', '')}"[:79])
    written = [str(out)]
    payload = {
        "layer": meta.get("name"),
        "kind": own.get("kind"),
        "record": own.get("record"),
        "summary": own.get("summary") if own.get("record") is None else None,
        "affine_ras": affine.tolist(),
    }
    try:
        atomic_write_text(side, json.dumps(payload, indent=2, default=str) + "\n")
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    written.append(str(side))
    return written

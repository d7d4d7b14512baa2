"""Medical volumes in and out: loading, geometry validation, preprocessing, writers.

The public API, imported lazily so that ``import icam_med.io`` stays light::

    from icam_med.io import load_volume, write_nifti
    image, info = load_volume("scan_folder/")      # MetaTensor (1, X, Y, Z), ScanInfo

See docs/io.md for supported formats and geometries.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ScanInfo": "loading",
    "load_volume": "loading",
    "make_loader": "loading",
    "detect_format": "loading",
    "GeometryCheck": "validation",
    "GeometryError": "validation",
    "GeometryOptions": "validation",
    "SeriesSummary": "validation",
    "list_series": "validation",
    "validate_dicom": "validation",
    "validate_nifti": "validation",
    "nifti_affine": "validation",
    "GeometrySchema": "validation",
    "SimpleITKDICOMReader": "reader",
    "atomic_write": "atomic",
    "atomic_write_bytes": "atomic",
    "atomic_write_text": "atomic",
    "Preprocessor": "preprocessing",
    "build_preprocessing": "preprocessing",
    "write_nifti": "writers",
    "write_parametric_map": "writers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'icam_med.io' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"icam_med.io.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__

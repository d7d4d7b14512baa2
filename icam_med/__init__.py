"""icam-med: Integrative CAM for 2D and 3D medical CNNs.

The core package never imports Qt or napari. Heavy optional dependencies
(highdicom, dask.distributed) are imported where they are used.
"""

from __future__ import annotations

from icam_med._version import __version__

__all__ = ["__version__"]

"""napari plugin for icam-med: open scans and audits, compute Integrative CAM maps, review them.

A thin layer over :mod:`icam_med` (see docs/napari.md). The manifest is ``napari.yaml``,
registered through the ``napari.manifest`` entry point; nothing here is imported by
``icam_med`` itself.
"""

from icam_med._version import __version__

__all__ = ["__version__"]

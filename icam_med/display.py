"""How maps are displayed, owned once: the napari viewer and the audit report both read it.

This module imports nothing (not even numpy), so the napari plugin can use it without
pulling in the report or the audit package.
"""

from __future__ import annotations

__all__ = ["DISPLAY_THRESHOLD", "MAP_CMAP", "REGION_COLOUR"]

#: Map values below this are not drawn over the scan (fully transparent): the viewer's
#: default threshold and the report's montages cut maps at this one value. On the demo
#: audit (sample lesion brain, demo model), 0.3 leaves 4.3 % of the brain coloured and 76 %
#: of the lesion; 0.2 colours 20 % of the brain, 0 all of it.
DISPLAY_THRESHOLD = 0.3
#: The maps' colormap (matplotlib's and napari's name), on a fixed 0-1 scale.
MAP_CMAP = "inferno"
#: The outline of a segmentation target's explained region (``cam_region.nii.gz``) in the
#: report's figures and its Labels layer in the viewer: a pure green, a colour that neither
#: the grey scan, the inferno map nor the cyan mask outline has.
REGION_COLOUR = "#00ff00"

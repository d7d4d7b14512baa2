"""The viewer shown as a radiology viewer shows it: superior up in every plane.

The plugin's layers live in a world of patient coordinates (LPS mm, napari axes
``(z, y, x)`` = :data:`napari_plugin._layers.AXIS_LABELS`). napari draws the first displayed
axis increasing downwards, which is right for the axial plane (anterior up) but puts
superior at the bottom of coronal and sagittal planes. :func:`radiological_view` sets the
2D camera per displayed axis whenever ``viewer.dims.order`` changes: the vertical axis
points up when it is the superior axis, down otherwise; the horizontal axis points right
(patient's left on the screen's right in axial and coronal planes, anterior on the left in
sagittal planes).
"""

from __future__ import annotations

from typing import Any

from napari_plugin._layers import AXIS_LABELS

__all__ = ["radiological_view", "vertical_orientation"]

_SUPERIOR_AXIS = 0  # world axis 0 runs inferior -> superior


def vertical_orientation(viewer: Any) -> str | None:
    """``"up"``/``"down"`` for the 2D camera's vertical axis, or ``None`` when the viewer's
    world is not the plugin's (its axis labels are not :data:`AXIS_LABELS`)."""
    dims = viewer.dims
    if dims.ndim < 3 or tuple(dims.axis_labels[-3:]) != AXIS_LABELS:
        return None
    vertical = dims.order[-2] - (dims.ndim - 3)  # world axis shown top-to-bottom
    return "up" if vertical == _SUPERIOR_AXIS else "down"


def _orient(viewer: Any) -> None:
    wanted = vertical_orientation(viewer)
    if wanted is None:
        return
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    if tuple(str(getattr(o, "value", o)) for o in camera.orientation2d) != (wanted, "right"):
        camera.orientation2d = (wanted, "right")


class _Orienter:
    """The callback kept on the viewer's dims events (one per viewer)."""

    def __init__(self, viewer: Any) -> None:
        self.viewer = viewer

    def __call__(self, *_: Any) -> None:
        _orient(self.viewer)


def radiological_view(viewer: Any) -> None:
    """Keep superior up in the 2D view of ``viewer`` (idempotent; applied at once too)."""
    events = (viewer.dims.events.order, viewer.dims.events.axis_labels,
              viewer.dims.events.ndim)
    if not any(isinstance(cb, _Orienter) for cb in events[0].callbacks):
        orienter = _Orienter(viewer)
        for event in events:
            event.connect(orienter)
    _orient(viewer)

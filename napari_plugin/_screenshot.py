"""Explain a scan in a shown viewer and capture the overlay (tests and the README image).

Used by tests/test_napari_widget.py and scripts/napari_screenshot.py, so the README's
screenshot is produced by the tested code path.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["explain_in_viewer", "go_to_map_peak", "wait_for_worker"]


def wait_for_worker(widget: Any, timeout: float = 60.0) -> None:
    """Process Qt events until the widget's worker has finished.

    Raises:
        TimeoutError: it is still running after ``timeout`` seconds.
    """
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + timeout
    while widget.worker is not None:
        if time.monotonic() > end:
            raise TimeoutError(f"explaining did not finish within {timeout} s")
        QApplication.processEvents()
        time.sleep(0.01)
    QApplication.processEvents()


def explain_in_viewer(viewer: Any, scan: str | Path, config: str | Path, *,
                      target: int | None = None, contrast: int | None = None,
                      timeout: float = 60.0) -> Any:
    """Open ``scan`` with the plugin's reader, dock the widget, explain; return the widget."""
    from napari_plugin._widget import ExplainWidget

    viewer.open(str(scan), plugin="icam-med")
    widget = ExplainWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Integrative CAM", area="right")
    widget.config.value = "other file..."
    widget.config_file.value = Path(config)
    widget.target_class.value = target
    widget.contrast_class.value = contrast
    widget.run()
    wait_for_worker(widget, timeout)
    return widget


def go_to_map_peak(viewer: Any, map_layer: Any) -> np.ndarray:
    """Step every slider to the map's peak voxel and fit the view; return the peak in world."""
    peak = np.unravel_index(int(np.argmax(map_layer.data)), map_layer.data.shape)
    world = np.asarray(map_layer.data_to_world(peak), dtype=float)
    viewer.dims.ndisplay = 2
    for axis in range(viewer.dims.ndim - 2):
        viewer.dims.set_point(axis, world[axis])
    viewer.reset_view()
    return world

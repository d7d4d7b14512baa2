"""Write docs/images/napari_overlay.png: the plugin explaining the sample brain.

Uses the same code path as tests/test_napari_widget.py (napari_plugin._screenshot):
opens the sample lesion brain with the plugin's reader, docks the widget, explains it
with the demo model (configs/demo.yaml), steps to the slice through the map's peak and
captures the whole window. Run under a display (or `xvfb-run -a`):

    xvfb-run -a .venv/bin/python scripts/napari_screenshot.py
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images" / "napari_overlay.png")
    parser.add_argument("--allow-untrained", action="store_true",
                        help="accept a config without weights (the map is then meaningless)")
    args = parser.parse_args(argv)

    # the checkout's sample scans (as make demo), not the user cache
    os.environ.setdefault("ICAM_MED_SAMPLE_DIR", str(REPO / "sample_data" / "scans"))
    from icam_med.config import load_config

    cfg = load_config(args.config)
    if not args.allow_untrained and (cfg.model.weights is None or not cfg.model.weights.is_file()):
        print(f"{args.config}: the model's weights ({cfg.model.weights}) are missing; train or "
              "fetch the demo model first, or pass --allow-untrained.", file=sys.stderr)
        return 2

    import napari
    import numpy as np
    from PIL import Image

    from napari_plugin._layers import METADATA_KEY
    from napari_plugin._sample_data import sample_scan_path
    from napari_plugin._screenshot import explain_in_viewer, go_to_map_peak

    scan = sample_scan_path("mni152_t1_2mm_lesion.nii.gz")
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1280, 780)
    widget = explain_in_viewer(viewer, scan, args.config, timeout=300)
    fused = next(lay for lay in viewer.layers
                 if (lay.metadata.get(METADATA_KEY) or {}).get("kind") == "fused")
    widget.show_contour.value = True
    go_to_map_peak(viewer, fused)
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    camera.zoom *= 1.35
    viewer.layers.selection.active = fused
    shot = viewer.screenshot(canvas_only=False, flash=False)
    viewer.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(np.asarray(shot)[..., :3]).quantize(colors=255, method=2)
    img.save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The dock widget in a real napari viewer (Qt under Xvfb, started by pytest-xvfb)."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("napari")

from napari.utils.notifications import NotificationSeverity, notification_manager
from test_napari_layers import tiny_config

from napari_plugin._layers import METADATA_KEY
from napari_plugin._screenshot import explain_in_viewer, go_to_map_peak, wait_for_worker
from napari_plugin._widget import ExplainWidget

pytestmark = pytest.mark.gui

ANATOMICAL = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"


@pytest.fixture
def scan(tmp_path):
    path = tmp_path / "anatomical.nii"
    shutil.copy(ANATOMICAL, path)
    return path


@pytest.fixture
def notes():
    """Error notifications shown while the test runs."""
    seen = []

    def keep(event):
        seen.append(event)

    notification_manager.notification_ready.connect(keep)
    yield seen
    notification_manager.notification_ready.disconnect(keep)


def errors(seen):
    return [n.message for n in seen if n.severity >= NotificationSeverity.ERROR]


def result_kinds(viewer):
    return [(lay.metadata.get(METADATA_KEY) or {}).get("kind") for lay in viewer.layers]


def test_widget_explains_and_saves_audit(make_napari_viewer, scan, tmp_path, notes):
    viewer = make_napari_viewer()
    widget = explain_in_viewer(viewer, scan, tiny_config(tmp_path), target=0, contrast=1)
    assert errors(notes) == []
    scan_layer = viewer.layers[0]
    kinds = result_kinds(viewer)
    assert kinds[0] == "scan"
    assert kinds.count("fused") == kinds.count("contrast") == kinds.count("difference") == 1
    assert kinds.count("layer") >= 2  # 'stages' of the tiny net
    for lay in viewer.layers[1:]:
        assert lay.data.shape == scan_layer.data.shape
        np.testing.assert_allclose(lay.affine.affine_matrix, scan_layer.affine.affine_matrix)
        assert lay.visible == (lay.metadata[METADATA_KEY]["kind"] == "fused")
    fused = viewer.layers[kinds.index("fused")]
    meta = fused.metadata[METADATA_KEY]
    summary = meta["summary"]
    assert summary["result"]["method"] == "integrative"
    assert summary["result"]["target_class"] == 0
    assert set(summary["result"]["layer_weights"]) == {
        lay.metadata[METADATA_KEY]["layer"] for lay in viewer.layers
        if lay.metadata[METADATA_KEY]["kind"] == "layer"}
    # the map on the scan's grid, as the library computed it ([0, 1]; resampled, so the
    # max need not be exactly 1)
    assert fused.data.min() >= 0.0 and fused.data.max() <= 1.0
    assert fused.data.max() == pytest.approx(summary["map"]["max"], abs=1e-6)
    contrast = viewer.layers[kinds.index("contrast")]
    assert contrast.metadata[METADATA_KEY]["target_class"] == 1
    assert "absent" in widget.scores.value and "present" in widget.scores.value
    assert widget.prediction.value.startswith(("absent", "present"))
    assert "explained: absent" in widget.prediction.value

    # the default target is the prediction; a contrast equal to it is a warning, no layer
    widget.target_class.value = None
    widget.contrast_class.value = summary["result"]["predicted_class"]
    widget.run()
    wait_for_worker(widget)
    fused = next(lay for lay in viewer.layers
                 if (lay.metadata.get(METADATA_KEY) or {}).get("kind") == "fused")
    meta = fused.metadata[METADATA_KEY]
    assert meta["target_class"] == meta["summary"]["result"]["predicted_class"]
    assert "contrast" not in result_kinds(viewer)
    assert any("contrast class" in n.message for n in notes)
    widget.target_class.value, widget.contrast_class.value = 0, 1
    widget.run()
    wait_for_worker(widget)
    assert result_kinds(viewer).count("fused") == result_kinds(viewer).count("contrast") == 1
    kinds = result_kinds(viewer)
    fused = viewer.layers[kinds.index("fused")]
    meta = fused.metadata[METADATA_KEY]
    contrast = viewer.layers[kinds.index("contrast")]

    # contrast view: (scan + class 0 map) beside (scan + class 1 map) in napari's grid
    widget.side_by_side.value = True
    grid = viewer.canvas.grid if hasattr(viewer, "canvas") else viewer.grid
    layers = viewer.layers
    assert grid.enabled and widget.scan_copy in layers and contrast.visible
    pos = {name: grid.position(layers.index(name), layers)
           for name in (scan_layer.name, fused.name, widget.scan_copy.name, contrast.name)}
    assert pos[scan_layer.name] == pos[fused.name] != pos[contrast.name]
    assert pos[widget.scan_copy.name] == pos[contrast.name]
    assert widget.scan_copy.data is scan_layer.data  # no copy of the voxels
    widget.side_by_side.value = False
    assert not grid.enabled and widget.scan_copy is None and not contrast.visible
    assert result_kinds(viewer).count("scan_copy") == 0

    # 3D view renders the same layers (shared affine: aligned in 3D as in 2D)
    viewer.dims.ndisplay = 3
    assert tuple(viewer.layers[fused.name]._slice_input.displayed) == (0, 1, 2)
    viewer.dims.ndisplay = 2

    # display controls act on the overlay; the contour sits on the map's grid
    assert widget.threshold.value == pytest.approx(0.3)  # the default: a cut, not 0
    widget.threshold.value = 0.4
    assert tuple(fused.contrast_limits) == (0.0, 1.0)  # the scale stays 0-1
    assert fused.colormap.map(np.array([0.39]))[0, 3] == 0.0
    assert fused.colormap.map(np.array([0.41]))[0, 3] == 1.0
    widget.show_contour.value = True
    assert widget.contour is not None and widget.contour in viewer.layers
    np.testing.assert_array_equal(widget.contour.data, fused.data >= 0.5)
    np.testing.assert_allclose(widget.contour.affine.affine_matrix, fused.affine.affine_matrix)
    viewer.dims.ndisplay = 3  # a Labels contour is a solid blob in 3D: hidden there
    assert not widget.contour.visible
    viewer.dims.ndisplay = 2
    assert widget.contour.visible

    # Save audit: the CLI's writer, next to the scan, record into every map layer's metadata
    written = widget.save_audit()
    folder = scan.with_name("anatomical_icam")
    assert {w.role for w in written} >= {"cam_nifti", "summary", "audit_record"}
    assert (folder / "cam.icam.json").is_file() and (folder / "ledger.jsonl").is_file()
    assert meta["record"]["method"]["name"] == "integrative"
    assert meta["record_path"] == str(folder / "cam.icam.json")
    assert contrast.metadata[METADATA_KEY]["record"]["method"]["target"]["class_index"] == 1
    from icam_med.audit import verify_folder

    assert verify_folder(folder).ok
    # the saved folder re-opens with the scan recognised by its voxel hash (the widget's
    # layer data hash the same as the file loaded by the CLI)
    reopened = viewer.open(str(folder), plugin="icam-med")
    assert reopened[0].metadata[METADATA_KEY]["record_mismatch"] is False
    np.testing.assert_allclose(reopened[1].data, fused.data, atol=1e-6)
    # saving the same run again refuses (it says where it is): a notification, no exception
    assert widget.save_audit() == []
    assert any("already saved in" in m and str(folder) in m for m in errors(notes))


def _viewer_with_tiny_widget(make_napari_viewer, scan, tmp_path):
    """A viewer showing ``scan`` and the dock widget set to the tiny test config."""
    viewer = make_napari_viewer()
    viewer.open(str(scan), plugin="icam-med")
    widget = ExplainWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.config.value = "other file..."
    widget.config_file.value = tiny_config(tmp_path)
    return viewer, widget


def test_cancel_mid_run_leaves_viewer_clean(make_napari_viewer, scan, tmp_path, notes):
    viewer, widget = _viewer_with_tiny_widget(make_napari_viewer, scan, tmp_path)
    worker = widget.run()
    assert widget.cancel_button.enabled and not widget.explain_button.enabled
    steps = []
    worker.yielded.connect(lambda s: (steps.append(s), widget.cancel()))
    wait_for_worker(widget)
    assert steps, "the worker reported no progress before finishing"
    assert [lay.name for lay in viewer.layers] == ["anatomical"]
    assert widget.status.value == "cancelled"
    assert widget.explain_button.enabled and not widget.cancel_button.enabled
    assert not widget.progress.visible and errors(notes) == []


def test_bad_inputs_are_notifications_not_exceptions(make_napari_viewer, scan, tmp_path, notes):
    viewer = make_napari_viewer()
    widget = ExplainWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.config.value = "other file..."
    widget.config_file.value = tiny_config(tmp_path)
    # a 4D volume
    viewer.add_image(np.zeros((2, 6, 7, 8), np.float32), name="four_d")
    widget.image.value = viewer.layers["four_d"]
    assert widget.run() is None
    assert any("4 dimension" in m for m in errors(notes))
    # a model expecting 2 channels, on a 1-channel scan: the library's message, from the worker
    viewer.open(str(scan), plugin="icam-med")
    widget.image.value = viewer.layers["anatomical"]
    two = tmp_path / "two"
    two.mkdir()
    widget.config_file.value = tiny_config(two, in_channels=2)
    assert widget.run() is not None
    wait_for_worker(widget)
    assert any("expects 2" in m and "channel" in m for m in errors(notes))
    # a missing weights file
    bad = tmp_path / "missing.yaml"
    bad.write_text(tiny_config(tmp_path).read_text().replace(
        "  labels:", "  weights: nowhere.safetensors\n  labels:"))
    widget.config_file.value = bad
    widget.run()
    wait_for_worker(widget)
    assert any("nowhere.safetensors" in m and "does not exist" in m for m in errors(notes))
    assert result_kinds(viewer) == [None, "scan"]
    assert widget.explain_button.enabled


def test_screenshot_shows_overlay_at_map_peak(make_napari_viewer, scan, tmp_path):
    import torch

    # tiny_config has no weights file: its random initial weights come from torch's global
    # generator. Seeded, the map (and the patch this test measures) is the same every run;
    # unseeded, some draws gave a map too sharp for the area check below.
    torch.manual_seed(0)
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1400, 900)
    widget = explain_in_viewer(viewer, scan, tiny_config(tmp_path))
    fused = next(lay for lay in viewer.layers
                 if (lay.metadata.get(METADATA_KEY) or {}).get("kind") == "fused")
    world = go_to_map_peak(viewer, fused)
    viewer.layers["anatomical"].visible = False  # overlay alone on black
    shot = viewer.screenshot(canvas_only=True, flash=False)
    rgb = shot[..., :3].astype(float)
    # inferno's top end (pale yellow) at the overlay's 0.6 opacity over black: about 150
    assert rgb.max() > 120, "the overlay was not drawn"
    # a visible patch, not a few stray pixels (the default coarse-to-fine fusion is sharper
    # than the old weighted sum: about 0.8 % of this canvas is above the 0.3 cut)
    assert (rgb.sum(-1) > 30).mean() > 0.004
    # the hottest pixel (inferno: brightest) is where the map peaks on this slice
    lum = rgb.sum(-1)
    py, px = np.unravel_index(int(np.argmax(lum)), lum.shape)
    h, w = lum.shape
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    zoom = camera.zoom * widget.native.window().devicePixelRatioF()  # px per mm
    center = np.asarray(camera.center)[-2:]
    expected = (world[-2:] - center) * zoom + np.array([h, w]) / 2
    tolerance = 3 * max(abs(fused.affine.affine_matrix[1, :3]).max(), 1.0) * zoom
    assert np.hypot(py - expected[0], px - expected[1]) <= tolerance, (
        (py, px), expected, tolerance)
    # 3D view: the overlay alone is rendered (attenuated MIP of the map)
    viewer.dims.ndisplay = 3
    shot3d = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(float)
    assert shot3d.max() > 120 and (shot3d.sum(-1) > 30).mean() > 0.01
    viewer.dims.ndisplay = 2
    viewer.layers["anatomical"].visible = True
    assert viewer.screenshot(canvas_only=True, flash=False)[..., :3].std() > 10


DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def _demo_weights() -> Path | None:
    if not DEMO_CONFIG.is_file():
        return None
    from icam_med.config import load_config

    w = load_config(DEMO_CONFIG).model.weights
    return w if w is not None and w.is_file() else None


@pytest.mark.skipif(_demo_weights() is None,
                    reason="the demo model's weights (sample_data/) are not present")
def test_widget_on_demo_model_points_at_the_lesion(make_napari_viewer, tmp_path, notes):
    from napari_plugin._sample_data import sample_scan_path

    scan = sample_scan_path("mni152_t1_2mm_lesion.nii.gz")
    mask = nib.load(str(sample_scan_path("mni152_t1_2mm_lesion_mask.nii.gz")))
    local = tmp_path / scan.name
    shutil.copy(scan, local)  # Save audit writes beside the scan: keep sample_data clean
    viewer = make_napari_viewer()
    widget = explain_in_viewer(viewer, local, DEMO_CONFIG, timeout=120)
    assert errors(notes) == []
    kinds = result_kinds(viewer)
    fused = viewer.layers[kinds.index("fused")]
    summary = fused.metadata[METADATA_KEY]["summary"]
    assert summary["result"]["predicted_label"] == "present"
    assert widget.prediction.value.startswith("present")
    # the hottest voxel lies in the lesion (mask dilated by 2 voxels, i.e. 4 mm)
    from scipy.ndimage import binary_dilation

    lesion = binary_dilation(np.asarray(mask.dataobj) > 0, iterations=2).transpose(2, 1, 0)
    peak = np.unravel_index(int(np.argmax(fused.data)), fused.data.shape)
    assert lesion[peak], f"map peak {peak} is outside the lesion"
    np.testing.assert_allclose(fused.affine.affine_matrix, viewer.layers[0].affine.affine_matrix)
    assert widget.save_audit() and (tmp_path / "mni152_t1_2mm_lesion_icam" / "cam.icam.json").is_file()


def test_closing_the_viewer_mid_run_is_clean(make_napari_viewer, scan, tmp_path, notes):
    from superqt.utils import WorkerBase

    viewer, widget = _viewer_with_tiny_widget(make_napari_viewer, scan, tmp_path)
    worker = widget.run()
    assert worker is not None
    viewer.close()
    WorkerBase.await_workers(msecs=60_000)
    from qtpy.QtWidgets import QApplication

    QApplication.processEvents()
    assert widget.worker is None and errors(notes) == []


def test_widget_opens_from_the_plugin_menu_contribution(make_napari_viewer, scan, notes):
    viewer = make_napari_viewer()
    viewer.open(str(scan), plugin="icam-med")
    _dock, widget = viewer.window.add_plugin_dock_widget("icam-med", "Integrative CAM")
    # napari hands plugins a public-only proxy of the viewer
    assert isinstance(widget, ExplainWidget)
    assert [lay.name for lay in widget.viewer.layers] == ["anatomical"]
    assert widget.image.value.name == "anatomical"
    assert widget.method.value == "integrative" and widget.target_layers.value == "stages"
    # a full run through the proxy, also on a plain array layer (placed by scale/translate),
    # touches no private napari attribute
    import warnings

    viewer.add_image(np.asarray(viewer.layers["anatomical"].data), name="plain",
                     scale=(2.0, 2.0, 2.0), translate=(-16.0, 40.0, -32.0))
    widget.image.value = next(lay for lay in widget.viewer.layers if lay.name == "plain")
    widget.config.value = "other file..."
    widget.config_file.value = tiny_config(scan.parent)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert widget.run() is not None
        wait_for_worker(widget)
    assert not [w for w in caught if "rivate attribute" in str(w.message)]
    fused = next(lay for lay in viewer.layers
                 if (lay.metadata.get(METADATA_KEY) or {}).get("kind") == "fused")
    for ijk in [(0, 0, 0), (3, 4, 5)]:
        np.testing.assert_allclose(fused.data_to_world(ijk),
                                   viewer.layers["plain"].data_to_world(ijk), atol=1e-5)
    assert fused.metadata[METADATA_KEY]["summary"]["scan"]["format"] == "array"
    # configs/ is offered, demo first
    assert widget.config.choices[0] == str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")


def test_choices_come_from_the_engine_registries(make_napari_viewer, scan, tmp_path, notes):
    import dataclasses

    from icam_med import cam
    from icam_med.resources import packaged_configs
    from napari_plugin._widget import ExplainJobResult

    _, widget = _viewer_with_tiny_widget(make_napari_viewer, scan, tmp_path)
    assert list(widget.method.choices) == list(cam.METHODS)
    assert list(widget.layer_preset.choices)[:-1] == list(cam.LAYER_PRESETS)
    boxes = widget.engine_options
    assert tuple(boxes["alpha_fn"].choices) == tuple(cam.ALPHA_FUNCTIONS)
    assert tuple(boxes["bias_mode"].choices) == (None, *cam.BIAS_MODES)  # None: the method's own
    assert tuple(boxes["layer_weighting"].choices) == (None, *cam.LAYER_WEIGHTINGS)
    # a registry's meanings are the items' tooltips
    from qtpy.QtCore import Qt

    native = boxes["layer_weighting"].native
    tips = {native.itemText(i): native.itemData(i, Qt.ItemDataRole.ToolTipRole)
            for i in range(native.count())}
    assert tips["uniform"] == cam.LAYER_WEIGHTINGS["uniform"]
    # the packaged configs, demo first, found through importlib.resources; the example
    # templates (no weights) only with "show templates"
    from napari_plugin._widget import UNTRAINED, config_trust

    trained = [str(p) for p in packaged_configs() if config_trust(p) != UNTRAINED]
    assert list(widget.config.choices)[:-1] == trained and "demo.yaml" in trained[0]
    assert len(trained) < len(packaged_configs())
    widget.show_templates.value = True
    assert list(widget.config.choices)[:-1] == [str(p) for p in packaged_configs()]
    widget.show_templates.value = False
    # Grad-CAM takes no alpha and no bias term by default: the widget passes neither
    widget.method.value = "gradcam"
    assert not boxes["alpha_fn"].enabled and widget.bias_weight.value == 0.0
    opts = widget.method_options()
    assert "alpha_fn" not in opts and opts["bias_weight"] == 0.0
    # integrative with chosen options: they reach the engine and its summary
    widget.method.value = "integrative"
    # the bias weight starts at the method's own default (0 since the evaluation)
    assert boxes["alpha_fn"].enabled
    assert widget.bias_weight.value == cam.IntegrativeCAM.default_bias_weight == 0.0
    boxes["alpha_fn"].value = "sigmoid"
    boxes["layer_weighting"].value = "uniform"
    widget.layer_preset.value = "last"
    assert widget.method_options()["target_layers"] == "last"
    widget.run()
    wait_for_worker(widget)
    assert errors(notes) == []
    assert isinstance(widget.result, ExplainJobResult) and widget.result.ok
    with pytest.raises(dataclasses.FrozenInstanceError):
        widget.result.first = None
    options = widget.result.first.result.options
    assert options["alpha_fn"] == "sigmoid" and options["layer_weighting"] == "uniform"
    assert len(widget.result.first.result.layer_weights) == 1  # 'last': one layer
    # custom layer names: typed, comma separated
    widget.layer_preset.value = "custom names..."
    assert not widget.target_layers.native.isHidden()  # (the viewer is not shown)
    widget.target_layers.value = "features.2, features.6"
    assert widget.method_options()["target_layers"] == ["features.2", "features.6"]


def test_a_new_engine_registry_appears_without_widget_edits(make_napari_viewer, monkeypatch):
    from icam_med import cam
    from napari_plugin._widget import ExplainWidget

    class BlendingCAM(cam.IntegrativeCAM):
        def __init__(self, model, *, blend_rule: str = "soft", **kwargs):
            super().__init__(model, **kwargs)
            self.blend_rule = blend_rule

    monkeypatch.setattr(cam, "BLEND_RULES", ("soft", "hard"), raising=False)
    monkeypatch.setattr(cam, "__all__", [*cam.__all__, "BLEND_RULES"])
    monkeypatch.setitem(cam.METHODS, "blending", BlendingCAM)
    viewer = make_napari_viewer()
    widget = ExplainWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert "blending" in widget.method.choices
    box = widget.engine_options["blend_rule"]
    assert tuple(box.choices) == ("soft", "hard") and not box.enabled  # integrative: no such option
    widget.method.value = "blending"
    assert box.enabled and box.value == "soft"
    box.value = "hard"
    assert widget.method_options()["blend_rule"] == "hard"
    widget.method.value = "integrative"
    assert "blend_rule" not in widget.method_options()


def _bars(widget) -> int:
    """Bars drawn in the widget's per-layer weights plot."""
    return sum(len(ax.patches) for ax in widget._fig.axes)


def test_widget_state_follows_its_runs(make_napari_viewer, scan, tmp_path, notes, caplog,
                                       monkeypatch):
    import logging

    viewer, widget = _viewer_with_tiny_widget(make_napari_viewer, scan, tmp_path)
    good = widget.config_file.value
    worker = widget.run()
    # during a run: nothing to save (and Save refuses), Explain disabled
    assert worker is not None and not widget.save_button.enabled
    assert widget.save_audit() == [] and any("running" in m for m in errors(notes))
    wait_for_worker(widget)
    assert widget.save_button.enabled and widget.result.ok and _bars(widget) > 0
    assert widget.prediction.value != "-"

    # a failed run (missing weights) clears the previous run's prediction, plot and Save:
    # Save can no longer write the old result under the new config
    bad = tmp_path / "missing.yaml"
    bad.write_text(Path(good).read_text().replace(
        "  labels:", "  weights: nowhere.safetensors\n  labels:"))
    widget.config_file.value = bad
    widget.run()
    wait_for_worker(widget)
    assert any("nowhere.safetensors" in m for m in errors(notes))
    assert widget.result is None and not widget.save_button.enabled
    assert widget.prediction.value == "-" and widget.scores.value == "-" and _bars(widget) == 0
    assert widget.save_audit() == [] and not scan.with_name("anatomical_icam").exists()
    assert any("nothing to save" in m for m in errors(notes))

    # a good run again, then its map layers deleted by the user: the state goes with them
    widget.config_file.value = good
    widget.run()
    wait_for_worker(widget)
    assert widget.save_button.enabled
    for lay in list(widget.result_layers):
        viewer.layers.remove(lay)
    assert widget.result is None and not widget.save_button.enabled
    assert widget.prediction.value == "-" and _bars(widget) == 0

    # an unexpected exception in the worker: an error notification carrying the exception
    # (napari's "View Traceback"), the traceback in the log, the state cleared
    import icam_med.explain

    def broken(*args, **kwargs):
        raise ZeroDivisionError("engine blew up")

    caplog.set_level(logging.ERROR, logger="napari_plugin._widget")
    monkeypatch.setattr(icam_med.explain, "explain_volume", broken)
    widget.run()
    wait_for_worker(widget)
    shown = [n for n in notes if getattr(n, "exception", None) is not None
             and isinstance(n.exception, ZeroDivisionError)]
    assert shown and shown[-1].exception.__traceback__ is not None
    logged = [r for r in caplog.records if r.exc_info and r.exc_info[0] is ZeroDivisionError]
    assert logged and "engine blew up" in widget.status.value
    assert widget.result is None and not widget.save_button.enabled
    monkeypatch.undo()

    # an unexpected exception on the GUI thread (building layers, saving): the same
    import napari_plugin._widget as widget_module

    def no_layers(*args, **kwargs):
        raise TypeError("layer builder broke")

    monkeypatch.setattr(widget_module, "explanation_layers", no_layers)
    caplog.clear()
    widget.run()
    wait_for_worker(widget)
    assert any(isinstance(getattr(n, "exception", None), TypeError) for n in notes)
    assert any(r.exc_info and r.exc_info[0] is TypeError for r in caplog.records)
    assert "TypeError" in widget.status.value and not widget.save_button.enabled
    monkeypatch.undo()
    widget.run()
    wait_for_worker(widget)
    assert widget.save_button.enabled

    def no_writer(*args, **kwargs):
        raise AttributeError("writer broke")

    monkeypatch.setattr(icam_med.explain, "write_explanation", no_writer)
    assert widget.save_audit() == []
    assert any(isinstance(getattr(n, "exception", None), AttributeError) for n in notes)


def test_untrained_and_unpinned_models_are_flagged(make_napari_viewer, scan, tmp_path, notes):
    import safetensors.torch

    from icam_med.audit.hashing import sha256_file
    from icam_med.networks import LesionNet
    from napari_plugin._widget import config_trust

    untrained = tiny_config(tmp_path)
    weights = tmp_path / "tiny.safetensors"
    net = LesionNet(spatial_dims=3, in_channels=1, out_channels=2, channels=[4, 8], norm="batch")
    safetensors.torch.save_file(net.state_dict(), str(weights))
    text = untrained.read_text()
    unpinned = tmp_path / "unpinned.yaml"
    unpinned.write_text(text.replace("  labels:", "  weights: tiny.safetensors\n  labels:"))
    pinned = tmp_path / "pinned.yaml"
    pinned.write_text(text.replace(
        "  labels:", f"  weights: tiny.safetensors\n  weights_sha256: {sha256_file(weights)}\n"
                     "  labels:"))
    assert config_trust(untrained) == "untrained: random weights"
    assert config_trust(unpinned) == "weights not pinned by SHA-256"
    assert config_trust(pinned) is None

    _, widget = _viewer_with_tiny_widget(make_napari_viewer, scan, tmp_path)

    def listed():
        combo = widget.config.native
        return {Path(str(v)).name: s for v, s in
                zip(widget.config.choices, [combo.itemText(i) for i in range(combo.count())],
                    strict=True)}

    # the default list: the trained demo, unmarked; the example templates (random weights)
    # are not in it
    texts = listed()
    assert texts["demo.yaml"] == "demo.yaml"
    assert "example_mr.yaml" not in texts and "example_ct.yaml" not in texts
    assert not any("UNTRAINED" in t for t in texts.values())
    # "show templates" lists them, marked; the chosen config stays chosen
    widget.show_templates.value = True
    texts = listed()
    assert "UNTRAINED" in texts["example_mr.yaml"] and "UNTRAINED" in texts["example_ct.yaml"]
    assert widget.config.value == "other file..."
    widget.show_templates.value = False
    assert "example_mr.yaml" not in listed()
    # the chosen config's state is shown in the dock, and a run says it again
    assert "UNTRAINED" in widget.model_trust.value
    widget.run()
    wait_for_worker(widget)
    assert "UNTRUSTED MODEL (untrained: random weights)" in widget.prediction.value
    assert any("means nothing" in m or "say nothing" in m
               for m in [n.message for n in notes])
    widget.config_file.value = unpinned
    assert "NOT PINNED" in widget.model_trust.value
    widget.config_file.value = pinned
    assert widget.model_trust.value == "trained weights, pinned by SHA-256"
    widget.run()
    wait_for_worker(widget)
    assert errors(notes) == [] and "UNTRUSTED" not in widget.prediction.value


def _marked_scan(folder: Path) -> Path:
    """A RAS 1 mm scan, grey inside, with a bright block near its superior end (high k)
    and nothing at its inferior end."""
    data = np.zeros((40, 44, 48), np.float32)
    data[8:32, 8:36, 6:42] = 100.0
    data[16:24, 18:26, 34:40] = 1000.0  # the superior marker
    path = folder / "marked.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 1.0, 1.0])), str(path))
    return path


def test_coronal_and_sagittal_planes_show_superior_up(make_napari_viewer, tmp_path, notes):
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1200, 900)
    viewer.open(str(_marked_scan(tmp_path)), plugin="icam-med")
    widget = ExplainWidget(viewer)
    viewer.window.add_dock_widget(widget, area="right")
    layer = viewer.layers["marked"]
    assert tuple(viewer.dims.axis_labels) == ("S-I", "A-P", "R-L")
    assert [str(u) for u in layer.units] == ["millimeter"] * 3
    layer.contrast_limits = (0.0, 1000.0)
    marker_world = layer.data_to_world((37, 22, 20))  # (k, j, i) in the marker
    for order, plane in (((1, 0, 2), "coronal"), ((2, 0, 1), "sagittal")):
        viewer.dims.order = order
        viewer.dims.set_point(order[0], marker_world[order[0]])
        viewer.reset_view()
        shot = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(float).sum(-1)
        rows = np.nonzero((shot > 600).any(axis=1))[0]
        body = np.nonzero((shot > 60).any(axis=1))[0]
        assert rows.size and body.size, f"{plane}: the marker was not drawn"
        body_mid = (body.min() + body.max()) / 2
        assert rows.mean() < body_mid, (
            f"{plane}: the superior marker is drawn at rows {rows.min()}-{rows.max()}, below "
            f"the middle of the body ({body_mid}): superior is not up")
        assert _camera(viewer).orientation2d[0] == "up"
    viewer.dims.order = (0, 1, 2)  # axial: anterior up, as napari draws it
    assert _camera(viewer).orientation2d[0] == "down"
    assert errors(notes) == []


def _camera(viewer):
    return viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera


def test_threshold_cuts_and_side_by_side_panels_are_labelled_and_whole(
        make_napari_viewer, scan, tmp_path, notes):
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1400, 900)
    widget = explain_in_viewer(viewer, scan, tiny_config(tmp_path), target=0, contrast=1)
    kinds = result_kinds(viewer)
    fused, contrast = (viewer.layers[kinds.index(k)] for k in ("fused", "contrast"))
    assert viewer.layers.selection.active is fused  # the new map is under review
    go_to_map_peak(viewer, fused)

    # what the canvas draws for each voxel of the map: its colormap at its value (limits 0-1)
    widget.threshold.value = 0.3
    low = fused.colormap.map(fused.data.ravel())
    widget.threshold.value = 0.6
    high = fused.colormap.map(fused.data.ravel())
    values = fused.data.ravel()
    assert tuple(fused.contrast_limits) == (0.0, 1.0)
    assert (low[values < 0.299, 3] == 0).all() and (high[values < 0.599, 3] == 0).all()
    kept = values >= 0.6 + 1e-3
    assert kept.any() and (high[kept, 3] == 1).all()
    # the voxels still drawn at 0.6 keep the colours they had at 0.3 (a cut, no re-stretch)
    np.testing.assert_allclose(low[kept], high[kept], atol=2e-3)

    # side by side: two panels, each named, both whole: the camera fits the scan's extent
    # into each grid cell (napari's own fit, margin included)
    widget.side_by_side.value = True
    grid = viewer.canvas.grid
    assert fused.name_overlay.visible and contrast.name_overlay.visible
    shape = np.asarray(grid.actual_shape(viewer.layers))
    assert tuple(shape) in ((1, 2), (2, 1))
    extent = np.asarray(viewer.layers.extent.world)[:, -2:]
    needed = (extent[1] - extent[0]) * _camera(viewer).zoom * shape
    assert (needed <= np.asarray(viewer.canvas.size)).all(), (needed, viewer.canvas.size)
    widget.side_by_side.value = False
    assert not fused.name_overlay.visible and not contrast.name_overlay.visible
    assert errors(notes) == []


def test_save_audit_by_default_writes_a_new_folder_when_one_exists(
        make_napari_viewer, scan, tmp_path, notes):
    from icam_med.audit import verify_folder

    viewer, widget = _viewer_with_tiny_widget(make_napari_viewer, scan, tmp_path)
    earlier = scan.with_name("anatomical_icam")  # an earlier audit (e.g. the sample's)
    earlier.mkdir()
    (earlier / "cam.nii.gz").write_bytes(b"an earlier audit's map")
    widget.run()
    wait_for_worker(widget)
    written = widget.save_audit()
    assert written and errors(notes) == []
    folder = scan.with_name("anatomical_icam-2")
    assert {w.path.parent for w in written} == {folder}
    assert (earlier / "cam.nii.gz").read_bytes() == b"an earlier audit's map"  # untouched
    assert verify_folder(folder).ok
    assert str(folder) in widget.status.value
    # the versioned folder reopens with its scan found beside it
    reopened = viewer.open(str(folder), plugin="icam-med")
    assert reopened[0].metadata[METADATA_KEY]["kind"] == "scan"
    assert reopened[0].metadata[METADATA_KEY]["record_mismatch"] is False
    # a new run goes to the next folder
    widget.run()
    wait_for_worker(widget)
    assert {w.path.parent for w in widget.save_audit()} == {scan.with_name("anatomical_icam-3")}
    # a chosen folder that holds this run's files: refused, the reason first in the toast
    # and the whole message in the dock
    widget.run()
    wait_for_worker(widget)
    widget.audit_folder.value = folder
    assert widget.save_audit() == []
    message = errors(notes)[-1]
    assert message.startswith("Save audit: files of an earlier audit are in the way.")
    assert "cam.icam.json exists" in message
    assert widget.status.value.startswith(f"not saved in {folder}:")
    assert "cam.icam.json exists" in widget.status.value


def test_reopened_audits_and_earlier_scans_can_be_reviewed(make_napari_viewer, scan, tmp_path,
                                                           notes):
    viewer, widget = _viewer_with_tiny_widget(make_napari_viewer, scan, tmp_path)
    widget.run()
    wait_for_worker(widget)
    folder = widget.save_audit()[0].path.parent
    first_maps = [lay.name for lay in widget.result_layers]
    assert all(name.startswith("anatomical ") for name in first_maps)
    # a second scan: its run keeps the first scan's maps (A/B), each named by its scan
    other = tmp_path / "second.nii"
    shutil.copy(scan, other)
    viewer.open(str(other), plugin="icam-med")
    widget.image.value = viewer.layers["second"]
    widget.run()
    wait_for_worker(widget)
    names = [lay.name for lay in viewer.layers]
    assert set(first_maps) <= set(names)
    assert {lay.name for lay in widget.result_layers} == {
        n.replace("anatomical ", "second ", 1) for n in first_maps}
    # a rerun of the same method on the same scan replaces that scan's maps (no duplicates)
    widget.run()
    wait_for_worker(widget)
    assert sorted(lay.name for lay in viewer.layers) == sorted(names)

    # a reopened audit: the controls act on the selected map, not only the current run
    reopened = viewer.open(str(folder), plugin="icam-med")
    audit_map = next(lay for lay in reopened if lay.metadata[METADATA_KEY]["kind"] == "fused")
    current = next(lay for lay in widget.result_layers
                   if lay.metadata[METADATA_KEY]["kind"] == "fused")
    viewer.layers.selection.active = audit_map
    assert widget.review_layers() == [audit_map]
    widget.threshold.value = 0.55
    widget.opacity.value = 0.9
    assert audit_map.colormap.map(np.array([0.5]))[0, 3] == 0.0
    assert audit_map.colormap.map(np.array([0.6]))[0, 3] == 1.0
    assert audit_map.opacity == pytest.approx(0.9)
    assert current.metadata[METADATA_KEY]["threshold"] == pytest.approx(0.3)  # untouched
    assert current.opacity == pytest.approx(0.6)
    widget.show_contour.value = True
    assert widget.contour.metadata[METADATA_KEY]["of"] == audit_map.name
    np.testing.assert_array_equal(widget.contour.data, audit_map.data >= 0.5)
    # selecting the current run's map shows its own settings and moves the contour to it
    viewer.layers.selection.active = current
    assert widget.threshold.value == pytest.approx(0.3)
    assert widget.opacity.value == pytest.approx(0.6)
    assert widget.contour.metadata[METADATA_KEY]["of"] == current.name
    assert errors(notes) == []


def test_cancel_stops_between_layers_and_progress_is_real(make_napari_viewer, scan, tmp_path,
                                                          notes, monkeypatch):
    import threading

    import napari_plugin._widget as widget_module

    viewer, widget = _viewer_with_tiny_widget(make_napari_viewer, scan, tmp_path)
    builders = []
    real_builder = widget_module.explanation_layers

    def builder(*args, **kwargs):
        builders.append(threading.current_thread() is threading.main_thread())
        return real_builder(*args, **kwargs)

    monkeypatch.setattr(widget_module, "explanation_layers", builder)
    widget.run()
    wait_for_worker(widget)
    assert builders == [False]  # the layers' data were built off the GUI thread
    events = widget.monitor.events
    leaves = widget.monitor.leaves
    # progress counted what ran: every layer forward, the backward pass, the inversions
    assert [n for kind, n in events if kind == "forward"][-leaves:] == list(range(
        len([e for e in events if e[0] == "forward"]) - leaves + 1,
        len([e for e in events if e[0] == "forward"]) + 1))
    assert any(kind == "backward" for kind, _ in events)
    assert sum(kind == "invert" for kind, _ in events) == 1 + len(widget.result.first.layer_maps)
    assert widget.monitor.fraction == 1.0
    n_layers = len(viewer.layers)

    # cancel pressed while the model's forward pass is halfway: the run stops at the next
    # layer; no backward pass, no inversion, no layer, no error
    (prepared,) = widget._prepared_cache.values()
    leaves_list = [m for m in prepared.model.modules() if not any(True for _ in m.children())]
    middle = leaves_list[len(leaves_list) // 2]
    seen = {}

    def press_cancel(*_):  # (in the worker thread: what Cancel does for the run)
        if "at" not in seen:
            seen["at"] = len(widget.monitor.events)
            widget._cancel_requested = True
            widget.monitor.cancel_event.set()

    handle = middle.register_forward_hook(press_cancel)
    try:
        widget.run()
        wait_for_worker(widget)
    finally:
        handle.remove()
    after = widget.monitor.events[seen["at"]:]
    assert after == [], f"the run went on after cancel: {after}"
    assert not any(kind in ("backward", "invert") for kind, _ in widget.monitor.events)
    assert widget.status.value == "cancelled" and len(viewer.layers) == n_layers
    assert errors(notes) == []
    # the model carries none of the run's hooks afterwards
    assert all(not m._forward_hooks for m in leaves_list)


def test_dock_fits_a_laptop_screen_and_plot_follows_the_theme(make_napari_viewer, scan,
                                                              tmp_path, notes):
    from matplotlib.colors import to_hex
    from napari.utils.theme import get_theme

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1366, 768)
    viewer.open(str(scan), plugin="icam-med")
    widget = ExplainWidget(viewer)
    viewer.window.add_dock_widget(widget, area="right")
    # every control is in a tab (Model, Method, Display, Compare, Save) or the run area
    titles = [widget.tabs.tabText(i) for i in range(widget.tabs.count())]
    assert titles == ["Model", "Method", "Display", "Compare", "Save"]
    for control in (widget.image, widget.config, widget.method, widget.threshold,
                    widget.side_by_side, widget.save_button):
        assert any(control in section for section in widget.sections.values())
    # the whole dock (tabs + run area + plot) at its preferred size fits 700 px
    height = widget.native.sizeHint().height()
    assert height <= 700, f"the dock wants {height} px"
    assert widget.native.minimumSizeHint().height() <= 700
    # the weights plot is drawn in napari's theme (dark background, light text)
    theme = get_theme(viewer.theme)
    assert to_hex(widget._fig.get_facecolor()) == theme.background.as_hex()
    widget.config.value = "other file..."
    widget.config_file.value = tiny_config(tmp_path)
    widget.run()
    wait_for_worker(widget)
    ax = widget._fig.axes[0]
    assert to_hex(ax.get_facecolor()) == theme.background.as_hex() and _bars(widget) > 0
    assert to_hex(ax.xaxis.label.get_color()) == theme.text.as_hex()
    viewer.theme = "light"
    assert to_hex(widget._fig.get_facecolor()) == get_theme("light").background.as_hex()
    assert _bars(widget) > 0  # redrawn with the same weights
    assert errors(notes) == []


def _audit_with_a_wrong_prediction(scan: Path, tmp_path: Path) -> tuple[Path, str]:
    """A real batch audit of ``scan`` listed twice, once per label, so one of the two
    expected labels disagrees with the (random-weight) model's prediction whatever it is."""
    from icam_med.audit import AuditRecord
    from icam_med.batch import run_batch

    listing = tmp_path / "scans.csv"
    listing.write_text(f"path,label,id\n{scan},absent,as-absent\n{scan},present,as-present\n")
    out = tmp_path / "audit"
    assert run_batch([listing], tiny_config(tmp_path), out, progress=False).exit_code == 0
    wrong = [sid for sid in ("as-absent", "as-present") if AuditRecord.load(
        out / "scans" / sid / "cam.icam.json").analysis.disagrees]
    assert len(wrong) == 1
    return out / "scans" / wrong[0], wrong[0]


def test_misclassified_case_opens_with_both_class_maps_ready_to_compare(
        make_napari_viewer, scan, tmp_path, notes):
    """Issue 14 items 10 and 5: a reopened wrong prediction brings the expected class's map
    (sealed by the audit) beside the predicted class's; side by side in the grid (one
    camera, one cursor: both panels read the same world point), or as a difference."""
    import json

    from icam_med.audit import AuditRecord
    from napari_plugin._widget import COMPARE_DIFF, COMPARE_GRID, COMPARE_OFF

    case, _ = _audit_with_a_wrong_prediction(scan, tmp_path)
    record = AuditRecord.load(case / "cam.icam.json")
    viewer, widget = _viewer_with_tiny_widget(make_napari_viewer, scan, tmp_path)
    opened = viewer.open(str(case), plugin="icam-med")
    first, second = opened[0], opened[1]
    meta_a, meta_b = first.metadata[METADATA_KEY], second.metadata[METADATA_KEY]
    expected = record.analysis.expected_label
    assert meta_a["kind"] == "fused" and meta_b["kind"] == "contrast"
    assert meta_b["target_label"] == expected and meta_b["why"] == "expected class"
    assert second.name.endswith(f"[{expected}] (expected class)")
    # both maps' layer weights: the record's, and the second map's pinned summary's
    summary = json.loads(record.file(record.output("second_class:summary")).read_text())
    assert meta_a["layer_weights"] == pytest.approx(dict(record.method.layer_weights))
    assert meta_b["layer_weights"] == pytest.approx(summary["result"]["layer_weights"])
    # ready: A is the predicted class's map, B the expected class's
    assert widget.compare_a.value is first and widget.compare_b.value is second
    assert "A (" in widget.compare_info.value and "B (" in widget.compare_info.value

    widget.compare_mode.value = COMPARE_GRID
    grid = viewer.canvas.grid
    scan_layer = viewer.layers["anatomical"]
    assert grid.enabled and grid.stride == 2
    assert tuple(grid.actual_shape(viewer.layers)) in ((1, 2), (2, 1))
    panels = list(viewer.layers)[:4]  # napari's grid: consecutive pairs, one per panel
    assert panels[0] is scan_layer and panels[1] is first and panels[3] is second
    assert panels[2].metadata[METADATA_KEY]["kind"] == "scan_copy"
    assert all(lay.visible for lay in panels) and not any(
        lay.visible for lay in list(viewer.layers)[4:])
    assert first.name_overlay.visible and second.name_overlay.visible
    # linked cursors: one world point reads both maps at the same voxel
    peak = np.unravel_index(int(np.argmax(second.data)), second.data.shape)
    world = go_to_map_peak(viewer, second)  # the slider is the panels' one slice position
    viewer.cursor.position = world
    assert second.get_value(viewer.cursor.position, world=True) == pytest.approx(
        second.data.max())
    assert first.get_value(viewer.cursor.position, world=True) == pytest.approx(
        first.data[peak])
    assert np.array_equal(first.world_to_data(world), second.world_to_data(world))

    widget.compare_mode.value = COMPARE_DIFF
    assert not grid.enabled and "scan_copy" not in result_kinds(viewer)
    diff = viewer.layers.selection.active
    assert diff.metadata[METADATA_KEY]["kind"] == "difference"
    np.testing.assert_allclose(diff.data, first.data - second.data)
    lo, hi = diff.contrast_limits
    assert lo == pytest.approx(-hi) and hi == pytest.approx(np.abs(diff.data).max())
    assert diff.colormap.map(np.array([0.5]))[0, 3] == 0.0  # zero is transparent
    widget.compare_mode.value = COMPARE_OFF
    assert diff not in viewer.layers and scan_layer.visible and first.visible
    assert not first.name_overlay.visible
    assert errors(notes) == []


def test_two_runs_compare_side_by_side_and_as_a_difference(make_napari_viewer, scan, tmp_path,
                                                            notes):
    from napari_plugin._widget import COMPARE_DIFF, COMPARE_GRID, COMPARE_OFF

    viewer, widget = _viewer_with_tiny_widget(make_napari_viewer, scan, tmp_path)
    widget.run()
    wait_for_worker(widget)
    widget.method.value = "gradcam"
    widget.run()
    wait_for_worker(widget)
    runs = [lay for lay in viewer.layers if lay.metadata.get(METADATA_KEY, {}).get("kind")
            == "fused"]
    assert len(runs) == 2
    # the iso-contour is one layer, updated in place as its level or its map changes
    widget.show_contour.value = True
    contour = widget.contour
    widget.contour_level.value = 0.7
    assert widget.contour is contour and contour in viewer.layers
    viewer.layers.selection.active = runs[0]
    assert widget.contour is contour
    assert contour.metadata[METADATA_KEY]["of"] == runs[0].name
    np.testing.assert_array_equal(contour.data, runs[0].data >= 0.7)
    widget.show_contour.value = False
    assert contour not in viewer.layers
    widget.compare_a.value, widget.compare_b.value = runs
    assert "integrative" in widget.compare_info.value and "gradcam" in widget.compare_info.value
    widget.compare_mode.value = COMPARE_GRID
    assert viewer.canvas.grid.enabled
    assert list(viewer.layers)[1] is runs[0] and list(viewer.layers)[3] is runs[1]
    assert runs[0].name_overlay.visible and runs[1].name_overlay.visible
    # the contrast class's side-by-side and compare share the grid: one at a time
    widget.compare_mode.value = COMPARE_DIFF
    diff = viewer.layers.selection.active
    np.testing.assert_allclose(diff.data, runs[0].data - runs[1].data)
    # a map removed while compared ends the compare cleanly
    viewer.layers.remove(runs[1])
    assert widget.compare_mode.value == COMPARE_OFF and diff not in viewer.layers
    # the same map twice is refused with a notification
    widget.compare_b.value = widget.compare_a.value
    widget.compare_mode.value = COMPARE_GRID
    assert widget.compare_mode.value == COMPARE_OFF
    assert any("two different maps" in m for m in errors(notes))


def test_configs_are_parsed_once_not_on_every_layer_change(make_napari_viewer, scan, tmp_path,
                                                           monkeypatch):
    import os

    import icam_med.config as config
    from icam_med.display import DISPLAY_THRESHOLD

    parsed = []
    real = config.load_config
    monkeypatch.setattr(config, "load_config",
                        lambda path, *a, **k: (parsed.append(Path(path).name), real(path, *a, **k))[1])
    viewer, widget = _viewer_with_tiny_widget(make_napari_viewer, scan, tmp_path)
    assert widget.threshold.value == pytest.approx(DISPLAY_THRESHOLD)  # the report's cut
    before = len(parsed)
    for i in range(3):  # each layer change refreshes the drop-downs (napari's reset_choices)
        viewer.add_image(np.zeros((4, 4, 4), np.float32), name=f"extra {i}")
    widget.reset_choices()
    assert len(parsed) == before, parsed[before:]
    # an edited config is read again (a new modification time)
    cfg = Path(widget.config_file.value)
    st = cfg.stat()
    os.utime(cfg, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    widget.config_file.value = cfg
    widget._on_config()
    assert cfg.name in parsed[before:]

"""The dock widget's method settings for the methods that are not CAMs (real napari viewer,
Qt under Xvfb via pytest-xvfb): LRP's rule is a drop-down from the engine's LRP_RULES, and
methods whose layers are optional (input gradients hook none; LRP's are extra layer maps)
get no target layers unless the user picks some."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import pytest

pytest.importorskip("napari")

from napari.utils.notifications import NotificationSeverity, notification_manager
from qtpy.QtCore import Qt
from test_napari_widget import _viewer_with_tiny_widget

from icam_med import cam
from napari_plugin._screenshot import wait_for_worker

pytestmark = pytest.mark.gui

ANATOMICAL = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"


@pytest.fixture
def widget(make_napari_viewer, tmp_path):
    """A viewer showing nibabel's anatomical.nii and the dock set to a tiny random model;
    yields the widget and the error notifications shown meanwhile."""
    scan = tmp_path / "anatomical.nii"
    shutil.copy(ANATOMICAL, scan)
    _, w = _viewer_with_tiny_widget(make_napari_viewer, scan, tmp_path)
    seen: list = []
    notification_manager.notification_ready.connect(seen.append)
    w.errors = seen
    yield w
    notification_manager.notification_ready.disconnect(seen.append)


def _errors(widget) -> list[str]:
    return [n.message for n in widget.errors if n.severity >= NotificationSeverity.ERROR]


def _run(widget):
    widget.run()
    wait_for_worker(widget)
    assert _errors(widget) == []
    assert widget.result is not None and widget.result.ok
    return widget.result.first  # the Explanation: .result (summary), .layer_maps


def test_lrp_rule_is_a_drop_down_of_the_engines_rules(widget):
    box = widget.engine_options["rule"]
    assert tuple(box.choices) == tuple(cam.LRP_RULES)
    native = box.native
    tips = {native.itemText(i): native.itemData(i, Qt.ItemDataRole.ToolTipRole)
            for i in range(native.count())}
    assert tips == dict(cam.LRP_RULES)  # each rule's formula as its tooltip
    assert not box.enabled  # integrative has no rule
    widget.method.value = "lrp"
    assert box.enabled and box.value == "epsilon"  # LRP's own default
    box.value = "alpha-beta"
    assert widget.method_options()["rule"] == "alpha-beta"
    result = _run(widget).result
    assert result.method == "lrp" and result.options["rule"] == "alpha-beta"
    widget.method.value = "gradcam"
    assert not box.enabled and "rule" not in widget.method_options()


@pytest.mark.parametrize("method", ["gradient", "guided-backprop"])
def test_input_gradient_methods_get_no_target_layers(widget, method):
    assert widget.layer_preset.value == "stages"  # integrative's
    widget.method.value = method
    assert widget.layer_preset.value == "method default"
    assert "target_layers" not in widget.method_options()
    explanation = _run(widget)
    result = explanation.result
    assert result.method == method
    # nothing hooked, and no preset recorded as if it had been used
    assert result.options["target_layers"] == []
    assert result.options["target_layers_spec"] is None
    assert explanation.layer_maps == {}
    # back to a CAM: its layers again, the method's own default
    widget.method.value = "gradcam"
    assert widget.layer_preset.value in cam.LAYER_PRESETS
    assert "method default" not in widget.layer_preset.choices
    assert widget.method_options()["target_layers"] == widget.layer_preset.value


def test_lrp_layer_maps_only_when_layers_are_picked(widget):
    widget.method.value = "lrp"
    assert widget.layer_preset.value == "method default"
    assert _run(widget).layer_maps == {}
    widget.layer_preset.value = "stages"
    assert widget.method_options()["target_layers"] == "stages"
    result = _run(widget)
    assert len(result.layer_maps) >= 2  # the tiny net's two stages
    # a CAM chosen after keeps the user's preset
    widget.method.value = "gradcam"
    assert widget.layer_preset.value == "stages"

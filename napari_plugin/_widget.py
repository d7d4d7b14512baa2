"""The dock widget: explain the selected scan, show the maps, review and save the audit.

The widget holds no maths: its values become arguments of :func:`icam_med.explain.prepare`
and :func:`icam_med.explain.explain_volume`, run in a napari ``thread_worker`` (a
generator, so progress is reported and a cancel takes effect between steps); the layers
come from the pure :func:`napari_plugin._layers.explanation_layers`; "Save audit" calls
:func:`icam_med.explain.write_explanation`, the CLI's own writer.

Its choices come from the library, never from lists of its own: the configs are the packaged
ones (:func:`icam_med.resources.packaged_configs`), the methods are ``icam_med.cam.METHODS``,
the layer presets ``LAYER_PRESETS``, and every other registry that ``icam_med.cam`` exports
(``ALPHA_FUNCTIONS``, ``BIAS_MODES``, ``LAYER_WEIGHTINGS``, and any added later) becomes a
drop-down for the engine option it lists, enabled for the methods that take that option.

(No ``from __future__ import annotations`` here: magicgui reads annotations at run time.)
"""

import inspect
import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSlider,
    FloatSpinBox,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
)

from icam_med import cam as _engine
from icam_med.paths import MAP_STEM, class_stem, map_path, record_path_for
from icam_med.resources import packaged_configs
from napari_plugin._layers import (
    AXIS_LABELS,
    DEFAULT_THRESHOLD,
    METADATA_KEY,
    UNITS,
    contour_layer,
    difference_layer,
    explanation_layers,
    from_napari_array,
    map_colormap,
    new_audit_folder_for,
    ras_affine,
)
from napari_plugin._view import radiological_view

__all__ = ["COMPARE_DIFF", "COMPARE_GRID", "COMPARE_OFF", "ExplainJobResult", "ExplainWidget",
           "config_choices", "config_trust",
           "engine_choice_options",
           "layer_to_volume", "method_options_accepted"]

log = logging.getLogger(__name__)

_MAP_KINDS = ("fused", "contrast")
# every map layer the plugin makes or opens; the display controls act on these
_REVIEW_KINDS = ("fused", "contrast", "layer", "difference")
_OTHER_FILE = "other file..."
# the compare modes of two map layers (two runs, two audits, or a case's two classes)
COMPARE_OFF = "off"
COMPARE_GRID = "side by side (grid)"
COMPARE_DIFF = "difference A - B"
_CUSTOM_LAYERS = "custom names..."
_METHOD_DEFAULT = "method default"
# Registries of icam_med.cam that are not the values of one engine option.
_NOT_OPTIONS = ("METHODS", "LAYER_PRESETS")
# A registry named ``<OPTION>S`` lists the values of the option ``<option>``
# (BIAS_MODES -> bias_mode, LAYER_WEIGHTINGS -> layer_weighting, FUSIONS -> fusion);
# the exceptions to that naming rule:
_OPTION_OF_REGISTRY = {"ALPHA_FUNCTIONS": "alpha_fn", "LRP_RULES": "rule"}
# Errors the library raises for bad input (bad geometry, wrong channels, missing files...):
# shown as notifications with the library's message, never raised into Qt.
_USER_ERRORS = (ValueError, OSError, KeyError, RuntimeError)


def method_options_accepted(method: str) -> dict[str, Any]:
    """The keyword options a CAM method of ``icam_med.cam.METHODS`` takes, with defaults.

    Read from the signatures of the method class and its bases, so a new option of the
    engine is seen without a widget edit.
    """
    cls = _engine.METHODS[method]
    found: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        init = vars(klass).get("__init__")
        if init is None:
            continue
        for name, param in inspect.signature(init).parameters.items():
            if name in ("self", "model") or param.kind in (param.VAR_POSITIONAL,
                                                          param.VAR_KEYWORD):
                continue
            found[name] = param.default
    return found


def engine_choice_options() -> dict[str, dict[str, str]]:
    """Engine option -> {allowed value: its meaning}, from the registries of ``icam_med.cam``.

    A registry is an upper-case name in ``icam_med.cam.__all__`` bound to a mapping or a
    sequence of strings; it is offered when some method takes the option it names. A
    mapping's string values (``LAYER_WEIGHTINGS["net"]``: what it computes) are the
    meanings shown as the drop-down items' tooltips; otherwise the meaning is ``""``.
    """
    accepted: set[str] = set()
    for method in _engine.METHODS:
        accepted.update(method_options_accepted(method))
    options: dict[str, dict[str, str]] = {}
    for name in getattr(_engine, "__all__", ()):
        if not name.isupper() or name in _NOT_OPTIONS:
            continue
        registry = getattr(_engine, name, None)
        if isinstance(registry, Mapping):
            values = tuple(registry)
        elif isinstance(registry, (tuple, list, frozenset, set)):
            values = tuple(registry) if not isinstance(registry, (set, frozenset)) \
                else tuple(sorted(registry))
        else:
            continue
        if not values or not all(isinstance(v, str) for v in values):
            continue
        option = _OPTION_OF_REGISTRY.get(name, name.lower()[:-1] if name.endswith("S")
                                         else name.lower())
        if option in accepted:
            meanings = registry if isinstance(registry, Mapping) else {}
            options[option] = {v: meanings[v] if isinstance(meanings.get(v), str) else ""
                               for v in values}
    return options


# (resolved path, modification time) -> the config's model section, or None when invalid:
# each config file is parsed once per version, not on every layer change (napari refreshes
# the drop-downs then, on the GUI thread).
_MODEL_SECTIONS: dict[tuple[str, int], Any] = {}
UNTRAINED = "untrained: random weights"


def _model_section(path: str | Path) -> Any:
    """The config's ``model`` section, parsed once per file version; ``None`` if invalid."""
    from icam_med.config import load_config

    p = Path(path)
    try:
        key = (str(p.resolve()), p.stat().st_mtime_ns)
    except OSError:
        return None
    if key not in _MODEL_SECTIONS:
        try:
            _MODEL_SECTIONS[key] = load_config(p).model
        except (ValueError, OSError):
            _MODEL_SECTIONS[key] = None
    return _MODEL_SECTIONS[key]


def config_trust(path: str | Path) -> str | None:
    """Why a config's model should not be trusted, or ``None`` for pinned trained weights.

    ``"untrained: random weights"`` (no ``weights``: the example templates),
    ``"weights file missing"``, ``"weights not pinned by SHA-256"``, or
    ``"invalid config"`` (the run will say why). The config is parsed once per file
    version; whether the weights file exists is looked up each time.
    """
    model = _model_section(path)
    if model is None:
        return "invalid config"
    if model.weights is None:
        return UNTRAINED
    if not Path(model.weights).is_file():
        return "weights file missing"
    if not model.weights_sha256:
        return "weights not pinned by SHA-256"
    return None


def config_choices(show_templates: bool = False) -> list[tuple[str, str]]:
    """The config drop-down: the packaged configs (demo first), each flagged when its model
    is unpinned or its weights are missing (:func:`config_trust`), then "other file...".

    The example templates (configs without weights: random, untrained models) are left out
    unless ``show_templates``; then they are listed, marked UNTRAINED. Any of them can
    still be opened by path ("other file...").
    """
    try:
        found = packaged_configs()
    except RuntimeError as exc:  # package data missing from a broken installation
        log.warning("%s", exc)
        found = []
    choices = []
    for path in found:
        flag = config_trust(path)
        if flag == UNTRAINED and not show_templates:
            continue
        choices.append((f"{path.name} ({flag.upper()})" if flag else path.name, str(path)))
    return [*choices, (_OTHER_FILE, _OTHER_FILE)]


@dataclass(frozen=True)
class ExplainJobResult:
    """What one run of the widget's worker produced.

    Attributes:
        first: the explanation of the target class (``None`` when the run failed).
        second: the contrast class's explanation, if one was asked for and differs.
        prepared: the loaded model and pipeline (kept for the next run).
        warning: a message for the user when the run succeeded with a caveat.
        error: the library's message when the input was refused (then ``first`` is None).
        layers: the napari layer data tuples of the maps, built in the worker.
        cancelled: the run stopped at a cancel request (nothing else is set).
    """

    first: Any = None
    second: Any = None
    prepared: Any = None
    warning: str | None = None
    error: str | None = None
    layers: tuple = ()
    cancelled: bool = False

    @property
    def ok(self) -> bool:
        """True when there is an explanation to show and save."""
        return self.error is None and self.first is not None


def layer_to_volume(layer: Any) -> tuple[Any, Any]:
    """The ``(image, ScanInfo)`` the library expects, from a napari image layer.

    A layer opened by this plugin keeps its :class:`~icam_med.io.ScanInfo`; any other 3D
    image layer is taken with the affine napari places it with (world = LPS mm, z-y-x).

    Raises:
        ValueError: the layer is not a single-channel 3D volume.
    """
    import torch
    from monai.data import MetaTensor

    from icam_med.io import ScanInfo

    if getattr(layer, "rgb", False) or getattr(layer, "multiscale", False):
        raise ValueError(
            f"layer '{layer.name}' is an RGB or multiscale image; explaining needs one "
            "grey-level 3D volume.")
    array = from_napari_array(layer.data)  # raises for 2D/4D data with the reason
    own = layer.metadata.get(METADATA_KEY) or {}
    info = own.get("scan_info")
    if info is not None and tuple(info.shape) == array.shape[1:]:
        affine = np.asarray(info.affine, dtype=np.float64)
    else:
        affine = ras_affine(_layer_data_to_world(layer))
        import nibabel as nib

        spacing = tuple(float(s) for s in np.sqrt((affine[:3, :3] ** 2).sum(0)))
        info = ScanInfo(path=Path(layer.name), format="array", modality=None,
                        shape=tuple(array.shape[1:]), spacing=spacing, affine=affine,
                        orientation="".join(c or "?" for c in nib.aff2axcodes(affine)),
                        source_files=(), checks=(), source_dtype=str(np.asarray(layer.data).dtype))
    image = MetaTensor(torch.from_numpy(array), affine=torch.as_tensor(affine))
    return image, info


def _layer_data_to_world(layer: Any) -> np.ndarray:
    """The 4x4 data-to-world matrix of a 3D layer from its public transform attributes
    (napari composes ``affine`` after scale, translate, rotate and shear)."""
    from napari.utils.transforms import Affine

    physical = Affine(scale=layer.scale, translate=layer.translate, rotate=layer.rotate,
                      shear=layer.shear, ndim=3)
    return np.asarray(layer.affine.affine_matrix, dtype=np.float64) @ physical.affine_matrix


def _devices() -> list:
    import torch

    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


class RunCancelled(Exception):
    """Raised inside a run (between model layers, before an inversion) once cancel is asked."""


class RunMonitor:
    """Shared by the GUI and one run's worker thread: the cancel request and real progress.

    The worker counts what the model and the preprocessing actually did: forward hooks on
    every leaf module (and the model itself), autograd node pre-hooks on their outputs for
    the backward pass, and each inversion of a map onto the scan's grid. Each of those is a
    point where a cancel request takes effect (:class:`RunCancelled`). The GUI reads
    :attr:`fraction` and :attr:`text` on a timer.
    """

    def __init__(self, n_explanations: int = 1) -> None:
        self.cancel_event = threading.Event()
        self.n_explanations = max(1, n_explanations)
        self.leaves = 1
        self.explanation = 0          # index of the explanation under way
        self.forward = 0              # leaf forwards seen in this explanation
        self.backward = 0             # backward nodes seen in this explanation
        self.inverted = 0             # maps carried back onto the scan in this explanation
        self.base = 0.0               # fraction done before the current phase
        self.fraction = 0.0
        self.text = "starting..."
        self.events: list = []        # (phase, count) in order, for tests and benchmarks

    def check(self) -> None:
        """Raise :class:`RunCancelled` if cancel was asked."""
        if self.cancel_event.is_set():
            raise RunCancelled("cancelled")

    def set(self, fraction: float, text: str) -> None:
        self.fraction = max(self.fraction, min(1.0, fraction))
        self.text = text

    def _explaining(self, part: float, text: str) -> None:
        # explanations share 10 % -> 90 %: forward 40 %, backward 35 %, inversion 25 %
        share = 0.8 / self.n_explanations
        self.set(0.1 + share * (self.explanation + part), text)

    def on_forward(self) -> None:
        self.check()
        self.forward += 1
        self.events.append(("forward", self.forward))
        done = (self.forward - 1) % self.leaves + 1  # (a first call probes the model once)
        self._explaining(0.4 * done / self.leaves,
                         f"model forward: layer {done}/{self.leaves}")

    def on_backward(self) -> None:
        self.check()
        self.backward += 1
        self.events.append(("backward", self.backward))
        self._explaining(0.4 + 0.35 * min(1.0, self.backward / self.leaves),
                         "backward pass (gradients)...")

    def on_invert(self) -> None:
        self.check()
        self.inverted += 1
        self.events.append(("invert", self.inverted))
        # the fused map first, then one per layer map (their number is known only then)
        self._explaining(0.75 + 0.25 * (1.0 - 0.5 ** self.inverted),
                         f"map {self.inverted} onto the scan's grid")

    def next_explanation(self) -> None:
        self.forward = self.backward = self.inverted = 0


class _WatchedPreprocessor:
    """The prepared preprocessing, with a cancel point and a progress step per inversion."""

    def __init__(self, inner: Any, monitor: RunMonitor) -> None:
        self._inner = inner
        self._monitor = monitor

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._monitor.check()
        return self._inner(*args, **kwargs)

    def invert(self, *args: Any, **kwargs: Any) -> Any:
        self._monitor.on_invert()
        return self._inner.invert(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _watch_model(model: Any, monitor: RunMonitor) -> list:
    """Forward hooks on the model's leaf modules and on the model: a cancel point and a
    progress step per layer, forward and backward. Returns the handles to remove."""
    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    monitor.leaves = max(1, len(leaves))

    def on_backward(*_: Any) -> None:
        monitor.on_backward()

    def hook(_module: Any, _inputs: Any, output: Any) -> None:
        monitor.on_forward()
        node = getattr(output, "grad_fn", None)
        if node is not None:
            node.register_prehook(on_backward)

    def last(_module: Any, _inputs: Any, _output: Any) -> None:
        monitor.check()  # the whole forward done: the backward pass has not started

    handles = [m.register_forward_hook(hook) for m in leaves]
    handles.append(model.register_forward_hook(last))
    return handles


def _explain_job(config_path: Path, prepared_cache: dict, image: Any, info: Any, *,
                 method: str, options: dict, target: Any, contrast: Any, layer_maps: bool,
                 device: str = "cpu", monitor: RunMonitor | None = None,
                 scan_name: str = "scan", threshold: float = DEFAULT_THRESHOLD,
                 opacity: float = 0.6):
    """The worker's generator: yields ``(step, total, text)``; returns an
    :class:`ExplainJobResult` whose ``layers`` (napari layer data) are built here, off the
    GUI thread.

    A cancel request (``monitor.cancel_event``) takes effect at the next model layer, forward
    or backward, or before the next inversion of a map; the result is then
    ``ExplainJobResult(cancelled=True)``.
    """
    import dataclasses

    from icam_med.explain import explain_volume, prepare

    monitor = monitor or RunMonitor(1 if contrast is None else 2)
    total = 4 if contrast is None else 5
    handles: list = []
    try:
        monitor.set(0.0, "loading model...")
        yield 0, total, "loading model..."
        key = (str(config_path), config_path.stat().st_mtime_ns, device)
        prepared = prepared_cache.get(key)
        if prepared is None:
            prepared = prepare(config_path, device=device)
            prepared_cache.clear()
            prepared_cache[key] = prepared
        monitor.set(0.05, "checking options...")
        yield 1, total, "checking options..."
        prepared.cam(method, options)  # invalid options fail here, before the forward pass
        watched = dataclasses.replace(
            prepared, preprocessor=_WatchedPreprocessor(prepared.preprocessor, monitor))
        handles = _watch_model(prepared.model, monitor)
        monitor.set(0.1, "explaining (forward + backward)...")
        yield 2, total, "explaining (forward + backward)..."
        monitor.next_explanation()
        first = explain_volume(image, info, watched, method=method, method_options=options,
                               targets=target, layer_maps=layer_maps)
        n_maps = 1 + len(first.layer_maps)
        second = None
        warning = None
        if contrast is not None and contrast == first.result.target_class:
            warning = (f"the contrast class ({contrast}) is the explained class; "
                       "choose another class to compare with.")
            contrast = None
        if contrast is not None:
            monitor.check()
            yield 3, total, "explaining the contrast class..."
            monitor.explanation = 1
            monitor.next_explanation()
            second = explain_volume(image, info, watched, method=method,
                                    method_options=options, targets=contrast)
        monitor.check()
        monitor.set(0.9, "building layers...")
        yield total - 1, total, "building layers..."
        layers = explanation_layers(first, scan_name=scan_name, contrast=second,
                                    threshold=threshold, opacity=opacity)
        monitor.set(1.0, f"{n_maps + (2 if second is not None else 0)} maps ready")
    except RunCancelled:
        return ExplainJobResult(cancelled=True)
    except _USER_ERRORS as exc:
        log.info("explain failed: %s", exc)
        return ExplainJobResult(error=str(exc))
    finally:
        for h in handles:
            h.remove()
    return ExplainJobResult(first=first, second=second, prepared=prepared, warning=warning,
                            layers=tuple(layers))


class ExplainWidget(Container):
    """Integrative CAM (and Grad-CAM family) maps for the selected scan, with review tools."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self._prepared_cache: dict = {}
        self.worker: Any = None
        self.result: ExplainJobResult | None = None
        self.result_layers: list = []
        self.contour: Any = None
        self.scan_copy: Any = None
        self.compare_layers: list = []       # what compare added (a scan copy, a difference)
        self._compare_hidden: list = []      # layers compare hid, shown again when it ends
        self._compare_shown: list = []       # maps compare made visible and named
        self._comparing = False
        self._cancel_requested = False
        self._in_contour = False
        self.monitor: RunMonitor | None = None
        from qtpy.QtCore import QTimer

        self._progress_timer = QTimer()
        self._progress_timer.setInterval(100)
        self._progress_timer.timeout.connect(self._poll_progress)

        self.image = ComboBox(label="image", choices=self._image_choices, nullable=True)
        self.config = ComboBox(label="config", choices=self._config_choices)
        self.show_templates = CheckBox(
            label="show templates", value=False,
            tooltip="also list the example templates: configs without trained weights "
                    "(random, untrained models), e.g. example_mr.yaml")
        self.config_file = FileEdit(label="config file", mode="r", filter="*.yaml *.yml",
                                    visible=False)
        self.model_trust = Label(label="model", value="-")
        methods = list(_engine.METHODS)
        self.method = ComboBox(label="method", choices=methods,
                               value="integrative" if "integrative" in methods else methods[0])
        presets = list(_engine.LAYER_PRESETS)
        default_layers = method_options_accepted(self.method.value).get("target_layers")
        self.layer_preset = ComboBox(
            label="target layers", choices=self._layer_choices,
            value=default_layers if default_layers in presets else presets[0],
            tooltip="a preset of the engine (icam_med.cam.LAYER_PRESETS: 'stages' is the "
                    "last layer of each resolution), or your own module names; "
                    f"'{_METHOD_DEFAULT}' (methods whose layers are optional: input "
                    "gradients hook none, LRP's are extra layer maps) passes none")
        self.target_layers = LineEdit(
            label="layer names", value=self.layer_preset.value, visible=False,
            tooltip="comma-separated module names (model.named_modules()), or a preset: "
                    + ", ".join(presets))
        self.target_class = ComboBox(label="target class", choices=self._class_choices,
                                     tooltip="the class to explain; default: the prediction")
        self.contrast_class = ComboBox(
            label="contrast class", choices=self._contrast_choices,
            tooltip="also explain this class: why the target and not this one")
        # one drop-down per engine option that has a registry (alpha_fn, bias_mode,
        # layer_weighting, ...), its default the method's own
        self.engine_options: dict[str, ComboBox] = {}
        signatures = [method_options_accepted(m) for m in methods]
        defaults = method_options_accepted(self.method.value)
        for option, values in engine_choice_options().items():
            choices: list = [(v, v) for v in values]
            # a method whose default is None picks its own (e.g. score weighting)
            if any(s[option] not in values for s in signatures if option in s):
                choices.insert(0, (_METHOD_DEFAULT, None))
            default = defaults.get(option)
            if default not in values:
                default = choices[0][1]
            box = ComboBox(
                label=option.replace("_", " "), choices=choices, value=default,
                tooltip=f"engine option '{option}' (icam_med.cam); '{_METHOD_DEFAULT}' leaves "
                        "it to the method; hover an item for what it does")
            from qtpy.QtCore import Qt

            for i in range(box.native.count()):  # each value's meaning, from the registry
                meaning = values.get(box.native.itemText(i), "")
                if meaning:
                    box.native.setItemData(i, meaning, Qt.ItemDataRole.ToolTipRole)
            self.engine_options[option] = box
        self.bias_weight = FloatSpinBox(label="bias weight", value=1.0, min=0.0, max=10.0,
                                        step=0.1)
        self.device = ComboBox(label="device", choices=_devices(), value="cpu")
        self.layer_maps = CheckBox(label="layer maps", value=True,
                                   tooltip="also show each layer's map (hidden layers)")
        self.explain_button = PushButton(text="Explain")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="progress", value=0, min=0, max=4, visible=False)
        self.status = Label(label="", value="")
        self.prediction = Label(label="prediction", value="-")
        self.scores = Label(label="class scores", value="-")
        self.threshold = FloatSlider(
            label="threshold", value=DEFAULT_THRESHOLD, min=0.0, max=0.99, step=0.01,
            tooltip="map values below this are not drawn (a hard cut on the maps' fixed "
                    "0-1 scale; the colours of the values above it do not change)")
        self.opacity = FloatSlider(label="opacity", value=0.6, min=0.0, max=1.0, step=0.05)
        self.side_by_side = CheckBox(
            label="side by side", value=False, enabled=False,
            tooltip="show the target class's map and the contrast class's map side by side "
                    "(napari grid: each over the scan, one camera)")
        self.compare_a = ComboBox(
            label="map A", choices=self._compare_choices, nullable=True,
            tooltip="any map: a run, a reopened audit, the predicted class of a case")
        self.compare_b = ComboBox(
            label="map B", choices=self._compare_choices, nullable=True,
            tooltip="the map to compare with A: another run or audit, or the expected "
                    "class of a misclassified case (opened ready to compare)")
        self.compare_mode = ComboBox(
            label="compare", choices=[COMPARE_OFF, COMPARE_GRID, COMPARE_DIFF],
            value=COMPARE_OFF,
            tooltip="side by side: each map over its scan in napari's grid (one camera and "
                    "one slice position: the cursors are linked), each panel named; "
                    "difference: A - B on one grid, transparent at zero, symmetric limits")
        self.compare_info = Label(label="weights", value="-")
        self.show_contour = CheckBox(label="iso-contour", value=False)
        self.contour_level = FloatSpinBox(label="contour level", value=0.5, min=0.0, max=1.0,
                                          step=0.05)
        self.audit_folder = FileEdit(label="audit folder", mode="d", value="",
                                     tooltip="empty: '<scan>_icam' beside the scan")
        self.save_button = PushButton(text="Save audit", enabled=False)
        # A dock that fits a laptop (1366x768): the settings in tabs, the run always in view
        self.sections = {
            "Model": Container(widgets=[self.image, self.config, self.show_templates,
                                        self.config_file, self.model_trust, self.device]),
            "Method": Container(widgets=[self.method, self.layer_preset, self.target_layers,
                                         self.target_class, self.contrast_class,
                                         *self.engine_options.values(), self.bias_weight,
                                         self.layer_maps]),
            "Display": Container(widgets=[self.threshold, self.opacity, self.show_contour,
                                          self.contour_level]),
            "Compare": Container(widgets=[self.side_by_side, self.compare_a, self.compare_b,
                                          self.compare_mode, self.compare_info]),
            "Save": Container(widgets=[self.audit_folder, self.save_button]),
        }
        from qtpy.QtWidgets import QTabWidget

        self.tabs = QTabWidget()
        for title, section in self.sections.items():
            section.native.layout().setContentsMargins(4, 4, 4, 4)
            self.tabs.addTab(section.native, title)
        self.native.layout().addWidget(self.tabs)
        buttons = Container(widgets=[self.explain_button, self.cancel_button],
                            layout="horizontal", labels=False)
        buttons.native.layout().setContentsMargins(0, 0, 0, 0)
        self.extend([buttons, self.progress, self.status, self.prediction, self.scores])
        for label in (self.status, self.prediction, self.scores, self.model_trust,
                      self.compare_info):
            label.native.setWordWrap(True)
        self._plot = self._make_plot()

        self.config.changed.connect(self._on_config)
        self.config_file.changed.connect(self._on_config)
        self.show_templates.changed.connect(self._on_show_templates)
        self.method.changed.connect(self._on_method)
        self.layer_preset.changed.connect(self._on_layer_preset)
        self.explain_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.threshold.changed.connect(self._apply_display)
        self.opacity.changed.connect(self._apply_display)
        self.show_contour.changed.connect(self._update_contour)
        self.side_by_side.changed.connect(self._update_side_by_side)
        for box in (self.compare_a, self.compare_b, self.compare_mode):
            box.changed.connect(self._update_compare)
        self.contour_level.changed.connect(self._update_contour)
        self.save_button.changed.connect(self.save_audit)
        for ev in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            ev.connect(self._on_layers_changed)
        self.viewer.dims.events.ndisplay.connect(self._contour_in_2d_only)
        self.viewer.layers.selection.events.active.connect(self._on_selection)
        self._on_config()
        self._on_method()
        self._on_layers_changed()
        radiological_view(self.viewer)  # superior up in coronal and sagittal planes
        # closing the viewer (or the dock) while a run is under way cancels it
        self.native.destroyed.connect(lambda *_: self._closed())

    # choices --------------------------------------------------------------------------
    def _image_choices(self, _w: Any = None) -> list:
        import napari

        return [(lay.name, lay) for lay in self.viewer.layers
                if isinstance(lay, napari.layers.Image)
                and (lay.metadata.get(METADATA_KEY) or {}).get("kind", "scan") == "scan"]

    def _config_choices(self, _w: Any = None) -> list:
        templates = getattr(self, "show_templates", None)
        return config_choices(show_templates=bool(templates is not None and templates.value))

    def _on_show_templates(self, *_: Any) -> None:
        """List (or drop) the example templates, in the list's own order ("other file..."
        last; magicgui would append new items at the end), keeping the chosen config."""
        value = self.config.value
        native = self.config.native
        native.blockSignals(True)
        try:
            native.clear()
            self.config.reset_choices()
        finally:
            native.blockSignals(False)
        self.config.value = value if value in self.config.choices else self.config.choices[0]
        self._on_config()

    def _model_labels(self) -> tuple:
        model = _model_section(self.config_path()) if self.config.value else None
        return tuple(model.labels) if model is not None else ()

    def _class_choices(self, _w: Any = None) -> list:
        labels = getattr(self, "_cached_labels", ())
        return [("predicted class", None)] + [(f"{i}: {n}", i) for i, n in enumerate(labels)]

    def _contrast_choices(self, _w: Any = None) -> list:
        labels = getattr(self, "_cached_labels", ())
        return [("none", None)] + [(f"{i}: {n}", i) for i, n in enumerate(labels)]

    def config_path(self) -> Path:
        """The selected config file."""
        if self.config.value == _OTHER_FILE:
            return Path(self.config_file.value)
        return Path(self.config.value)

    def _on_config(self, *_: Any) -> None:
        self.config_file.visible = self.config.value == _OTHER_FILE
        self._cached_labels = self._model_labels()
        path = self.config_path()
        flag = config_trust(path) if path.is_file() else None
        if not path.is_file():
            self.model_trust.value = "-"
        elif flag is None:
            self.model_trust.value = "trained weights, pinned by SHA-256"
        elif flag == "invalid config":
            self.model_trust.value = "INVALID CONFIG: Explain says why"
        else:
            self.model_trust.value = f"{flag.upper()}: its maps and predictions mean nothing"
        self.model_trust.native.setStyleSheet("color: #ff8c00;" if flag else "")
        self.target_class.reset_choices()
        self.contrast_class.reset_choices()

    def _layers_optional(self) -> bool:
        """Whether the chosen method's layers are optional (its ``target_layers`` defaults
        to ``None``: input-gradient methods hook none, LRP adds layer maps only when
        given, SmoothGrad leaves them to its base method) or not taken at all."""
        method = getattr(self, "method", None)
        if method is None:
            return False
        return method_options_accepted(method.value).get("target_layers") is None

    def _layer_choices(self, _w: Any = None) -> list:
        """The layer presets, custom names, and for a method whose layers are optional,
        first, the method's own default (no layers passed)."""
        first = [_METHOD_DEFAULT] if self._layers_optional() else []
        return [*first, *_engine.LAYER_PRESETS, _CUSTOM_LAYERS]

    def _on_method(self, *_: Any) -> None:
        """Enable the options the chosen method takes (e.g. alpha_fn for Grad-CAM++); a
        method whose layers are optional starts at its own default (no layers passed),
        and leaving it for one that needs layers selects that method's default preset."""
        accepted = method_options_accepted(self.method.value)
        previous = self.layer_preset.value
        self.layer_preset.reset_choices()
        if self._layers_optional():
            self.layer_preset.value = _METHOD_DEFAULT
        elif previous == _METHOD_DEFAULT or self.layer_preset.value not in (
                *_engine.LAYER_PRESETS, _CUSTOM_LAYERS):
            default = accepted.get("target_layers")
            self.layer_preset.value = (default if default in _engine.LAYER_PRESETS
                                       else next(iter(_engine.LAYER_PRESETS)))
        elif self.layer_preset.value != previous:
            self.layer_preset.value = previous
        for option, box in self.engine_options.items():
            box.enabled = option in accepted
        self.bias_weight.enabled = "bias_weight" in accepted
        # the bias weight starts at the method's own (0 for Grad-CAM, 1 for Integrative CAM)
        default = accepted.get("bias_weight")
        if not isinstance(default, (int, float)):
            default = getattr(_engine.METHODS[self.method.value], "default_bias_weight", 0.0)
        self.bias_weight.value = float(default)

    def _on_layer_preset(self, *_: Any) -> None:
        custom = self.layer_preset.value == _CUSTOM_LAYERS
        self.target_layers.visible = custom
        if self.layer_preset.value == _METHOD_DEFAULT:
            self.target_layers.value = ""
        elif not custom:
            self.target_layers.value = self.layer_preset.value

    def _on_layers_changed(self, *_: Any) -> None:
        self.image.reset_choices()
        if self.image.value is None and self.image.choices:
            self.image.value = self.image.choices[-1]  # the latest scan
        self.result_layers = [lay for lay in self.result_layers if lay in self.viewer.layers]
        if self.result is not None and not self._map_layers(("fused",)):
            # the result's map was deleted: nothing on screen stands for it any more
            self._clear_result()
            self.status.value = "the map layers were removed; press Explain again"
        if self.contour is not None and self.contour not in self.viewer.layers:
            self.contour = None
        if self.scan_copy is not None and self.scan_copy not in self.viewer.layers:
            self.scan_copy = None
        if not self._comparing:
            self._refresh_compare_choices()

    def _make_plot(self) -> Any:
        """A small bar chart of the per-layer weights (matplotlib on Qt, in napari's theme)."""
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(3.2, 1.4), dpi=90, layout="constrained")
        canvas = FigureCanvasQTAgg(fig)
        canvas.setMinimumHeight(110)
        canvas.setMaximumHeight(160)
        self.native.layout().addWidget(canvas)
        self._fig = fig
        self._draw_weights({})
        if hasattr(self.viewer.events, "theme"):
            self.viewer.events.theme.connect(lambda *_: self._draw_weights(self._weights))
        return canvas

    def theme_colors(self) -> dict[str, str]:
        """napari's current theme as matplotlib colours: background, text, accent."""
        try:
            from napari.utils.theme import get_theme

            theme = get_theme(self.viewer.theme)
            return {"background": theme.background.as_hex(), "text": theme.text.as_hex(),
                    "accent": theme.highlight.as_hex()}
        except (KeyError, ValueError, AttributeError):  # an unknown theme: napari's dark one
            return {"background": "#23242b", "text": "#f0f1f2", "accent": "#61696e"}

    def _draw_weights(self, weights: dict) -> None:
        self._weights = dict(weights)
        colors = self.theme_colors()
        self._fig.clear()
        self._fig.set_facecolor(colors["background"])
        ax = self._fig.add_subplot(111)
        ax.set_facecolor(colors["background"])
        for spine in ax.spines.values():
            spine.set_color(colors["accent"])
        if weights:
            names = list(weights)
            ax.barh(range(len(names)), [weights[n] for n in names], color="#f08a24")
            ax.set_yticks(range(len(names)), names, fontsize=7)
            ax.invert_yaxis()
            ax.set_xlim(0, max(1e-6, max(weights.values())) * 1.1)
        else:
            ax.set_yticks([])
            ax.text(0.5, 0.5, "per-layer weights", ha="center", va="center",
                    transform=ax.transAxes, fontsize=8, color=colors["text"])
        ax.set_xlabel("layer weight", fontsize=7, color=colors["text"])
        ax.tick_params(labelsize=7, colors=colors["text"])
        self._fig.canvas.draw_idle()

    def reset_choices(self, *_: Any) -> None:
        """Refresh every drop-down, in the tabs too (napari calls this on layer changes)."""
        super().reset_choices()
        for section in self.sections.values():
            section.reset_choices()

    # running --------------------------------------------------------------------------
    def method_options(self) -> dict:
        """The engine options the widget's values stand for: the layers only for a method
        that takes them and not left at its own default."""
        accepted = method_options_accepted(self.method.value)
        opts: dict = {}
        if "target_layers" in accepted and self.layer_preset.value != _METHOD_DEFAULT:
            layers = self.target_layers.value.strip() or "stages"
            opts["target_layers"] = (
                [s.strip() for s in layers.split(",") if s.strip()] if "," in layers
                else layers)
        if "bias_weight" in accepted:
            opts["bias_weight"] = float(self.bias_weight.value)
        for option, box in self.engine_options.items():
            if option in accepted and box.value is not None:
                opts[option] = box.value
        return opts

    def _clear_result(self) -> None:
        """Forget the last result: no prediction, no weights plot, nothing to save."""
        self.result = None
        self._saved_folder = None
        self.save_button.enabled = False
        self.side_by_side.enabled = False
        self.prediction.value = "-"
        self.scores.value = "-"
        self._draw_weights({})

    def _notify_unexpected(self, exc: BaseException) -> None:
        """An error outside the library's refusals: logged with its traceback and shown as
        napari's error notification (with its "View Traceback" action); never raised into Qt."""
        from napari.utils.notifications import notification_manager

        log.error("unexpected error in the icam-med widget: %s", exc,
                  exc_info=(type(exc), exc, exc.__traceback__))
        if self._alive():
            self._clear_result()
            self.status.value = f"failed: {type(exc).__name__}: {exc}"
        if not any(getattr(n, "exception", None) is exc for n in notification_manager.records):
            notification_manager.receive_error(type(exc), exc, exc.__traceback__)

    def _notify_error(self, message: str) -> None:
        from napari.utils.notifications import show_error

        self.status.value = f"failed: {message}"  # the whole reason stays in the dock
        show_error(message)

    def run(self, *_: Any) -> Any:
        """Start explaining the selected image in a worker thread; returns the worker.

        The previous result is dropped first (its layers stay, but the prediction, the
        weights plot and Save audit no longer stand for it); Save is disabled until this
        run succeeds.
        """
        try:
            return self._start_run()
        except Exception as exc:  # anything unexpected: a notification, never into Qt
            self._notify_unexpected(exc)
            return None

    def _start_run(self) -> Any:
        from napari.qt.threading import create_worker

        if self.worker is not None:
            self._notify_error("an explanation is already running; cancel it first.")
            return None
        layer = self.image.value
        if layer is None:
            self._notify_error("no image layer selected: open a scan (File > Open, or "
                               "File > Open Sample > icam-med) and choose it as 'image'.")
            return None
        config_path = self.config_path()
        if not config_path.is_file():
            names = ", ".join(p.stem for p in packaged_configs())
            self._notify_error(f"config file {config_path} does not exist; choose a packaged "
                               f"config ({names}) or a YAML file of your own.")
            return None
        try:
            image, info = layer_to_volume(layer)
        except _USER_ERRORS as exc:
            self._notify_error(str(exc))
            return None
        contrast = self.contrast_class.value
        target = self.target_class.value
        self._clear_result()
        self._run_trust = config_trust(config_path)
        self._scan_layer = layer
        self._cancel_requested = False
        self.monitor = RunMonitor(1 if contrast is None else 2)
        self.progress.visible = True
        self.progress.max = 100
        self.progress.value = 0
        self._progress_timer.start()
        self.explain_button.enabled = False
        self.cancel_button.enabled = True
        self.status.value = "starting..."
        self.worker = create_worker(
            _explain_job, config_path, self._prepared_cache, image, info,
            method=self.method.value, options=self.method_options(), target=target,
            contrast=contrast, layer_maps=bool(self.layer_maps.value),
            device=str(self.device.value), monitor=self.monitor, scan_name=layer.name,
            threshold=float(self.threshold.value), opacity=float(self.opacity.value),
            _connect={"yielded": self._on_progress, "returned": self._on_returned,
                      "errored": self._on_errored, "finished": self._on_finished,
                      "aborted": self._on_aborted},
        )
        return self.worker

    def cancel(self, *_: Any) -> None:
        """Ask the running worker to stop at its next step; no layer is added."""
        if self.worker is not None:
            self._cancel_requested = True
            self.monitor.cancel_event.set()  # the run stops at its next layer or step
            self.status.value = "cancelling..."
            self.worker.quit()

    def _alive(self) -> bool:
        try:
            self.native.objectName()
        except RuntimeError:  # the Qt widget was deleted with its viewer
            return False
        return not getattr(self, "_is_closed", False)

    def _closed(self) -> None:
        self._is_closed = True
        self._cancel_requested = True
        monitor = getattr(self, "monitor", None)
        if monitor is not None:
            monitor.cancel_event.set()
        worker = getattr(self, "worker", None)  # (gone when Python tore the widget down first)
        if worker is not None:
            worker.quit()

    def _on_progress(self, step: tuple) -> None:
        if not self._alive():
            return
        self._poll_progress()

    def _poll_progress(self) -> None:
        """Show the run's real progress (:class:`RunMonitor`, updated by the worker)."""
        monitor = getattr(self, "monitor", None)
        if monitor is None or self.worker is None or not self._alive():
            return
        self.progress.value = round(100 * monitor.fraction)
        if not self._cancel_requested:
            self.status.value = monitor.text

    def _on_aborted(self) -> None:
        if self._alive():
            self.status.value = "cancelled"

    def _on_errored(self, exc: Exception) -> None:
        # An exception the library does not raise for bad input (those come back as
        # ExplainJobResult.error). napari's worker classes mean to relay it to the
        # notification manager, but their mixin is not initialised (napari 0.9), so it
        # would vanish: shown here, once.
        self._notify_unexpected(exc)

    def _on_finished(self) -> None:
        self.worker = None
        if not self._alive():
            return
        self._progress_timer.stop()
        if self._cancel_requested:  # (a worker quit after its last step emits nothing else)
            self.status.value = "cancelled"
        self.progress.visible = False
        self.explain_button.enabled = True
        self.cancel_button.enabled = False

    def _on_returned(self, out: ExplainJobResult) -> None:
        try:
            self._show_returned(out)
        except Exception as exc:  # anything unexpected: a notification, never into Qt
            self._notify_unexpected(exc)

    def _show_returned(self, out: ExplainJobResult) -> None:
        if self._cancel_requested:  # finished before the cancel reached it: drop the result
            if self._alive():
                self.status.value = "cancelled"
            return
        if out.error is not None:
            self._notify_error(out.error)
            return
        from napari.utils.notifications import show_warning

        if out.warning:
            show_warning(out.warning)
        if out.cancelled:
            self.status.value = "cancelled"
            return
        first, second = out.first, out.second
        scan = self._scan_layer
        self._remove_results(scan.name, first.result.method)
        for data, kwargs, kind in out.layers:  # built in the worker: only added here
            name = kwargs["name"]
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
            meta = kwargs["metadata"][METADATA_KEY]
            meta["scan_layer"] = scan.name
            # (fires _on_layers_changed); a segmentation target's region is a Labels layer
            layer = getattr(self.viewer, f"add_{kind}")(data, **kwargs)
            self.result_layers.append(layer)
        self.result = out  # only now: the layers above stand for it
        fused = self._map_layers(("fused",))
        if fused:  # the new map is the one under review (the controls act on it)
            self.viewer.layers.selection.active = fused[0]
        self._show_result(first, second)
        self.side_by_side.enabled = second is not None
        self.side_by_side.value = False
        self._update_contour()
        self.save_button.enabled = True
        self.status.value = (f"done in {first.timing['total']:.1f} s "
                             f"({first.result.method})")
        trust = getattr(self, "_run_trust", None)
        if trust:
            self.prediction.value += f"\nUNTRUSTED MODEL ({trust}): this means nothing"
            show_warning(f"{self.config_path().name}: {trust}; the prediction and the map "
                         "say nothing about the scan.")

    def _remove_results(self, scan_name: str, method: str) -> None:
        """Before a new run: remove the maps of earlier runs of the same method on the same
        scan (a redo). Runs on other scans or with other methods stay, named by their scan,
        so runs can be compared (A/B)."""
        self.side_by_side.value = False
        for lay in list(self.viewer.layers):
            meta = lay.metadata.get(METADATA_KEY) or {}
            if (meta.get("kind") in (*_REVIEW_KINDS, "region")
                    and meta.get("scan_layer") == scan_name and meta.get("method") == method):
                self.viewer.layers.remove(lay)
        self.result_layers = []
        if self.contour is not None and self.contour in self.viewer.layers:
            self.viewer.layers.remove(self.contour)
        self.contour = None

    def _show_result(self, first: Any, second: Any) -> None:
        res = first.result
        labels = first.labels

        def name(i: Any) -> str:
            return labels[i] if i is not None and 0 <= i < len(labels) else f"class {i}"

        pred = res.predicted_class
        probs = res.probabilities or ()
        ptxt = f" (p={probs[pred]:.3f})" if pred is not None and pred < len(probs) else ""
        self.prediction.value = (f"{name(pred)}{ptxt}; explained: {name(res.target_class)}"
                                 f", score {res.score:.3f}")
        self.scores.value = "  ".join(
            f"{name(i)}: {v:.2f}" + (f" (p={probs[i]:.2f})" if i < len(probs) else "")
            for i, v in enumerate(res.logits or ())) or "-"
        if second is not None:
            r2 = second.result
            self.scores.value += (f"\ncontrast {name(r2.target_class)}: "
                                  f"score {r2.score:.3f}")
        self._draw_weights(dict(res.layer_weights))

    # display --------------------------------------------------------------------------
    def _map_layers(self, kinds: tuple = _MAP_KINDS) -> list:
        return [lay for lay in self.result_layers
                if (lay.metadata.get(METADATA_KEY) or {}).get("kind") in kinds]

    def review_layers(self, kinds: tuple = _REVIEW_KINDS) -> list:
        """The map layers the display controls act on: the selected map layers (any map
        this plugin made or opened: earlier runs, reopened audits, saved maps), else the
        current run's."""
        selected = [lay for lay in self.viewer.layers.selection
                    if (lay.metadata.get(METADATA_KEY) or {}).get("kind") in _REVIEW_KINDS]
        chosen = selected or self.result_layers
        return [lay for lay in chosen
                if (lay.metadata.get(METADATA_KEY) or {}).get("kind") in kinds]

    def _apply_display(self, *_: Any) -> None:
        """Threshold (a hard cut in the colormap; limits stay 0-1) and opacity on the maps
        under review (:meth:`review_layers`)."""
        if getattr(self, "_syncing", False):
            return
        thr = float(self.threshold.value)
        cmap = map_colormap(thr)
        for lay in self.review_layers(("fused", "contrast", "layer")):
            lay.colormap = cmap
            lay.metadata[METADATA_KEY]["threshold"] = thr
        for lay in self.review_layers():
            lay.opacity = float(self.opacity.value)

    def _on_selection(self, *_: Any) -> None:
        """The controls show the selected map's own threshold, opacity and contour."""
        active = self.viewer.layers.selection.active
        meta = (getattr(active, "metadata", None) or {}).get(METADATA_KEY) or {}
        if meta.get("kind") not in _REVIEW_KINDS:
            return
        self._syncing = True
        try:
            if isinstance(meta.get("threshold"), float):
                self.threshold.value = meta["threshold"]
            self.opacity.value = float(active.opacity)
        finally:
            self._syncing = False
        of = ((self.contour.metadata.get(METADATA_KEY) or {}).get("of")
              if self.contour is not None else None)
        if self.show_contour.value and of != active.name and not self._in_contour:
            self._update_contour()

    def _update_contour(self, *_: Any) -> None:
        """The iso-contour of the map under review (selected, else the current run's)."""
        if self._in_contour:
            return
        self._in_contour = True
        try:
            self._draw_contour()
        finally:
            self._in_contour = False

    def _draw_contour(self) -> None:
        """Draw the contour: its one Labels layer is updated in place (data, affine, name)
        while it exists; it is created once and removed when switched off."""
        maps = self.review_layers(("fused", "contrast", "layer"))
        alive = self.contour is not None and self.contour in self.viewer.layers
        if not (self.show_contour.value and maps):
            if alive:
                self.viewer.layers.remove(self.contour)
            self.contour = None
            return
        lay = maps[0]
        selection = list(self.viewer.layers.selection)
        data, kwargs, _ = contour_layer(lay.data, float(self.contour_level.value),
                                        name=f"{lay.name} contour {self.contour_level.value:.2f}",
                                        affine=lay.affine.affine_matrix,
                                        metadata={"of": lay.name})
        if alive and self.contour.data.shape == data.shape:
            self.contour.affine = kwargs["affine"]
            self.contour.data = data
            self.contour.name = kwargs["name"]
            self.contour.metadata[METADATA_KEY] = kwargs["metadata"][METADATA_KEY]
        else:
            if alive:
                self.viewer.layers.remove(self.contour)
            self.contour = self.viewer.add_labels(data, **kwargs)
            self.contour.contour = 1
        self.viewer.layers.selection = set(selection) or {lay}  # keep reviewing that map
        self._contour_in_2d_only()

    def _contour_in_2d_only(self, *_: Any) -> None:
        """A contour is a 2D outline: napari draws a Labels contour as solid blobs in 3D,
        so it is hidden while the view is 3D and shown again in 2D."""
        if self.contour is not None and self.contour in self.viewer.layers:
            self.contour.visible = self.viewer.dims.ndisplay == 2

    def _update_side_by_side(self, *_: Any) -> None:
        """Grid view: (scan + target map) beside (scan + contrast map); off restores."""
        # napari >= 0.9 keeps the grid on viewer.canvas (viewer.grid is deprecated)
        grid = self.viewer.canvas.grid if hasattr(self.viewer, "canvas") else self.viewer.grid
        if self.scan_copy is not None and self.scan_copy in self.viewer.layers:
            self.viewer.layers.remove(self.scan_copy)
        self.scan_copy = None
        fused, contrast = self._map_layers(("fused",)), self._map_layers(("contrast",))
        scan = getattr(self, "_scan_layer", None)
        for lay in (*fused, *contrast):
            lay.name_overlay.visible = False
        if not (self.side_by_side.value and fused and contrast and scan in self.viewer.layers):
            grid.enabled = False
            for lay in contrast:
                lay.visible = False
            return
        if self.compare_mode.value != COMPARE_OFF:
            self.compare_mode.value = COMPARE_OFF  # one grid at a time
        self.show_contour.value = False  # one overlay per panel
        copy = self.viewer.add_image(
            scan.data, name=f"{scan.name} (beside)", affine=scan.affine.affine_matrix,
            axis_labels=AXIS_LABELS, units=UNITS, colormap=scan.colormap,
            contrast_limits=scan.contrast_limits,
            metadata={METADATA_KEY: {"kind": "scan_copy", "of": scan.name}})
        self.scan_copy = copy
        contrast[0].visible = True
        layers = self.viewer.layers
        order = [layers.index(x) for x in (scan, fused[0], copy, contrast[0])]
        layers.move_multiple(order, 0)
        grid.stride = 2
        grid.shape = (-1, -1)
        grid.spacing = 0.05
        grid.enabled = True
        for lay in (fused[0], contrast[0]):  # each panel says which class it shows
            lay.name_overlay.visible = True
        self.viewer.reset_view()  # fit both panels: nothing cropped

    # compare --------------------------------------------------------------------------
    def _compare_choices(self, _w: Any = None) -> list:
        return [(lay.name, lay) for lay in self.viewer.layers
                if (lay.metadata.get(METADATA_KEY) or {}).get("kind") in _MAP_KINDS]

    def _refresh_compare_choices(self) -> None:
        """New map layers: offer them; a case opened with its second class's map (a
        reopened misclassification) comes ready to compare: A its predicted class's map,
        B its expected (or runner-up) class's map."""
        self._comparing = True
        try:
            a, b = self.compare_a.value, self.compare_b.value
            self.compare_a.reset_choices()
            self.compare_b.reset_choices()
            gone = [x for x in (a, b) if x is not None and x not in self.viewer.layers]
            if gone and self.compare_mode.value != COMPARE_OFF:
                self.compare_mode.value = COMPARE_OFF
                self._end_compare()
            if self.compare_a.value is None or self.compare_b.value is None or gone:
                pair = self._case_pair()
                if pair is not None:
                    self.compare_a.value, self.compare_b.value = pair
            self.compare_info.value = self._weights_text()
        finally:
            self._comparing = False

    def _case_pair(self) -> tuple | None:
        """The latest map layer with a second class's map from the same record."""
        maps = [lay for lay in self.viewer.layers
                if (lay.metadata.get(METADATA_KEY) or {}).get("kind") in _MAP_KINDS]
        for second in reversed(maps):
            meta = second.metadata[METADATA_KEY]
            if meta.get("kind") != "contrast" or not meta.get("record_path"):
                continue
            first = next((m for m in maps if m.metadata[METADATA_KEY].get("kind") == "fused"
                          and m.metadata[METADATA_KEY].get("record_path")
                          == meta["record_path"]), None)
            if first is not None:
                return first, second
        return None

    @staticmethod
    def layer_weights_of(layer: Any) -> dict:
        """A map layer's per-layer weights: from its run's summary or its audit record."""
        meta = (getattr(layer, "metadata", None) or {}).get(METADATA_KEY) or {}
        weights = meta.get("layer_weights")
        if not weights:
            weights = ((meta.get("summary") or {}).get("result") or {}).get("layer_weights")
        return dict(weights or {})

    def _weights_text(self) -> str:
        lines = []
        for tag, lay in (("A", self.compare_a.value), ("B", self.compare_b.value)):
            if lay is None:
                continue
            w = self.layer_weights_of(lay)
            text = ", ".join(f"{k} {v:.2f}" for k, v in w.items()) if w else "not recorded"
            lines.append(f"{tag} ({lay.name}): {text}")
        return "\n".join(lines) or "-"

    def _scan_for(self, map_layer: Any) -> Any:
        """The scan a map lies on: its run's scan layer, else a scan layer of the same grid."""
        import napari

        meta = map_layer.metadata.get(METADATA_KEY) or {}
        name = meta.get("scan_layer")
        if name is not None and name in self.viewer.layers:
            return self.viewer.layers[name]
        aff = map_layer.affine.affine_matrix
        for lay in self.viewer.layers:
            kind = (lay.metadata.get(METADATA_KEY) or {}).get("kind", "scan")
            if (isinstance(lay, napari.layers.Image) and kind == "scan"
                    and lay.data.shape == map_layer.data.shape
                    and np.allclose(lay.affine.affine_matrix, aff, atol=1e-3)):
                return lay
        return None

    def _end_compare(self) -> None:
        """Undo what compare did: its layers removed, the grid off, hidden layers shown."""
        for lay in self.compare_layers:
            if lay in self.viewer.layers:
                self.viewer.layers.remove(lay)
        self.compare_layers = []
        for lay in self._compare_shown:
            if lay in self.viewer.layers:
                lay.name_overlay.visible = False
        self._compare_shown = []
        if getattr(self, "_compare_grid", False):
            self._grid().enabled = False
            self._compare_grid = False
        for lay in self._compare_hidden:
            if lay in self.viewer.layers:
                lay.visible = True
        self._compare_hidden = []

    def _grid(self) -> Any:
        # napari >= 0.9 keeps the grid on viewer.canvas (viewer.grid is deprecated)
        return self.viewer.canvas.grid if hasattr(self.viewer, "canvas") else self.viewer.grid

    def _update_compare(self, *_: Any) -> None:
        if self._comparing:
            return
        self._comparing = True
        try:
            self._end_compare()
            self.compare_info.value = self._weights_text()
            mode = self.compare_mode.value
            if mode == COMPARE_OFF:
                return
            a, b = self.compare_a.value, self.compare_b.value
            if a is None or b is None or a is b:
                self.compare_mode.value = COMPARE_OFF
                self._notify_error("compare: choose two different maps as map A and map B.")
                return
            if self.side_by_side.value:
                self.side_by_side.value = False
            if mode == COMPARE_DIFF:
                self._show_difference(a, b)
            else:
                self._show_grid(a, b)
        except Exception as exc:  # anything unexpected: a notification, never into Qt
            self._notify_unexpected(exc)
        finally:
            self._comparing = False

    def _show_difference(self, a: Any, b: Any) -> None:
        try:
            data, kwargs, _ = difference_layer(
                a, b, name=f"{a.name} minus {b.name}",
                metadata={"of": a.name, "minus": b.name, "compare": True},
                opacity=float(self.opacity.value))
        except ValueError as exc:
            self.compare_mode.value = COMPARE_OFF
            self._notify_error(f"compare: {exc}")
            return
        diff = self.viewer.add_image(data, **kwargs)
        self.compare_layers.append(diff)
        self.viewer.layers.selection.active = diff

    def _show_grid(self, a: Any, b: Any) -> None:
        """(scan A + map A) beside (scan B + map B) in napari's grid: one camera and one
        slice position for both panels, so the cursors are linked; each panel is named by
        its map's name overlay; the other visible layers are hidden until compare ends."""
        scan_a, scan_b = self._scan_for(a), self._scan_for(b)
        if scan_a is not None and scan_b is not None:
            if scan_b is scan_a:  # one layer cannot sit in two panels: a view of its data
                scan_b = self.viewer.add_image(
                    scan_a.data, name=f"{scan_a.name} (beside)",
                    affine=scan_a.affine.affine_matrix, axis_labels=AXIS_LABELS, units=UNITS,
                    colormap=scan_a.colormap, contrast_limits=scan_a.contrast_limits,
                    metadata={METADATA_KEY: {"kind": "scan_copy", "of": scan_a.name}})
                self.compare_layers.append(scan_b)
            panels, stride = [scan_a, a, scan_b, b], 2
        else:
            panels, stride = [a, b], 1
        for lay in self.viewer.layers:
            if lay.visible and not any(lay is x for x in panels):
                lay.visible = False
                self._compare_hidden.append(lay)
        for lay in panels:
            lay.visible = True
        layers = self.viewer.layers
        layers.move_multiple([layers.index(x) for x in panels], 0)
        grid = self._grid()
        grid.stride = stride
        grid.shape = (-1, -1)
        grid.spacing = 0.05
        grid.enabled = True
        self._compare_grid = True
        for lay in (a, b):
            lay.name_overlay.visible = True
        self._compare_shown = [a, b]
        self.viewer.reset_view()  # fit both panels: nothing cropped

    # audit ----------------------------------------------------------------------------
    def audit_target(self) -> Path:
        """Where Save audit writes: the chosen folder, or a new folder beside the scan
        (``<scan>_icam``, or ``<scan>_icam-2``... when earlier audits are there)."""
        chosen = str(self.audit_folder.value or "").strip()
        if chosen and chosen != ".":
            return Path(chosen)
        info = self.result.first.scan_info
        if info.format == "array":
            raise ValueError(
                f"layer '{info.path}' was not opened from a file, so there is no scan to save "
                "the audit beside; choose an 'audit folder'.")
        return new_audit_folder_for(info.path)

    def _refuse_save(self, exc: BaseException, folder: Any) -> None:
        """The reason first (a toast cuts long messages), the full message in the dock."""
        if isinstance(exc, FileExistsError):
            reason = "files of an earlier audit are in the way"
        elif isinstance(exc, PermissionError):
            reason = "no permission to write there"
        elif isinstance(exc, OSError):
            reason = f"the folder cannot be written ({exc.strerror or type(exc).__name__})"
        else:
            reason = "refused"
        where = f" in {folder}" if folder is not None else ""
        message = (f"Save audit: {reason}. {exc} Choose an empty 'audit folder' (or leave it "
                   "empty for a new folder beside the scan)"
                   if isinstance(exc, OSError) else f"Save audit: {exc}")
        self.status.value = f"not saved{where}: {exc}"
        from napari.utils.notifications import show_error

        show_error(message)

    def save_audit(self, *_: Any) -> list:
        """Write map(s), record(s) and ledger entries with the CLI's writer; returns the files.

        With the default (empty) 'audit folder', each run goes to a new folder beside the
        scan; the same run is saved once (a second press says where it is).
        """
        from napari.utils.notifications import show_info

        from icam_med.explain import write_explanation

        if self.worker is not None:
            self._notify_error("an explanation is running: wait for it (or cancel it) first.")
            return []
        if self.result is None or not self.result.ok:
            self._notify_error("nothing to save: press Explain first (the last run failed, was "
                               "cancelled, or its map layers were removed).")
            return []
        saved = getattr(self, "_saved_folder", None)
        if saved is not None:
            self._notify_error(f"this run is already saved in {saved}; press Explain for a new "
                               "run to save another audit.")
            return []
        folder = None
        try:
            folder = self.audit_target()
            first, second = self.result.first, self.result.second
            written = write_explanation(first, folder)
            if second is not None:
                c = second.result.target_class
                written += write_explanation(second, folder, stem=class_stem(c))
        except _USER_ERRORS as exc:
            self._refuse_save(exc, folder)
            return []
        except Exception as exc:  # anything unexpected: a notification, never into Qt
            self._notify_unexpected(exc)
            return []
        self._saved_folder = folder
        # each sealed record read once, then shared by the layers it stands for
        records = {w.path.name: (w.path, json.loads(w.path.read_text(encoding="utf-8")))
                   for w in written if w.role == "audit_record"}
        for lay in self.result_layers:
            meta = lay.metadata.get(METADATA_KEY) or {}
            stem = (MAP_STEM if meta.get("kind") in ("fused", "layer", "difference", "region")
                    else class_stem(meta.get("target_class")))
            found = records.get(record_path_for(map_path(folder, stem)).name)
            if found is not None:
                meta["record_path"], meta["record"] = str(found[0]), found[1]
        self.status.value = f"saved audit to {folder}"
        show_info(f"audit saved: {len(written)} files in {folder}")
        return written

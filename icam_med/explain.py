"""Where I/O, model, engine and audit meet: explain one scan.

Three steps, so callers can reuse the expensive parts:

* :func:`prepare` - load the model and build the preprocessing once (reuse over many scans);
* :func:`explain_volume` - in memory: preprocess a loaded scan, run the CAM engine, carry
  the map(s) back onto the scan's own grid; returns an :class:`Explanation` (used by the
  batch runner and the napari widget);
* :func:`write_explanation` - write the NIfTI map (+ DICOM Parametric Map for DICOM input,
  + layer maps on request) and a JSON summary, atomically and without overwriting, then
  seal them with an audit record and a ledger entry. It is two steps a batch splits over
  processes: :func:`write_outputs` (a worker writes the files into the scan's folder) and
  :func:`seal_outputs` (the coordinator re-hashes them, writes the record, appends the
  ledger).

:func:`explain_scan` does all three for one scan path (the ``icam-med explain`` command).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from icam_med._version import __version__
from icam_med.audit.hashing import sha256_file
from icam_med.audit.ledger import FolderLock
from icam_med.audit.signing import check_key_outside, load_signing_key, sign_head
from icam_med.audit.trail import (
    AuditContext,
    Provenance,
    audit_root,
    check_before_writing,
    provenance,
    record_explanation,
)
from icam_med.cam.summary import CAMSummary, MapStatistics, map_statistics
from icam_med.config import ICAMConfig, ParametricMapConfig, RegionConfig, load_config
from icam_med.io.loading import ScanInfo, load_volume
from icam_med.io.preprocessing import Preprocessor
from icam_med.io.radiograph import is_radiograph
from icam_med.io.validation import GeometryOptions
from icam_med.io.writers import quantise_map_
from icam_med.memory import release_freed_memory
from icam_med.models import ModelInfo, check_input_contract, load_model
from icam_med.paths import MAP_STEM, is_nifti, output_paths

__all__ = [
    "SUMMARY_SCHEMA_VERSION",
    "Explanation",
    "Prepared",
    "WrittenFile",
    "explain_scan",
    "explain_volume",
    "output_paths",
    "prepare",
    "seal_outputs",
    "write_explanation",
    "write_outputs",
]

log = logging.getLogger(__name__)

SUMMARY_SCHEMA_VERSION = 1


@dataclass
class Prepared:
    """A loaded model, its preprocessing and its default CAM, reusable over many scans."""

    config: ICAMConfig
    model: torch.nn.Module
    model_info: ModelInfo
    preprocessor: Preprocessor
    device: torch.device
    _cams: dict[str, Any] = field(default_factory=dict, repr=False)

    def cam(self, method: str | None = None, options: Mapping[str, Any] | None = None) -> Any:
        """The CAM object for ``method`` (default: the config's) with the config's options
        overridden by ``options``; built once per distinct (method, options)."""
        from icam_med.cam import make_cam

        name = method or self.config.method.name
        opts = dict(self.config.method.options) if name == self.config.method.name else {}
        opts.update(options or {})
        key = json.dumps([name, opts], sort_keys=True, default=str)
        if key not in self._cams:
            self._cams[key] = make_cam(name, self.model, **opts)
        return self._cams[key]


def prepare(config: ICAMConfig | str | Path, device: str | torch.device = "cpu") -> Prepared:
    """Load the configured model (hash-checked) and build its preprocessing.

    Args:
        config: an :class:`~icam_med.config.ICAMConfig` or a path to a YAML config.
        device: where the model runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).

    Raises:
        FileNotFoundError, ValueError: bad config, weights or preprocessing (named).
    """
    cfg = config if isinstance(config, ICAMConfig) else load_config(config)
    dev = torch.device(device)
    where = f"config {cfg.path}" if cfg.path else "config"
    GeometryOptions.from_mapping(cfg.geometry)  # refuse unknown geometry options up front
    region = cfg.target.region if cfg.target is not None else None
    if region is not None and region.mask is not None and not Path(region.mask).exists():
        raise FileNotFoundError(
            f"{where}: target.region.mask {region.mask} does not exist; give a mask file "
            "(NIfTI or DICOM) on the scan's grid, relative to the config's folder.")
    preprocessor = Preprocessor(cfg.preprocessing, source=where)
    model, info = load_model(cfg.model, dev)
    prepared = Prepared(cfg, model, info, preprocessor, dev)
    prepared.cam()  # validate the method and its options now, before any scan is read
    return prepared


@dataclass
class Explanation:
    """An explanation of one scan, in memory.

    Attributes:
        fused: the fused map on the scan's grid, a float32 MetaTensor ``(1, X, Y, Z)`` in
            [0, 1] with exactly the scan's affine.
        layer_maps: layer name -> map on the scan's grid (only when requested).
        scan_info: the scan's :class:`~icam_med.io.ScanInfo`.
        result: the engine's :class:`~icam_med.cam.summary.CAMSummary` (method, options,
            target/predicted class, scores, logits, probabilities, per-layer weights and
            relevance).
        preprocessing: each preprocessing transform with its parameters.
        model_info: identity of the model (architecture, weights hash...).
        timing: seconds spent in ``preprocess``, ``cam``, ``invert`` and ``total``.
        labels: class labels from the config (may be empty).
        config_path: the config file, if any.
        cam_result: the engine's :class:`~icam_med.cam.CAMResult` on the CPU (maps at the
            model's input / layer resolution), for viewers that want them.
        preprocessed: the preprocessed image (model input grid), a MetaTensor.
        provenance: what the audit record needs (voxel hash, start time, device); ``None``
            for an explanation built by hand, which cannot be audited.
        map_range: the fused map's ``(min, max)``, kept when the map itself was dropped
            (a batch worker wrote it and sends the rest back to be sealed).
        target_region: for a segmentation target, the region explained on the scan's grid
            (a uint8 MetaTensor ``(1, X, Y, Z)``, 1 inside), written as
            ``cam_region.nii.gz``; ``None`` otherwise.
        region_info: what the record says of that region (see :func:`region_summary`).
        sliding_window: the sliding-window settings and window counts, when the model runs
            by sliding window; ``None`` otherwise.
        parametric_map: how the DICOM Parametric Map is encoded when written (the config's
            ``outputs.parametric_map``; the writer's defaults for one built by hand).
    """

    fused: Any
    layer_maps: dict[str, Any]
    scan_info: ScanInfo
    result: CAMSummary
    preprocessing: list[dict[str, Any]]
    model_info: ModelInfo
    timing: dict[str, float]
    labels: tuple[str, ...] = ()
    config_path: Path | None = None
    cam_result: Any = field(default=None, repr=False)
    preprocessed: Any = field(default=None, repr=False)
    provenance: Provenance | None = field(default=None, repr=False)
    map_range: tuple[float, float] | None = None
    target_region: Any = field(default=None, repr=False)
    region_info: dict[str, Any] | None = None
    sliding_window: dict[str, Any] | None = None
    parametric_map: ParametricMapConfig = field(default_factory=ParametricMapConfig)
    _statistics: MapStatistics | None = field(default=None, init=False, repr=False,
                                              compare=False)

    def value_range(self) -> tuple[float, float]:
        """The fused map's ``(min, max)`` (from the map, or :attr:`map_range` once dropped).

        Raises:
            ValueError: neither the map nor its range is held.
        """
        if self.fused is not None:  # numpy: no copy of an x-fastest map (torch made one)
            a = self.fused.detach().cpu().numpy()
            return float(a.min()), float(a.max())
        if self.map_range is None:
            raise ValueError("this explanation holds neither its fused map nor its range.")
        return self.map_range

    def drop_maps(self) -> None:
        """Free the maps once written, keeping what the record needs (their range)."""
        self.map_range = self.value_range()
        self.fused, self.layer_maps = None, {}
        self.cam_result = self.preprocessed = self.target_region = None

    @property
    def target_label(self) -> str | None:
        return self.result.label(self.labels, self.result.target_class)

    @property
    def predicted_label(self) -> str | None:
        return self.result.label(self.labels, self.result.predicted_class)

    def map_statistics(self) -> MapStatistics:
        """Peak (voxel index and RAS world mm), range, mean and centroid of the fused map
        (:func:`icam_med.cam.summary.map_statistics`), computed once: the summary, the
        batch's analysis and the CLI's report read the same figures."""
        if self._statistics is None:
            self._statistics = map_statistics(self.fused, self.scan_info.affine)
        return self._statistics

    def to_dict(self) -> dict[str, Any]:
        """The JSON summary (no patient identifiers, no raw UIDs or paths)."""
        result = self.result.to_dict()
        result["target_label"] = self.target_label
        result["predicted_label"] = self.predicted_label
        if self.region_info is not None:
            result["target_region"] = dict(self.region_info)
        if self.sliding_window is not None:
            result["sliding_window"] = dict(self.sliding_window)
        return {
            "schema_version": SUMMARY_SCHEMA_VERSION,
            "tool": {"name": "icam-med", "version": __version__},
            "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
            "scan": self.scan_info.to_dict(),
            "model": self.model_info.to_dict(),
            "config_sha256": (sha256_file(self.config_path)
                              if self.config_path and Path(self.config_path).is_file() else None),
            "preprocessing": self.preprocessing,
            "result": result,
            "map": self.map_statistics().summary_dict(),
            "layer_maps_on_scan_grid": sorted(self.layer_maps),
            "timing_s": {k: round(v, 4) for k, v in self.timing.items()},
        }


def _resolve_targets(targets: Any, labels: Sequence[str]) -> Any:
    """Let users name a class by its label (``"present"``) as well as by its index."""
    if isinstance(targets, str):
        if targets.lstrip("-").isdigit():
            return int(targets)
        if targets in labels:
            return list(labels).index(targets)
        raise ValueError(
            f"target '{targets}' is not a class label of this model; labels are {list(labels)} "
            "(or give a class index)."
        )
    return targets


def explain_volume(
    image: Any,
    scan_info: ScanInfo,
    prepared: Prepared,
    *,
    method: str | None = None,
    method_options: Mapping[str, Any] | None = None,
    targets: Any = None,
    region: Any = None,
    layer_maps: bool = False,
) -> Explanation:
    """Explain one loaded scan, in memory.

    Args:
        image: the MetaTensor from :func:`icam_med.io.load_volume`, or a one-item list
            holding it: the list is emptied (handed over), so that when the caller keeps
            no other reference the volume is freed once its first preprocessed copy exists.
        scan_info: its :class:`~icam_med.io.ScanInfo`.
        prepared: from :func:`prepare`.
        method: CAM method (default: the config's); ``method_options`` override options.
        targets: ``None`` (the config's ``target.label``, else a classifier's predicted
            class), a class index or label (for a segmentation network: the output
            channel), or a callable.
        region: for a segmentation network, the region whose output is summed (default:
            the config's ``target.region``, else the predicted region of the target label):
            a :class:`~icam_med.config.RegionConfig`, ``"predicted"``,
            ``"predicted:LABEL"``, a mask file on the scan's grid, or a mask tensor
            ``(1, X, Y, Z)`` on the scan's grid. The mask is brought to the model's grid by
            the spatial steps of the same MONAI preprocessing as the image.
        layer_maps: also carry each layer's map back onto the scan's grid.

    Returns:
        The :class:`Explanation`; the fused map has the scan's shape and affine exactly.

    Raises:
        ValueError: the preprocessed image does not fit the model, the preprocessing
            cannot be inverted, a target or region does not fit the model or the scan
            (a segmentation network without a target label, a region for a classifier, a
            mask off the scan's grid, an empty region).
    """
    loaded = image if isinstance(image, list) else [image]
    del image  # held by the list only: freed once preprocessed, if the caller holds none
    return _explain_loaded(loaded, scan_info, prepared, method=method,
                           method_options=method_options, targets=targets, region=region,
                           layer_maps=layer_maps)


def _explain_loaded(loaded: list[Any], scan_info: ScanInfo, prepared: Prepared, *,
                    method: str | None, method_options: Mapping[str, Any] | None,
                    targets: Any, region: Any, layer_maps: bool) -> Explanation:
    """:func:`explain_volume` of the image in ``loaded`` (a one-item list, emptied here): the
    list is handed on to the preprocessing, which frees the volume once its first copy exists,
    before the engine runs (:func:`explain_scan` keeps no other reference: 157 MB for a
    512x512x300 int16 CT)."""
    if len(loaded) != 1:
        raise ValueError(f"explain_volume expects one image in the list, got {len(loaded)}.")
    image = loaded[0]
    prov = provenance(image, device=prepared.device, audit_config=prepared.config.audit,
                      config_path=prepared.config.path)  # for the audit record
    cfg_target = prepared.config.target
    if targets is None and cfg_target is not None:
        targets = cfg_target.label
    if region is None and cfg_target is not None:
        region = cfg_target.region
    spec, mask = _region_spec(region, scan_info, prepared)
    sliding = prepared.config.sliding_window
    if sliding is not None and layer_maps:
        raise ValueError("layer maps are not available with sliding-window inference (one map "
                         "per window and layer); leave out --layer-maps.")
    t0 = time.perf_counter()
    pre = prepared.preprocessor
    if mask is None:  # the preprocessing frees the volume once its first copy exists
        del image
        x = pre(loaded)
        region_model = None
    else:  # the mask follows the image through the same steps: keep it until then
        loaded.clear()
        x = pre(image)
        region_model = _region_on_model_grid(pre, image, mask)
        del image
    release_freed_memory()  # the full-size volume and its copies, before the engine's peak
    labels = prepared.model_info.labels
    cam = prepared.cam(method, method_options)
    dtype = getattr(torch, prepared.model_info.dtype, torch.float32)
    if sliding is not None:
        return _explain_sliding(scan_info, prepared, x, cam, targets, spec, mask,
                                region_model, prov, t0)
    check_input_contract(prepared.model_info, tuple(x.shape), source=str(scan_info.path))
    t1 = time.perf_counter()
    batch = x.as_tensor().unsqueeze(0).to(device=prepared.device, dtype=dtype)
    segmentation = _is_segmentation(cam, tuple(x.shape[1:]), batch)
    k = region_k = None
    if segmentation:
        k = _segmentation_label(targets, labels, spec)
        region_k = _label_index(spec.label, labels) if spec.label is not None else k
        from icam_med.cam import SegmentationTarget

        target: Any = (SegmentationTarget(k, region_model.to(prepared.device))
                       if region_model is not None else SegmentationTarget(k))
        if region_model is None and region_k != k:
            target = _PredictedRegionTarget(k, region_k)
    else:
        if region is not None:
            raise ValueError(
                f"a target region ({_describe_region(spec)}) applies to segmentation networks, "
                f"but model '{prepared.model_info.name}' is a classifier (its output is one "
                "score per class): remove the region (target.region / --region).")
        target = _resolve_targets(targets, labels)
    result = cam(batch, targets=target).cpu()
    del batch
    release_freed_memory()  # the engine's activations and gradients
    t2 = time.perf_counter()
    summary = CAMSummary.from_result(result)
    target_region = region_info = None
    if segmentation:
        summary = replace(summary, target_class=k)
        if region_model is None:
            region_model = (result.logits[0].argmax(0) == region_k).float()[None]
        _check_region_not_empty(region_model, spec, labels, region_k)
        target_region, region_info = _region_on_scan(
            spec, mask, region_model, pre, x, scan_info, k, region_k, labels)
    fused = _on_scan_grid(pre, result.fused[0], x, scan_info)
    back_layers = {}
    if layer_maps:
        size = tuple(x.shape[1:])
        for name, m in result.layer_maps.items():
            mode = "trilinear" if m.ndim == 5 else "bilinear"
            up = torch.nn.functional.interpolate(m.float(), size=size, mode=mode,
                                                 align_corners=False)[0]
            back_layers[name] = _on_scan_grid(pre, up, x, scan_info)
    t3 = time.perf_counter()
    return Explanation(
        fused=fused,
        layer_maps=back_layers,
        scan_info=scan_info,
        result=summary,
        preprocessing=pre.describe(),
        model_info=prepared.model_info,
        timing={"preprocess": t1 - t0, "cam": t2 - t1, "invert": t3 - t2, "total": t3 - t0},
        labels=tuple(labels),
        config_path=prepared.config.path,
        cam_result=result,
        preprocessed=x,
        provenance=prov,
        target_region=target_region,
        region_info=region_info,
        parametric_map=prepared.config.parametric_map,
    )


def _on_scan_grid(pre: Preprocessor, cam_map: torch.Tensor, x: Any,
                  scan_info: ScanInfo) -> Any:
    """A map on the model's grid carried back onto the scan's grid and quantised to the
    values every output holds (:func:`~icam_med.io.writers.quantise_map_`)."""
    return quantise_map_(pre.invert(cam_map, x, source_shape=scan_info.shape,
                                    source_affine=scan_info.affine))


# ---------------------------------------------------------------------------------------
# Segmentation targets and regions
# ---------------------------------------------------------------------------------------

class _PredictedRegionTarget:
    """Output channel ``k`` summed over the voxels predicted as ``region_k`` (argmax)."""

    def __init__(self, k: int, region_k: int) -> None:
        self.k, self.region_k = k, region_k

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        from icam_med.cam import SegmentationTarget

        if output.ndim >= 3 and 0 <= self.region_k < output.shape[1]:
            mask = (output.detach().argmax(1) == self.region_k).to(output.dtype)
            return SegmentationTarget(self.k, mask)(output)
        return SegmentationTarget(self.region_k)(output)  # raises the clear error


def _label_index(label: Any, labels: Sequence[str]) -> int:
    """A label name or index (int or digit string) as a channel index."""
    if isinstance(label, bool):
        raise ValueError(f"label {label!r}: expected a label or a channel index.")
    if isinstance(label, int):
        return label
    index = _resolve_targets(str(label), labels)
    if not isinstance(index, int):  # pragma: no cover - _resolve_targets returns int for str
        raise ValueError(f"label {label!r}: expected a label or a channel index.")
    return index


def _segmentation_label(targets: Any, labels: Sequence[str], spec: RegionConfig) -> int:
    if targets is None:
        raise ValueError(
            "this model is a segmentation network (its output is a map per label), so there "
            "is no single predicted class to explain: name the label to explain with "
            "--target LABEL (or 'target: {label: LABEL}' in the config) and optionally its "
            "region with --region predicted|predicted:LABEL|MASK_FILE (default: the voxels "
            f"predicted as that label){'; labels are ' + str(list(labels)) if labels else ''}.")
    if callable(targets) and not isinstance(targets, str):
        raise ValueError("a callable target cannot be combined with the CLI/config segmentation "
                         "target; pass a SegmentationTarget to the engine directly.")
    return _label_index(targets, labels)


def _is_segmentation(cam: Any, spatial: tuple[int, ...], example: torch.Tensor) -> bool:
    """Whether the model's output is a map (N, K, *spatial) rather than class scores, from
    the engine's probe of this input size (one forward per input size, cached: the
    explanation reuses it)."""
    output_shape = getattr(cam, "output_shape", None)
    if callable(output_shape):
        return len(output_shape(spatial)) > 1
    with torch.no_grad():  # a method without the engine's probe (input-gradient wrappers)
        out = cam.model(example[:1])
    return isinstance(out, torch.Tensor) and out.ndim > 2


def _region_spec(region: Any, scan_info: ScanInfo,
                 prepared: Prepared) -> tuple[RegionConfig, Any]:
    """The region as a :class:`RegionConfig` and, for a mask, the mask on the scan's grid
    (a float MetaTensor ``(1, X, Y, Z)``, 1 inside), checked before any model runs."""
    from monai.data import MetaTensor

    if region is None:
        return RegionConfig("predicted"), None
    if isinstance(region, RegionConfig):
        spec = region
    elif isinstance(region, torch.Tensor):
        spec = RegionConfig("mask")
        mask = region if region.ndim == len(scan_info.shape) + 1 else region[None]
        if tuple(mask.shape[1:]) != tuple(scan_info.shape):
            raise ValueError(f"the region mask has shape {tuple(mask.shape[1:])}, the scan "
                             f"{tuple(scan_info.shape)}: give a mask on the scan's grid.")
        if isinstance(mask, MetaTensor):
            _check_mask_grid(mask.affine, "the region mask", scan_info)
        return spec, MetaTensor((mask != 0).float(), affine=torch.as_tensor(scan_info.affine))
    elif isinstance(region, str | Path):
        spec = RegionConfig.parse(region)
    else:
        raise ValueError(f"region {region!r}: expected 'predicted', 'predicted:LABEL', a mask "
                         "file on the scan's grid or a mask tensor.")
    if spec.kind == "masks":  # a per-scan mask pattern: this scan's own (icam_med.batch too)
        spec = RegionConfig("mask", mask=spec.mask_for(scan_info.path))
    if spec.kind == "predicted":
        return spec, None
    path = Path(spec.mask) if spec.mask is not None else None
    if path is None or not path.exists():
        raise FileNotFoundError(
            f"region mask {path} does not exist; give a mask file (NIfTI or DICOM) on the "
            "scan's grid (config: relative to the config's folder).")
    mask, info = load_volume(path, geometry=prepared.config.geometry)
    if tuple(info.shape) != tuple(scan_info.shape):
        raise ValueError(
            f"region mask {path} has shape {list(info.shape)}, the scan "
            f"{list(scan_info.shape)}: the mask must lie on the scan's grid (same shape and "
            "affine); resample it onto the scan first.")
    _check_mask_grid(info.affine, f"region mask {path}", scan_info)
    inside = (mask.as_tensor() != 0).float()
    meta = {k: v for k, v in mask.meta.items() if k != "affine"}
    return spec, MetaTensor(inside, affine=torch.as_tensor(scan_info.affine), meta=meta)


def _check_mask_grid(affine: Any, what: str, scan_info: ScanInfo) -> None:
    import numpy as np

    a = np.asarray(torch.as_tensor(affine).cpu(), dtype=float)
    b = np.asarray(torch.as_tensor(scan_info.affine).cpu(), dtype=float)
    if not np.allclose(a, b, atol=1e-3):
        raise ValueError(
            f"{what} is not on the scan's grid: its affine {a.round(3).tolist()} differs from "
            f"the scan's {b.round(3).tolist()}; resample the mask onto the scan first.")


def _region_on_model_grid(pre: Preprocessor, image: Any, mask: Any) -> torch.Tensor:
    """The mask carried to the model's grid by the spatial (invertible) steps of the
    image's own preprocessing, applied to image and mask together (so a data-dependent crop
    such as ``CropForegroundd`` crops both alike); intensity steps touch the image only.
    Interpolated like the image, so the result is a weight in [0, 1] per model voxel."""
    from monai.data import MetaTensor
    from monai.transforms import InvertibleTransform

    from icam_med.io.preprocessing import build_preprocessing

    steps = []
    for step, t in zip(pre.steps, pre.compose.transforms, strict=True):
        step = dict(step)
        keys = list(step.get("keys", ["image"]))
        if isinstance(keys, str):
            keys = [keys]
        if isinstance(t, InvertibleTransform) and "image" in keys:
            keys = [*keys, "region"]
        step["keys"] = keys
        steps.append(step)
    compose = build_preprocessing(steps, source="target region")

    def run(data: dict[str, Any]) -> dict[str, Any]:  # the mask takes the image's grid
        img = data["image"]
        m = mask.as_tensor()
        m = m[..., 0] if img.ndim == m.ndim - 1 else m  # a radiograph runs in 2-D
        meta = {k: v for k, v in img.meta.items() if k != "affine"}
        region = MetaTensor(m.to(img.dtype), affine=img.affine.clone(), meta=meta)
        return {"image": compose({"image": img, "region": region})["region"]}

    from icam_med.io import radiograph

    try:
        out = (radiograph.preprocess_2d(run, image) if radiograph.is_2d_image(image)
               else run({"image": image})["image"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"the region mask could not be brought to the model's grid by the "
                         f"preprocessing {[s['name'] for s in pre.steps]}: {exc}") from exc
    return torch.as_tensor(out).float().clamp(0.0, 1.0)


def _describe_region(spec: RegionConfig) -> str:
    if spec.kind == "mask":
        return f"mask {spec.mask.name if spec.mask is not None else '(tensor)'}"
    return "predicted" + (f":{spec.label}" if spec.label is not None else "")


def _check_region_not_empty(region_model: torch.Tensor, spec: RegionConfig,
                            labels: Sequence[str], region_k: int) -> None:
    if bool((region_model > 0).any()):
        return
    if spec.kind == "mask":
        raise ValueError(f"the region ({_describe_region(spec)}) covers no voxel of the "
                         "model's field of view after preprocessing; nothing to explain.")
    name = labels[region_k] if 0 <= region_k < len(labels) else region_k
    raise ValueError(
        f"the model predicts no voxel of this scan as label {name!r}, so its predicted region "
        "is empty and there is nothing to explain: give a mask (--region FILE, or "
        "target.region.mask) or another label.")


def region_summary(region_scan: Any, *, spec: RegionConfig, class_index: int,
                   region_class: int, labels: Sequence[str],
                   model_grid_voxels: float) -> dict[str, Any]:
    """What the record and summary say of a target region: its source, label, SHA-256
    (:func:`icam_med.audit.hashing.voxel_sha256` of the uint8 region on the scan's grid) and
    voxel count (scan grid; and the summed weights on the model's grid). No file name: a
    mask's name may carry a patient's; its SHA-256 identifies it."""
    from icam_med.audit.hashing import voxel_sha256

    def name(i: int) -> str | None:
        return str(labels[i]) if 0 <= i < len(labels) else None

    arr = region_scan.as_tensor() if hasattr(region_scan, "as_tensor") else region_scan
    return {
        "source": spec.kind,
        "class_index": int(class_index),
        "label": name(class_index),
        "region_class_index": int(region_class) if spec.kind == "predicted" else None,
        "region_label": name(region_class) if spec.kind == "predicted" else None,
        "sha256": voxel_sha256(arr),
        "voxels": int(torch.count_nonzero(torch.as_tensor(arr))),
        "model_grid_voxels": round(float(model_grid_voxels), 3),
    }


def _region_on_scan(spec: RegionConfig, mask: Any, region_model: torch.Tensor,
                    pre: Preprocessor, x: Any, scan_info: ScanInfo, k: int, region_k: int,
                    labels: Sequence[str]) -> tuple[Any, dict[str, Any]]:
    """The explained region on the scan's grid (the mask itself, or the predicted region
    carried back by nearest-neighbour inversion) and its record summary."""
    from monai.data import MetaTensor

    if mask is not None:
        on_scan = (mask.as_tensor() > 0).to(torch.uint8)
    else:
        back = pre.invert(region_model, x, source_shape=scan_info.shape,
                          source_affine=scan_info.affine, mode="nearest")
        on_scan = (back.as_tensor() > 0.5).to(torch.uint8)
    region = MetaTensor(on_scan, affine=torch.as_tensor(scan_info.affine, dtype=torch.float64))
    info = region_summary(region, spec=spec, class_index=k, region_class=region_k,
                          labels=labels, model_grid_voxels=float(region_model.sum()))
    return region, info


def _explain_sliding(scan_info: ScanInfo, prepared: Prepared, x: Any, cam: Any,
                     targets: Any, spec: RegionConfig, mask: Any,
                     region_model: torch.Tensor | None, prov: Provenance,
                     t0: float) -> Explanation:
    """The sliding-window path of :func:`explain_volume` (:mod:`icam_med.cam.sliding`)."""
    from icam_med.cam.sliding import SlidingWindow, explain_sliding

    settings = prepared.config.sliding_window
    window = SlidingWindow.from_mapping(settings.to_dict())
    info = prepared.model_info
    if x.shape[0] != info.in_channels:
        check_input_contract(info, tuple(x.shape), source=str(scan_info.path))
    if len(window.roi_size) != x.ndim - 1:
        raise ValueError(f"inference.sliding_window.roi_size {list(window.roi_size)} has "
                         f"{len(window.roi_size)} axes, the preprocessed scan {x.ndim - 1}.")
    labels = info.labels
    dtype = getattr(torch, info.dtype, torch.float32)
    example = torch.zeros((1, info.in_channels, *window.roi_size), dtype=dtype,
                          device=prepared.device)
    if not _is_segmentation(cam, window.roi_size, example):
        raise ValueError(
            f"model '{info.name}' returns one score per class for a window, not a segmentation "
            "map: sliding-window inference (inference.sliding_window) is for segmentation "
            "networks; remove it and resize the scan to the model's input instead.")
    k = _segmentation_label(targets, labels, spec)
    region_k = _label_index(spec.label, labels) if spec.label is not None else k
    t1 = time.perf_counter()
    volume = x.as_tensor().unsqueeze(0).to(dtype=dtype)
    res = explain_sliding(cam, volume, window, class_index=k,
                          region=None if region_model is None else region_model[0],
                          region_class=region_k)
    del volume
    release_freed_memory()  # the windows' activations and gradients
    t2 = time.perf_counter()
    summary = CAMSummary(method=res.method, options=dict(res.options), score=res.score,
                         target_class=k, predicted_class=None, logits=None, probabilities=None,
                         layer_weights=dict(res.layer_weights), layer_scores=dict(res.layer_scores))
    pre = prepared.preprocessor
    fused = _on_scan_grid(pre, res.fused, x, scan_info)
    target_region, region_info = _region_on_scan(spec, mask, res.region, pre, x, scan_info,
                                                 k, region_k, labels)
    t3 = time.perf_counter()
    return Explanation(
        fused=fused, layer_maps={}, scan_info=scan_info, result=summary,
        preprocessing=pre.describe(), model_info=info,
        timing={"preprocess": t1 - t0, "cam": t2 - t1, "invert": t3 - t2, "total": t3 - t0},
        labels=tuple(labels), config_path=prepared.config.path, cam_result=None,
        preprocessed=x, provenance=prov, target_region=target_region,
        region_info=region_info, sliding_window=res.describe(),
        parametric_map=prepared.config.parametric_map)


@dataclass(frozen=True)
class WrittenFile:
    """One output file: where, what it is, and its fingerprint."""

    path: Path
    role: str      # "cam_nifti", "parametric_map", "layer_map:<name>", "summary"
    sha256: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.path.name, "role": self.role, "sha256": self.sha256,
                "size": self.size}


def _refuse_existing(paths: Mapping[str, Path], overwrite: bool) -> None:
    if overwrite:
        return
    existing = [p for p in paths.values() if p.exists()]
    if existing:
        raise FileExistsError(
            f"output file {existing[0]} already exists ({len(existing)} of this run's outputs "
            "do); choose another --out folder or pass --overwrite to replace them."
        )


def write_explanation(explanation: Explanation, out_dir: str | Path, *, overwrite: bool = False,
                      stem: str = MAP_STEM, audit: AuditContext | None = None) -> list[WrittenFile]:
    """Write an explanation's maps and JSON summary into ``out_dir``, and seal them.

    Writes ``{stem}.nii.gz`` (fused map, source affine), ``{stem}_parametric_map.dcm`` for
    DICOM input (when the source has plane positions), ``{stem}_layer_<layer>.nii.gz`` per
    layer map present, and ``{stem}_summary.json`` listing every output with its SHA-256.
    Each file is written atomically; if any write fails, the files this call already wrote
    are removed again, so a failed run leaves nothing behind.

    Last, the audit record ``{stem}.icam.json`` is written and logged in the output
    folder's ``ledger.jsonl`` (see :mod:`icam_med.audit.trail`; ``audit`` picks the ledger
    folder, run and scan names). This is :func:`write_outputs` then :func:`seal_outputs`
    under the folder's lock.

    Raises:
        FileExistsError: an output exists and ``overwrite`` is False (checked before writing),
            the map already has an audit record, an output is a file the ledger pins (never
            replaced), or another icam-med process is writing into the folder.
    """
    info = explanation.scan_info
    paths = output_paths(out_dir, is_dicom=info.format == "dicom",
                         layer_names=list(explanation.layer_maps), stem=stem,
                         region=explanation.target_region is not None,
                         two_d=is_radiograph(info))
    check_before_writing(paths["cam_nifti"], audit, list(paths.values()))
    _refuse_existing(paths, overwrite)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    root = audit_root(paths["cam_nifti"], audit)
    # The folder's lock (the one `audit` holds for a whole run), from the last check to the
    # ledger entry: two writers into one folder cannot both pass the checks, and the one
    # refused has written nothing, so its clean-up can never remove the other's outputs.
    held = audit is not None and audit.lock is not None and audit.lock.covers(root)
    # A write on its own is a run: its head is signed with the site's key, if one is
    # configured (a batch signs once, at the end of its run).
    signing_key = None if held else _signing_key(explanation, root)
    with contextlib.nullcontext() if held else FolderLock(root):
        check_before_writing(paths["cam_nifti"], audit, list(paths.values()))
        written = _write_files(explanation, paths, overwrite)
        try:
            entry, record_path = _seal(explanation, written, paths["cam_nifti"], audit)
        except BaseException:
            for w in written:
                w.path.unlink(missing_ok=True)
            raise
        if signing_key is not None:
            sign_head(root, signing_key, entry.run_id, entry.seq, entry.sha256)
        return [*written, _written(record_path, "audit_record")]


def write_outputs(explanation: Explanation, out_dir: str | Path, *, stem: str = MAP_STEM,
                  audit: AuditContext | None = None) -> list[WrittenFile]:
    """Write an explanation's maps and JSON summary into ``out_dir``; no record, no ledger.

    What a batch worker does (in this process, a local process or on a Dask worker, onto
    the shared file system): every file is written atomically (a temporary file in
    ``out_dir``, fsynced, renamed), never over an existing one, and a failure removes what
    this call wrote. The files are not evidence until :func:`seal_outputs` has re-hashed
    them and logged them: a worker killed here leaves at most unlogged files, which
    ``verify`` reports and the next run removes.

    The Parametric Map (DICOM input) is encoded as ``explanation.parametric_map`` says (the
    config's ``outputs.parametric_map``: pixel type and compression), and that choice is
    recorded as ``parametric_map_encoding`` in the JSON summary.

    Args:
        explanation: from :func:`explain_volume`.
        out_dir: the scan's output folder.
        stem: the outputs' stem.
        audit: the audit context the files will be sealed under (its ``root`` holds the
            ledger, read here only to refuse outputs it already records).

    Returns:
        The files written (name, role, SHA-256, size) for :func:`seal_outputs`.

    Raises:
        FileExistsError: the map already has a record, or an output exists already (both
            checked before writing).
    """
    paths = output_paths(out_dir, is_dicom=explanation.scan_info.format == "dicom",
                         layer_names=list(explanation.layer_maps), stem=stem,
                         region=explanation.target_region is not None,
                         two_d=is_radiograph(explanation.scan_info))
    check_before_writing(paths["cam_nifti"], audit, list(paths.values()))
    _refuse_existing(paths, overwrite=False)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return _write_files(explanation, paths, overwrite=False)


def seal_outputs(explanation: Explanation, written: Sequence[WrittenFile], out_dir: str | Path,
                 *, audit: AuditContext | None = None) -> tuple[list[WrittenFile], Any]:
    """Check files another process wrote into ``out_dir``, then record and log them.

    The coordinator's part of a batch: each file in ``written`` must still be in
    ``out_dir`` (a plain file, no link) with the size and SHA-256 its writer reported;
    only then is the audit record written and the ledger appended. The caller holds the
    folder's lock (``audit.lock``), else it is taken here.

    Args:
        explanation: the explanation (its maps may have been dropped: see
            :meth:`Explanation.drop_maps`).
        written: what :func:`write_outputs` returned (only file names are used: the files
            are looked up in ``out_dir``).
        out_dir: the scan's output folder.
        audit: the audit context.

    Returns:
        ``(every file including the record, ledger entry)``.

    Raises:
        ValueError: a file is missing, a link, or differs from what its writer reported
            (nothing is recorded then).
        FileExistsError: the map already has a record.
    """
    folder = Path(out_dir)
    files = [replace(w, path=folder / Path(w.path).name) for w in written]
    by_role = {w.role: w for w in files}
    if "cam_nifti" not in by_role:
        raise ValueError(f"no fused map among the outputs to seal in {folder}.")
    map_path = by_role["cam_nifti"].path
    root = audit_root(map_path, audit)
    held = audit is not None and audit.lock is not None and audit.lock.covers(root)
    with contextlib.nullcontext() if held else FolderLock(root):
        check_before_writing(map_path, audit)
        for w in files:
            _check_written(w)
        entry, record_path = _seal(explanation, files, map_path, audit)
    return [*files, _written(record_path, "audit_record")], entry


def _check_written(w: WrittenFile) -> None:
    """Refuse a file that is not, byte for byte, what its writer reported."""
    p = w.path
    if p.is_symlink() or not p.is_file():
        raise ValueError(f"output {p} ({w.role}) is missing or not a plain file; its writer "
                         "reported it written. Nothing was recorded for this scan.")
    size = p.stat().st_size
    if size != w.size or sha256_file(p) != w.sha256:
        raise ValueError(
            f"output {p} ({w.role}) changed between its write and the seal (size {size}, "
            f"reported {w.size}; or its SHA-256 differs from the writer's): refusing to record "
            "it. Nothing was recorded for this scan; audit it again.")


def _written(path: Path, role: str) -> WrittenFile:
    return WrittenFile(path, role, sha256_file(path), path.stat().st_size)


def _signing_key(explanation: Explanation, root: Path) -> Any:
    """The configured signing key (checked before anything is written), or ``None``."""
    prov = explanation.provenance
    if prov is None:
        return None
    key = load_signing_key(dict(prov.audit_config), base_dir=prov.config_dir)
    check_key_outside(key, root)
    return key


def _write_files(explanation: Explanation, paths: Mapping[str, Path],
                 overwrite: bool) -> list[WrittenFile]:
    """Write the maps and the JSON summary (each atomically); on failure remove them."""
    from icam_med.io.atomic import atomic_write_text
    from icam_med.io.writers import write_nifti, write_parametric_map

    info = explanation.scan_info
    written: list[WrittenFile] = []
    notes: list[str] = []
    pm_encoding: dict[str, str] | None = None

    def record(path: Path, role: str) -> None:
        written.append(_written(path, role))

    method = explanation.result.method
    desc = f"icam-med {__version__} {method} CAM"
    try:
        write_nifti(explanation.fused, paths["cam_nifti"], reference=info, description=desc,
                    overwrite=overwrite)
        record(paths["cam_nifti"], "cam_nifti")
        if "parametric_map" in paths:
            encoding = explanation.parametric_map  # the config's outputs.parametric_map
            try:
                write_parametric_map(
                    explanation.fused, info, paths["parametric_map"], method=method,
                    parameters=dict(explanation.result.options),
                    target_label=explanation.target_label, overwrite=overwrite,
                    **encoding.writer_options())
                record(paths["parametric_map"], "parametric_map")
                pm_encoding = encoding.to_dict()
            except ValueError as exc:  # e.g. a multi-frame source without plane positions
                log.warning("no Parametric Map written: %s", exc)
                notes.append(f"no Parametric Map written: {exc}")
        if "overlay_png" in paths or "presentation_state" in paths:  # a 2-D image
            from icam_med.io.radiograph import write_radiograph_outputs

            for role, path in write_radiograph_outputs(explanation, paths, overwrite=overwrite):
                record(path, role)
        for name, layer_map in explanation.layer_maps.items():
            role = f"layer_map:{name}"
            write_nifti(layer_map, paths[role], reference=info,
                        description=f"{desc} layer {name}", overwrite=overwrite)
            record(paths[role], role)
        if "target_region" in paths and explanation.target_region is not None:
            region = explanation.region_info or {}
            write_nifti(explanation.target_region.float(), paths["target_region"],
                        reference=info, overwrite=overwrite,
                        description=f"icam-med target region ({region.get('source')}) of "
                                    f"label {region.get('label') or region.get('class_index')}")
            record(paths["target_region"], "target_region")
        summary = explanation.to_dict()
        summary["outputs"] = [w.to_dict() for w in written]
        if pm_encoding is not None:  # sealed with the summary's hash in the audit record
            summary["parametric_map_encoding"] = pm_encoding
        summary["notes"] = notes
        atomic_write_text(paths["summary"], json.dumps(summary, indent=2, sort_keys=False) + "\n",
                          overwrite=overwrite)
        record(paths["summary"], "summary")
    except BaseException:
        for w in written:
            w.path.unlink(missing_ok=True)
        raise
    return written


def _seal(explanation: Explanation, written: Sequence[WrittenFile], map_path: Path,
          audit: AuditContext | None) -> tuple[Any, Path]:
    """The audit seam: the record (listing every file written) and its ledger entry."""
    _, entry, record_path = record_explanation(explanation, written, map_path, audit)
    return entry, record_path


def explain_scan(
    scan_path: str | Path,
    config: ICAMConfig | str | Path | Prepared,
    out_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    series_uid: str | None = None,
    volume_index: int | None = None,
    method: str | None = None,
    method_options: Mapping[str, Any] | None = None,
    targets: Any = None,
    region: Any = None,
    layer_maps: bool = False,
    overwrite: bool = False,
) -> tuple[Explanation, list[WrittenFile]]:
    """Load, validate, explain and write one scan.

    Everything that can be checked is checked before any output is written: the config,
    the model weights, the scan's geometry (and a region mask's), and that no output would
    be overwritten. ``targets`` and ``region`` are :func:`explain_volume`'s.

    Returns:
        The :class:`Explanation` and the files written.
    """
    is_dicom_guess = Path(scan_path).is_dir() or not is_nifti(scan_path)
    planned = output_paths(out_dir, is_dicom=is_dicom_guess)
    _refuse_existing(planned, overwrite)
    check_before_writing(planned["cam_nifti"], None)  # audited outputs: refused even now
    spec = RegionConfig.parse(region) if isinstance(region, str | Path) else region
    if isinstance(spec, RegionConfig) and spec.mask is not None and not spec.mask.exists():
        raise FileNotFoundError(f"region mask {spec.mask} does not exist; give a mask file "
                                "(NIfTI or DICOM) on the scan's grid.")
    prepared = config if isinstance(config, Prepared) else prepare(config, device)
    image, info = load_volume(scan_path, series_uid=series_uid, volume_index=volume_index,
                              geometry=prepared.config.geometry)
    loaded = [image]
    del image  # only the list holds the volume: it is freed once the model input exists
    explanation = _explain_loaded(loaded, info, prepared, method=method,
                                  method_options=method_options, targets=targets,
                                  region=region, layer_maps=layer_maps)
    written = write_explanation(explanation, out_dir, overwrite=overwrite)
    return explanation, written


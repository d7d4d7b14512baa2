"""Preprocessing pipelines from config, and the way back onto the scan's own grid.

A config's ``preprocessing`` section is a list of MONAI dictionary transforms, each a
mapping with the transform's ``name`` and its arguments::

    preprocessing:
      - {name: Orientationd, axcodes: RAS}
      - {name: Spacingd, pixdim: [2.0, 2.0, 2.0], mode: bilinear}
      - {name: ScaleIntensityRanged, a_min: -1000, a_max: 400, b_min: 0.0, b_max: 1.0, clip: true}
      - {name: ResizeWithPadOrCropd, spatial_size: [64, 64, 64]}

``keys`` defaults to ``image``. :class:`Preprocessor` builds the MONAI ``Compose`` once and
applies it to a loaded :class:`~monai.data.MetaTensor`; every spatial step (orientation,
spacing, crop, pad, resize) is one of MONAI's invertible transforms and records itself in
the tensor's ``applied_operations``. :meth:`Preprocessor.invert` carries a map computed on
the preprocessed grid back through the inverse of those steps (``Compose.inverse``, as
MONAI's ``Invertd`` does), and checks that the result has exactly the source's shape and
affine. Intensity steps have no spatial effect and are skipped on the way back.
"""

from __future__ import annotations

import copy
import difflib
import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["Preprocessor", "build_preprocessing"]

log = logging.getLogger(__name__)

IMAGE_KEY = "image"
# Steps a config may not contain: loading is done (and validated) by icam_med.io.
_FORBIDDEN = {"LoadImaged", "LoadImage", "SaveImaged", "SaveImage"}


def _json_safe(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray | torch.Tensor):
        return np.asarray(value).tolist()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


def build_preprocessing(steps: Sequence[Mapping[str, Any]], *,
                        keys: Sequence[str] = (IMAGE_KEY,), source: str = "config") -> Any:
    """Build a MONAI ``Compose`` of dictionary transforms from config steps.

    Args:
        steps: mappings with ``name`` (a class of :mod:`monai.transforms` whose name ends in
            ``d``) and its keyword arguments; ``keys`` defaults to ``keys``.
        keys: default keys for every step.
        source: where the steps come from, for error messages.

    Raises:
        ValueError: unknown or non-dictionary transform, a forbidden step, or arguments the
            transform rejects; the message names the step.
    """
    import monai.transforms as mt

    built = []
    for i, step in enumerate(steps):
        step = dict(step)
        name = str(step.pop("name", ""))
        where = f"{source}: preprocessing step {i + 1} ({name or 'no name'})"
        if name in _FORBIDDEN:
            raise ValueError(
                f"{where}: loading and saving are done by icam-med itself (with geometry "
                "validation); remove this step."
            )
        cls = getattr(mt, name, None)
        if not (isinstance(cls, type) and issubclass(cls, mt.MapTransform)):
            names = [n for n in dir(mt) if n.endswith("d") and n[:1].isupper()]
            close = difflib.get_close_matches(name, names, n=4)
            raise ValueError(
                f"{where}: is not a MONAI dictionary transform"
                + (f"; did you mean {close}?" if close else "")
                + " Use a class of monai.transforms whose name ends in 'd', e.g. Orientationd."
            )
        step.setdefault("keys", list(keys))
        try:
            with warnings.catch_warnings():
                # MONAI announces a future change of Orientationd's default axis labels; our
                # tensors carry their space (RAS), so both defaults give the same result.
                warnings.filterwarnings("ignore", category=FutureWarning, message=".*labels.*")
                built.append(cls(**step))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: the transform rejected its arguments {step}: {exc}") from exc
    return mt.Compose(built)


class Preprocessor:
    """A config's preprocessing, applied to a loaded scan and inverted onto its grid.

    Args:
        steps: the config's ``preprocessing`` list (see the module docstring).
        source: where the steps come from, for error messages.

    Example:
        >>> pre = Preprocessor([{"name": "Orientationd", "axcodes": "RAS"}])
        >>> x = pre(image)                 # MetaTensor (1, *model grid)
        >>> back = pre.invert(cam_map, x)  # MetaTensor on image's grid, image's affine
    """

    def __init__(self, steps: Sequence[Mapping[str, Any]] = (), *, source: str = "config") -> None:
        self.steps = tuple(copy.deepcopy(dict(s)) for s in steps)
        self.compose = build_preprocessing(self.steps, source=source)

    def __call__(self, image: Any) -> Any:
        """Apply the pipeline to a channel-first MetaTensor; returns the preprocessed MetaTensor."""
        from monai.data import MetaTensor

        if not isinstance(image, MetaTensor):
            raise TypeError("Preprocessor expects a MetaTensor from icam_med.io.load_volume.")
        out = self.compose({IMAGE_KEY: image})[IMAGE_KEY]
        if not isinstance(out, MetaTensor):  # pragma: no cover - a transform dropped the meta
            raise ValueError("a preprocessing step returned a plain tensor; its geometry is lost.")
        return out

    def describe(self) -> list[dict[str, Any]]:
        """Each transform with its parameters and whether it is inverted, JSON-safe."""
        from monai.transforms import InvertibleTransform

        out = []
        for step, t in zip(self.steps, self.compose.transforms, strict=True):
            d = {"name": step["name"], "monai_class": f"{type(t).__module__}.{type(t).__name__}",
                 "invertible": isinstance(t, InvertibleTransform)}
            d["args"] = _json_safe({k: v for k, v in step.items() if k != "name"})
            out.append(d)
        return out

    def invert(self, cam_map: torch.Tensor, preprocessed: Any, *,
               source_shape: Sequence[int] | None = None,
               source_affine: np.ndarray | torch.Tensor | None = None,
               mode: str = "bilinear") -> Any:
        """Carry a map on the preprocessed grid back onto the source grid.

        Args:
            cam_map: ``(C, *spatial)`` (or ``(*spatial)``) map on ``preprocessed``'s grid.
            preprocessed: the MetaTensor this Preprocessor returned (its
                ``applied_operations`` are replayed backwards).
            source_shape, source_affine: the loaded scan's spatial shape and affine; when
                given, the result is checked against them (and given exactly that affine).
            mode: interpolation for inverted resampling (``"bilinear"`` keeps a map smooth;
                ``"nearest"`` for labels).

        Returns:
            A float32 MetaTensor ``(C, *source_shape)`` with the source affine.

        Raises:
            ValueError: the map does not match the preprocessed grid, or the pipeline holds
                a spatial step that cannot be inverted (the result misses the source grid).
        """
        from monai.data import MetaTensor
        from monai.utils import TraceKeys

        m = torch.as_tensor(cam_map).detach().to(device="cpu", dtype=torch.float32)
        if m.ndim == preprocessed.ndim - 1:
            m = m.unsqueeze(0)
        if tuple(m.shape[1:]) != tuple(preprocessed.shape[1:]):
            raise ValueError(
                f"map of spatial shape {tuple(m.shape[1:])} does not match the preprocessed "
                f"image {tuple(preprocessed.shape[1:])}; upsample it to the model input first."
            )
        ops = copy.deepcopy(preprocessed.applied_operations)
        for op in ops:  # interpolate the map smoothly whatever mode the image used
            extra = op.get(TraceKeys.EXTRA_INFO) or {}
            if isinstance(extra, dict) and "mode" in extra and mode != "nearest":
                extra["mode"] = mode
        meta = copy.deepcopy(preprocessed.meta)
        meta["affine"] = preprocessed.affine.clone()
        cam = MetaTensor(m, meta=meta, applied_operations=ops)
        out = self.compose.inverse({IMAGE_KEY: cam})[IMAGE_KEY]
        if not isinstance(out, MetaTensor):  # pragma: no cover
            out = MetaTensor(out)
        out = out.float()
        if source_shape is not None and tuple(out.shape[1:]) != tuple(source_shape):
            raise ValueError(
                f"inverting the preprocessing gave a map of shape {tuple(out.shape[1:])}, not "
                f"the scan's {tuple(source_shape)}: a spatial step of {self._names()} is not "
                "invertible. Use MONAI's invertible spatial transforms (Orientationd, "
                "Spacingd, ResizeWithPadOrCropd, CropForegroundd, Resized, SpatialPadd...)."
            )
        if source_affine is not None:
            src = np.asarray(torch.as_tensor(source_affine).cpu(), dtype=np.float64)
            got = np.asarray(out.affine.cpu(), dtype=np.float64)
            scale = max(1.0, float(np.abs(src).max()))
            if not np.allclose(got, src, atol=1e-3 * scale):
                raise ValueError(
                    f"inverting the preprocessing did not restore the scan's affine "
                    f"(got {got.round(4).tolist()}, expected {src.round(4).tolist()}): a "
                    f"spatial step of {self._names()} is not invertible."
                )
            out.affine = torch.as_tensor(src, dtype=torch.float64)
        out.applied_operations = []
        return out

    def _names(self) -> list[str]:
        return [s["name"] for s in self.steps]

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

__all__ = ["REINDEXING_STEPS", "Preprocessor", "build_preprocessing", "resample_to_grid"]

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


# Resampling transforms whose computation dtype defaults to float64 in MONAI: a float64
# copy of the whole full-resolution scan. float32 unless the config says otherwise.
_FLOAT64_BY_DEFAULT = {"Spacingd", "SpatialResampled", "ResampleToMatchd", "Affined", "Zoomd",
                       "Rotated", "Rotate90d"}


def _float32_resampling(step: dict[str, Any]) -> dict[str, Any]:
    """``dtype: float32`` for a resampling step that would compute in float64 by default (so
    the record shows it); a config's own ``dtype`` is kept."""
    if step.get("name") in _FLOAT64_BY_DEFAULT and "dtype" not in step:
        import inspect

        import monai.transforms as mt

        cls = getattr(mt, str(step["name"]), None)
        params = inspect.signature(cls).parameters if cls is not None else {}
        if "dtype" in params:
            step["dtype"] = "float32"
    return step


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


#: Dictionary transforms that only move, flip, crop or pad voxels (constant 0 padding by
#: default): exact in the scan's stored integer type, so the image need not be float yet.
REINDEXING_STEPS = frozenset({
    "Orientationd", "Flipd", "SpatialPadd", "BorderPadd", "DivisiblePadd", "SpatialCropd",
    "CenterSpatialCropd", "CropForegroundd", "ResizeWithPadOrCropd",
})


def _as_float32(image: Any) -> Any:
    """The image as float32 (the same tensor when it is already), metadata kept."""
    return image if image.dtype == torch.float32 else image.to(torch.float32)


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
        self.steps = tuple(_float32_resampling(copy.deepcopy(dict(s))) for s in steps)
        self.compose = build_preprocessing(self.steps, source=source)
        self.source = source

    def __call__(self, image: Any) -> Any:
        """Apply the pipeline to a channel-first MetaTensor; returns the preprocessed
        MetaTensor, float32.

        An integer image (a CT's int16, as :func:`~icam_med.io.load_volume` keeps it) stays
        in its type through the leading steps that only re-index voxels
        (:data:`REINDEXING_STEPS`: exact in any type) and becomes float32 just before the
        first other step (a resampling or intensity transform), or at the end: the only
        full-size float copy, with the values the float32 path gave.

        Args:
            image: the MetaTensor, or a one-item list holding it: the list is emptied, so
                that when the caller keeps no other reference the loaded volume is freed as
                soon as the first step has made its copy, before the float copy exists
                (157 MB less at the peak for a 512x512x300 int16 CT).
        """
        from monai.data import MetaTensor

        holder = image if isinstance(image, list) else None
        if holder is not None:
            if len(holder) != 1:
                raise ValueError(f"Preprocessor expects one image in the list, got {len(holder)}.")
            image = holder.pop()
        if not isinstance(image, MetaTensor):
            raise TypeError("Preprocessor expects a MetaTensor from icam_med.io.load_volume.")
        from icam_med.io import radiograph  # a 2-D image runs the pipeline in 2-D

        if radiograph.is_2d_image(image):
            return radiograph.preprocess_2d(self.compose, image, source=self.source)
        data = {IMAGE_KEY: image}
        del image  # with a list given, ``data`` now holds the only reference
        first = self.first_float_step
        if first:
            data = self.compose(data, end=first)
        data[IMAGE_KEY] = _as_float32(data[IMAGE_KEY])
        if first < len(self.compose.transforms):
            data = self.compose(data, start=first)
        out = _as_float32(data[IMAGE_KEY])
        if not isinstance(out, MetaTensor):  # pragma: no cover - a transform dropped the meta
            raise ValueError("a preprocessing step returned a plain tensor; its geometry is lost.")
        return out

    @property
    def first_float_step(self) -> int:
        """Index of the first step that needs float voxels (the steps before it only
        re-index them: :data:`REINDEXING_STEPS`); the number of steps if none does."""
        for i, step in enumerate(self.steps):
            if step["name"] not in REINDEXING_STEPS:
                return i
        return len(self.steps)

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
        from icam_med.io import radiograph  # a 2-D image's map goes back in 2-D

        if radiograph.is_2d_image(preprocessed):
            return radiograph.invert_2d(self, cam_map, preprocessed, source_shape=source_shape,
                                        source_affine=source_affine, mode=mode)
        m = torch.as_tensor(cam_map).detach().to(dtype=torch.float32)
        if (source_shape is not None and source_affine is not None
                and _fast_head(preprocessed.applied_operations)):
            out = self._invert_fast(m, preprocessed, source_shape, source_affine, mode)
            if out is not None:
                return self._checked(out, source_shape, source_affine)
        return self.invert_reference(m.cpu(), preprocessed, source_shape=source_shape,
                                     source_affine=source_affine, mode=mode)

    def invert_reference(self, cam_map: torch.Tensor, preprocessed: Any, *,
                         source_shape: Sequence[int] | None = None,
                         source_affine: np.ndarray | torch.Tensor | None = None,
                         mode: str = "bilinear") -> Any:
        """:meth:`invert` by MONAI's own inverse of every step (``Compose.inverse``), each
        at its own grid: the reference the one-pass inverse is tested against, and the way
        back for pipelines the one-pass inverse does not cover."""
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
        for op in ops:  # the map's mode whatever the image used (smooth; nearest for labels)
            extra = op.get(TraceKeys.EXTRA_INFO) or {}
            if isinstance(extra, dict) and "mode" in extra:
                extra["mode"] = mode
        meta = copy.deepcopy(preprocessed.meta)
        meta["affine"] = preprocessed.affine.clone()
        cam = MetaTensor(m, meta=meta, applied_operations=ops)
        out = self.compose.inverse({IMAGE_KEY: cam})[IMAGE_KEY]
        if not isinstance(out, MetaTensor):  # pragma: no cover
            out = MetaTensor(out)
        return self._checked(out.float(), source_shape, source_affine)

    def _invert_fast(self, m: torch.Tensor, preprocessed: Any, source_shape: Sequence[int],
                     source_affine: Any, mode: str) -> Any:
        """MONAI's inverse for the steps after the first resampling (at the model's
        resolution), then one trilinear pass from the composed affine onto the scan's grid
        for the orientation and resampling steps before it. ``None`` when MONAI's inverse of
        the later steps does not fit this scheme (the caller then inverts by MONAI alone)."""
        from monai.data import MetaTensor
        from monai.transforms import InvertibleTransform
        from monai.utils import TraceKeys

        if m.ndim == preprocessed.ndim - 1:
            m = m.unsqueeze(0)
        if tuple(m.shape[1:]) != tuple(preprocessed.shape[1:]):
            return None  # the reference path raises the clear error
        ops = copy.deepcopy(preprocessed.applied_operations)
        head = _fast_head(ops)
        first_size = ops[0].get(TraceKeys.ORIG_SIZE) if ops else None
        if first_size is None or tuple(int(v) for v in first_size) != tuple(
                int(v) for v in source_shape):
            return None  # not this scan's pipeline: the reference path says so
        pad_mode = "zeros"
        for op in ops[:head]:
            extra = op.get(TraceKeys.EXTRA_INFO) or {}
            if op.get(TraceKeys.CLASS_NAME) == "SpatialResample":
                pad_mode = str(extra.get("padding_mode", "border"))
        for op in ops[head:]:
            extra = op.get(TraceKeys.EXTRA_INFO) or {}
            if isinstance(extra, dict) and "mode" in extra:
                extra["mode"] = mode
        meta = copy.deepcopy(preprocessed.meta)
        meta["affine"] = preprocessed.affine.clone()
        data = {IMAGE_KEY: MetaTensor(m.cpu(), meta=meta, applied_operations=ops)}
        try:
            for t in reversed(self.compose.transforms):
                if len(data[IMAGE_KEY].applied_operations) <= head:
                    break
                if isinstance(t, InvertibleTransform):
                    data = t.inverse(data)
        except (RuntimeError, ValueError, KeyError, IndexError) as exc:
            log.debug("one-pass inverse not applicable (%s); MONAI's inverse used", exc)
            return None
        low = data[IMAGE_KEY]
        if len(low.applied_operations) != head:
            return None
        out = resample_to_grid(low.as_tensor().to(m.device), np.asarray(low.affine.cpu()),
                               tuple(int(s) for s in source_shape),
                               np.asarray(torch.as_tensor(source_affine).cpu()),
                               mode=mode, padding_mode=pad_mode)
        return MetaTensor(out.cpu(), affine=torch.as_tensor(
            np.asarray(torch.as_tensor(source_affine).cpu(), dtype=np.float64)))

    def _checked(self, out: Any, source_shape: Sequence[int] | None,
                 source_affine: np.ndarray | torch.Tensor | None) -> Any:
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


# Ops the one-pass inverse takes over: exact re-indexing and one linear resampling.
_HEAD_OPS = {"Orientation", "SpatialResample"}


def _fast_head(ops: Sequence[Mapping[str, Any]]) -> int:
    """How many leading applied operations the one-pass inverse covers: orientations and at
    most one (non-lazy) resampling; 0 when there is no resampling among them."""
    from monai.utils import TraceKeys

    n = resamples = 0
    for op in ops:
        name = op.get(TraceKeys.CLASS_NAME)
        if name not in _HEAD_OPS or op.get(TraceKeys.LAZY) or not op.get(
                TraceKeys.DO_TRANSFORM, True):
            break
        if name == "SpatialResample":
            if resamples:
                break
            resamples += 1
        n += 1
    return n if resamples else 0


def resample_to_grid(low: torch.Tensor, low_affine: np.ndarray, shape: Sequence[int],
                     affine: np.ndarray, *, mode: str = "bilinear",
                     padding_mode: str = "border", slab_voxels: int = 4_000_000,
                     separable: bool = True) -> torch.Tensor:
    """Sample a map ``(C, *low_shape)`` with voxel-to-world ``low_affine`` at every voxel of
    the grid ``(shape, affine)``, in one pass, slab by slab.

    Each output voxel's index is carried to the low-resolution grid by
    ``inv(low_affine) @ affine`` and interpolated there (trilinear, or nearest), with
    ``padding_mode`` (``"border"``, ``"zeros"``, ``"reflection"``) outside it: what MONAI's
    inverse resampling does, without building any full-resolution intermediate. Memory
    beyond the output is one slab's sampling grid (``slab_voxels`` x 3 floats). Where the
    grids differ by axis permutations, flips and scalings only (orientation and spacing
    steps, oblique scans included) the interpolation runs as three 1-D passes, the same
    tensor-product rule and far faster than ``grid_sample`` on a CPU (``separable=False``
    forces ``grid_sample``).

    Returns:
        A float32 tensor ``(C, *shape)`` on ``low``'s device.
    """
    low = low.float()
    c = low.shape[0]
    spatial = tuple(int(s) for s in low.shape[1:])
    if len(spatial) != 3 or len(shape) != 3:
        raise ValueError(f"resample_to_grid works on 3-D grids, got {spatial} -> {tuple(shape)}.")
    m_np = (np.linalg.inv(np.asarray(low_affine, dtype=np.float64))
            @ np.asarray(affine, dtype=np.float64))
    if separable and padding_mode in ("border", "zeros"):
        axes = _axis_matching(m_np[:3, :3])
        if axes is not None:  # orientation + spacing: separable, one axis at a time
            return _separable_resample(low, m_np, axes, tuple(int(s) for s in shape),
                                       mode, padding_mode, slab_voxels)
    to_low = torch.as_tensor(m_np, dtype=torch.float64)
    dev = low.device
    x_n, y_n, z_n = (int(s) for s in shape)
    out = torch.empty((c, x_n, y_n, z_n), dtype=torch.float32, device=dev)
    per_slice = max(1, x_n * y_n)
    step = max(1, slab_voxels // per_slice)
    ii = torch.arange(x_n, dtype=torch.float64, device=dev)
    jj = torch.arange(y_n, dtype=torch.float64, device=dev)
    m = to_low.to(dev)
    # Normalised coordinates (align_corners=True: -1 and 1 are the first and last voxel
    # centres); a one-voxel axis maps everything to its centre.
    scale = torch.tensor([2.0 / (n - 1) if n > 1 else 0.0 for n in spatial], dtype=torch.float64,
                         device=dev)
    base = (m[:3, 0, None, None] * ii[None, :, None] + m[:3, 1, None, None] * jj[None, None, :]
            + m[:3, 3, None, None])  # (3, X, Y): index in the low grid of slice k = 0
    inp = low[None]  # (1, C, D, H, W) = (1, C, S0, S1, S2)
    for z0 in range(0, z_n, step):
        kk = torch.arange(z0, min(z_n, z0 + step), dtype=torch.float64, device=dev)
        idx = base[..., None] + m[:3, 2, None, None, None] * kk[None, None, None, :]
        norm = idx * scale[:, None, None, None] - (scale[:, None, None, None] > 0).double()
        # grid_sample's last grid axis is (W, H, D) = (S2, S1, S0)
        grid = torch.stack((norm[2], norm[1], norm[0]), dim=-1).float()[None]
        out[:, :, :, z0: z0 + kk.numel()] = torch.nn.functional.grid_sample(
            inp, grid, mode="nearest" if mode == "nearest" else "bilinear",
            padding_mode=padding_mode, align_corners=True)[0]
    return out


def _axis_matching(linear: np.ndarray, tol: float = 1e-6) -> list[int] | None:
    """For a 3x3 index-to-index matrix that only permutes, flips and scales axes (what
    orientation and spacing steps compose to, on oblique scans too): the low-grid axis of
    each output axis; else ``None``."""
    out = []
    scale = max(1.0, float(np.abs(linear).max()))
    for d in range(3):
        col = np.abs(linear[:, d])
        p = int(np.argmax(col))
        if col[p] <= tol * scale or np.delete(col, p).max() > tol * scale or p in out:
            return None
        out.append(p)
    return out


def _axis_weights(u: torch.Tensor, n: int, mode: str, padding_mode: str,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Neighbour indices (clamped for gathering) and weights (0 outside for ``zeros``) of
    1-D linear (or nearest) interpolation at positions ``u`` on an axis of ``n`` samples."""
    if padding_mode == "border":
        u = u.clamp(0.0, float(n - 1))
    if mode == "nearest":
        i0 = torch.round(u)  # half to even, as grid_sample
        w0 = ((i0 >= 0) & (i0 <= n - 1)).to(torch.float32)
        i0c = i0.clamp(0, n - 1).long()
        return i0c, i0c, w0, torch.zeros_like(w0)
    i0 = torch.floor(u)
    f = (u - i0).to(torch.float32)
    i1 = i0 + 1
    w0 = (1.0 - f) * ((i0 >= 0) & (i0 <= n - 1)).to(torch.float32)
    w1 = f * ((i1 >= 0) & (i1 <= n - 1)).to(torch.float32)
    return i0.clamp(0, n - 1).long(), i1.clamp(0, n - 1).long(), w0, w1


def _separable_resample(low: torch.Tensor, m: np.ndarray, axes: list[int],
                        shape: tuple[int, int, int], mode: str, padding_mode: str,
                        slab_voxels: int) -> torch.Tensor:
    """Trilinear interpolation as three 1-D passes (exactly the tensor-product rule
    ``grid_sample`` applies), slab by slab along the output's last axis: for each slab,
    the low-resolution planes it needs are interpolated along the other axes, then blended
    along the last into the output. The result ``(C, X, Y, Z)`` is a view of memory laid
    out ``(C, Z, Y, X)`` (x fastest, as the writers need it). Memory beyond the output is a few slabs (no
    intermediate with two full-resolution axes: 150 MB and three times that at its peak for
    a 512x512x300 scan)."""
    dev = low.device
    # bring the low grid's axes into the output's axis order: output axis d <- low axis axes[d]
    vol = low.permute(0, *[a + 1 for a in axes])
    c = vol.shape[0]
    weights = {}
    for d in range(3):
        u = (torch.arange(shape[d], dtype=torch.float64, device=dev) * float(m[axes[d], d])
             + float(m[axes[d], 3]))
        weights[d] = _axis_weights(u, int(vol.shape[d + 1]), mode, padding_mode)

    def last_axes(planes: torch.Tensor) -> torch.Tensor:
        for d in (2, 1):
            i0, i1, w0, w1 = weights[d]
            view = [1, 1, 1, 1]
            view[d + 1] = -1
            lead = (slice(None),) * (d + 1)  # advanced indexing: far faster than index_select
            planes = planes[(*lead, i0)] * w0.view(view) + planes[(*lead, i1)] * w1.view(view)
        return planes

    # The work runs in reversed axis order, slab by slab along the output's last axis, so the
    # output's memory is (C, Z, Y, X): the x-fastest order of NIfTI and of DICOM frames,
    # which the writers then read without a transposing copy of the full-size map.
    vol = vol.permute(0, 3, 2, 1)
    weights = {0: weights[2], 1: weights[1], 2: weights[0]}
    rev = (shape[2], shape[1], shape[0])
    i0, i1, w0, w1 = weights[0]
    out = torch.empty((c, *rev), dtype=torch.float32, device=dev)
    step = max(1, slab_voxels // max(1, rev[1] * rev[2]))
    for z0 in range(0, rev[0], step):
        sl = slice(z0, min(rev[0], z0 + step))
        a, b = i0[sl], i1[sl]
        first = int(torch.minimum(a.min(), b.min()))
        last = int(torch.maximum(a.max(), b.max()))
        planes = last_axes(vol[:, first: last + 1])  # the low planes this slab needs
        torch.add(planes[:, a - first] * w0[sl].view(1, -1, 1, 1),
                  planes[:, b - first] * w1[sl].view(1, -1, 1, 1), out=out[:, sl])
    return out.permute(0, 3, 2, 1)  # (C, X, Y, Z), a view of the (C, Z, Y, X) memory

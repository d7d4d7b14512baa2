"""Figures of the audit report, drawn with matplotlib (Agg) into PNG bytes.

Every slice is drawn in millimetres (``extent`` in mm, equal aspect), so anisotropic
voxels keep their physical proportions. Volumes are first brought to the closest RAS
axis order with :mod:`nibabel.orientations` (no resampling: an oblique scan is shown along
its nearest anatomical axes). Slices follow the radiological convention: the patient's
right is on the image's left in axial and coronal views, anterior is on the left in
sagittal views; the side letters are drawn on every view, and each view's title gives the
slice's position in mm in DICOM patient coordinates (LPS: x to the patient's left, y
posterior, z superior), the coordinates the napari viewer's status bar and a PACS viewer
show.

Colours are the napari viewer's: the map in ``inferno`` on a fixed 0-1 scale, cut hard at
the display threshold (:data:`DISPLAY_THRESHOLD`, the viewer's default): values below it
are fully transparent, values above it drawn at one opacity over the grey scan. A lesion
mask, when given, is drawn as an outline (cyan); a segmentation target's explained region
(the audit's ``cam_region.nii.gz``) as an outline in :data:`REGION_COLOUR`, with a third row
of slices through the region and a legend naming it.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# The display threshold and colormap are the viewer's: defined once in icam_med.display.
from icam_med.display import DISPLAY_THRESHOLD, MAP_CMAP, REGION_COLOUR

__all__ = [
    "DISPLAY_THRESHOLD",
    "REGION_COLOUR",
    "RASVolume",
    "class_pair_png",
    "confusion_png",
    "layer_weights_png",
    "montage_figure",
    "montage_png",
    "score_distribution_png",
    "to_ras",
]

#: Opacity of the map where it is drawn over the scan.
OVERLAY_OPACITY = 0.7
#: The mask outline's colour.
MASK_COLOUR = "#00e5ff"
#: Line width (points) of a segmentation target's region outline.
REGION_LINE_WIDTH = 1.5


@dataclass(frozen=True)
class RASVolume:
    """A volume in (closest) RAS axis order with its voxel size in mm per axis and its
    voxel-to-RAS affine (for slice positions in mm; ``None``: positions unknown)."""

    data: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray | None = None

    def position_mm(self, axis: int, index: int, point: Sequence[int]) -> float | None:
        """The RAS coordinate (mm) along ``axis`` of voxel ``point`` with ``point[axis]``
        set to ``index``: the plane's position for an axis-aligned volume."""
        if self.affine is None:
            return None
        v = [float(c) for c in point]
        v[axis] = float(index)
        return float((self.affine @ np.array([*v, 1.0]))[axis])

    def position_lps(self, axis: int, index: int, point: Sequence[int]) -> float | None:
        """:meth:`position_mm` in DICOM patient coordinates (LPS): x and y change sign."""
        mm = self.position_mm(axis, index, point)
        return None if mm is None else (-mm if axis < 2 else mm) + 0.0


def to_ras(data: Any, affine: Any) -> RASVolume:
    """Reorder/flip a 3-D array to the closest RAS axis order (no interpolation).

    Args:
        data: ``(X, Y, Z)`` or ``(1, X, Y, Z)`` array or tensor.
        affine: its 4x4 voxel-to-RAS affine.
    """
    import nibabel.orientations as nio

    a = data.detach().cpu().numpy() if hasattr(data, "detach") else np.asarray(data)
    a = np.asarray(a, dtype=np.float32)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3:
        raise ValueError(f"expected a 3-D volume, got an array of shape {a.shape}.")
    aff = np.asarray(affine.detach().cpu().numpy() if hasattr(affine, "detach") else affine,
                     dtype=np.float64)
    ornt = nio.io_orientation(aff)
    out = nio.apply_orientation(a, ornt)
    new_aff = aff @ nio.inv_ornt_aff(ornt, a.shape)
    spacing = tuple(float(np.linalg.norm(new_aff[:3, i])) or 1.0 for i in range(3))
    return RASVolume(np.ascontiguousarray(out), spacing, new_aff)  # type: ignore[arg-type]


def _fig_png(fig: Any, dpi: int) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()


def _figure(width: float, height: float) -> Any:
    """A figure on the Agg canvas, without pyplot: no global backend or figure state is
    touched, so the report can be built inside a GUI (napari) or in worker threads."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


# (name, fixed RAS axis, (horizontal axis, vertical axis), side letters left/right/bottom/top)
_VIEWS = (
    ("axial", 2, (0, 1), ("R", "L", "P", "A")),
    ("coronal", 1, (0, 2), ("R", "L", "I", "S")),
    ("sagittal", 0, (1, 2), ("A", "P", "I", "S")),
)


def _slice(vol: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The 2-D slice, indexed ``[vertical, horizontal]`` for ``imshow(origin="lower")``."""
    return np.take(vol, index, axis=axis).T


def _overlay_rgba(values: np.ndarray, cmap: Any, threshold: float) -> np.ndarray:
    """The map's colours on a fixed 0-1 scale, fully transparent below ``threshold`` (a hard
    cut, no re-stretch) and at :data:`OVERLAY_OPACITY` from it up."""
    v = np.clip(values, 0.0, 1.0)
    rgba = cmap(v)
    rgba[..., 3] = np.where(v < threshold, 0.0, OVERLAY_OPACITY)
    return rgba


def _title(view: str, axis: int, vol: RASVolume, point: Sequence[int]) -> str:
    """``axial, z = +12.0 mm``: the plane's LPS position, as the viewer's status bar says."""
    mm = vol.position_lps(axis, point[axis], point)
    name = "xyz"[axis]
    where = f"{name} = {mm:+.1f} mm" if mm is not None else f"slice {point[axis] + 1}"
    return f"{view}, {where}"


def _label_sides(ax: Any, sides: Sequence[str]) -> None:
    """Hide the ticks of a slice panel and name its four sides (left, right, bottom, top)."""
    ax.set_xticks([])
    ax.set_yticks([])
    kw = {"transform": ax.transAxes, "color": "yellow", "fontsize": 9, "fontweight": "bold"}
    ax.text(0.02, 0.5, sides[0], ha="left", va="center", **kw)
    ax.text(0.98, 0.5, sides[1], ha="right", va="center", **kw)
    ax.text(0.5, 0.02, sides[2], ha="center", va="bottom", **kw)
    ax.text(0.5, 0.98, sides[3], ha="center", va="top", **kw)


def _grey_window(scan_ras: RASVolume | None) -> tuple[np.ndarray | None, float, float]:
    """The scan (if any) and its 1st-99th percentile window."""
    if scan_ras is None:
        return None, 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(scan_ras.data, [1, 99]))
    return scan_ras.data, lo, (hi if hi > lo else lo + 1.0)


def _outline(ax: Any, vol: np.ndarray, axis: int, index: int, spacing: Sequence[float],
             h: int, v: int, colour: str, width: float) -> None:
    """The 0.5 iso-line of a 0/1 volume on one slice (voxel centres in mm), if the slice
    cuts its border (a slice one voxel thick, the side views of a 2-D image, has none)."""
    ms = _slice(vol, axis, index)
    if min(ms.shape) >= 2 and ms.any() and not ms.all():
        xs = (np.arange(ms.shape[1]) + 0.5) * spacing[h]
        ys = (np.arange(ms.shape[0]) + 0.5) * spacing[v]
        ax.contour(xs, ys, ms, levels=[0.5], colors=colour, linewidths=width)


def _draw_view(ax: Any, map_ras: RASVolume, grey: Any, window: tuple[float, float],
               mask: np.ndarray | None, view: tuple, point: Sequence[int],
               peak: Sequence[int], cmap: Any, threshold: float,
               region: np.ndarray | None = None) -> None:
    """One slice panel: scan, map (cut at ``threshold``), mask and region outlines, peak,
    side letters and the plane's LPS position, in mm and in radiological orientation."""
    name, axis, (h, v), sides = view
    m = map_ras.data
    size_mm = np.array(m.shape) * np.array(map_ras.spacing)
    extent = (0.0, size_mm[h], 0.0, size_mm[v])
    if grey is not None:
        ax.imshow(_slice(grey, axis, point[axis]), cmap="gray", vmin=window[0], vmax=window[1],
                  origin="lower", extent=extent, interpolation="nearest")
        ax.imshow(_overlay_rgba(_slice(m, axis, point[axis]), cmap, threshold),
                  origin="lower", extent=extent, interpolation="nearest")
    else:
        ax.imshow(_slice(m, axis, point[axis]), cmap=cmap, vmin=0.0, vmax=1.0,
                  origin="lower", extent=extent, interpolation="nearest")
    if mask is not None:
        _outline(ax, mask, axis, point[axis], map_ras.spacing, h, v, MASK_COLOUR, 1.2)
    if region is not None:
        _outline(ax, region, axis, point[axis], map_ras.spacing, h, v, REGION_COLOUR,
                 REGION_LINE_WIDTH)
    # Radiological display: the patient's right (sagittal: anterior) on the left.
    ax.set_xlim(size_mm[h], 0.0)
    ax.set_ylim(0.0, size_mm[v])
    ax.set_aspect("equal")
    if point[axis] == peak[axis]:
        ax.plot([(peak[h] + 0.5) * map_ras.spacing[h]], [(peak[v] + 0.5) * map_ras.spacing[v]],
                marker="+", color="white", markersize=12, mew=1.5)
    _label_sides(ax, sides)
    ax.set_title(_title(name, axis, map_ras, point), fontsize=9)


def _peak(m: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(m)), m.shape))


def _mask_of(mask_ras: RASVolume | None, shape: tuple[int, ...]) -> np.ndarray | None:
    if mask_ras is None or mask_ras.data.shape != shape:
        return None
    return (mask_ras.data != 0).astype(np.float32)


def _region_point(region: np.ndarray) -> tuple[int, ...]:
    """The region's voxel nearest its centroid (a concave region's centroid may lie
    outside it): the slices through it cut the region."""
    idx = np.argwhere(region > 0)
    d2 = ((idx - idx.mean(0)) ** 2).sum(1)
    return tuple(int(i) for i in idx[int(np.argmin(d2))])


def _outline_legend(fig: Any, region_label: str, outlined_mask: bool) -> None:
    """The legend of the outlines, under the panels (figures with a region only)."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=REGION_COLOUR, lw=REGION_LINE_WIDTH, label=region_label)]
    if outlined_mask:
        handles.append(Line2D([], [], color=MASK_COLOUR, lw=1.2, label="given mask"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8,
               frameon=False)


def _colorbar(fig: Any, axes: Any, cmap: Any, threshold: float, over_scan: bool,
              outlined: bool) -> None:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    cbar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), cmap), ax=axes, shrink=0.8,
                        pad=0.01)
    if over_scan:
        cbar.ax.axhspan(0.0, threshold, color="white", alpha=0.85)
        cbar.ax.axhline(threshold, color="black", lw=1)
        text = f"map value (0-1); transparent below {threshold:g}"
    else:
        text = "map value (0-1)"
    if outlined:
        text += "; outline: mask"
    cbar.set_label(text, fontsize=8)


def montage_figure(map_ras: RASVolume, scan_ras: RASVolume | None, *,
                   title: str = "", mask_ras: RASVolume | None = None,
                   threshold: float = DISPLAY_THRESHOLD, region_ras: RASVolume | None = None,
                   region_label: str = "explained region") -> Any:
    """The figure of :func:`montage_png` (a matplotlib ``Figure`` on the Agg canvas); its
    rows of panels are ``fig.axes[:3 * rows]`` in row order, the colour bar after them."""
    import matplotlib

    m = map_ras.data
    peak = _peak(m)
    centre = tuple(s // 2 for s in m.shape)
    grey, lo, hi = _grey_window(scan_ras)
    mask = _mask_of(mask_ras, m.shape)
    region = _mask_of(region_ras, m.shape)
    if region is not None and not region.any():
        region = None
    rows = [("through the map's peak", peak), ("through the scan's centre", centre)]
    if region is not None and min(m.shape) > 1:  # (a 2-D image shows it whole already)
        rows.append(("through the region", _region_point(region)))
    cmap = matplotlib.colormaps[MAP_CMAP]
    fig = _figure(9.6, 3.3 * len(rows))
    axes = fig.subplots(len(rows), 3)
    for row, (label, point) in enumerate(rows):
        for col, view in enumerate(_VIEWS):
            _draw_view(axes[row, col], map_ras, grey, (lo, hi), mask, view, point, peak, cmap,
                       threshold, region)
        axes[row, 0].set_ylabel(label, fontsize=9)
    _colorbar(fig, axes, cmap, threshold, grey is not None, mask is not None)
    if region is not None:
        _outline_legend(fig, region_label, mask is not None)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def montage_png(map_ras: RASVolume, scan_ras: RASVolume | None, *,
                title: str = "", dpi: int = 80, mask_ras: RASVolume | None = None,
                threshold: float = DISPLAY_THRESHOLD, region_ras: RASVolume | None = None,
                region_label: str = "explained region") -> bytes:
    """Axial, coronal and sagittal slices through the map's peak and the volume's centre.

    The map (``[0, 1]``, ``inferno``) is drawn over the scan (grey, 1st-99th percentile
    window), transparent below ``threshold``, with a colour bar marking the threshold;
    without a scan the map is drawn alone. A cross marks the map's peak; the mask, if
    given (same grid), is outlined. Titles give each plane's LPS position in mm.

    A segmentation target's explained region (``region_ras``, same grid, non-zero inside)
    is outlined in :data:`REGION_COLOUR` on every panel it crosses, a third row of slices
    runs through it (its voxel nearest its centroid; not for a 2-D image, whose one plane
    shows it whole), and a legend names it
    (``region_label``). Without a region the figure is the two-row one.
    """
    return _fig_png(montage_figure(map_ras, scan_ras, title=title, mask_ras=mask_ras,
                                   threshold=threshold, region_ras=region_ras,
                                   region_label=region_label), dpi)


def _weights_bars(ax: Any, weights: Mapping[str, float], top: float) -> None:
    names = list(weights)
    values = [float(weights[n]) for n in names]
    pos = np.arange(len(names))
    ax.barh(pos, values, color="#3b6ea5")
    ax.set_yticks(pos, [n if len(n) <= 22 else "..." + n[-19:] for n in names], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, top)
    for p, val in zip(pos, values, strict=True):
        ax.text(val, p, f" {val:.2f}", va="center", fontsize=7)
    ax.set_xlabel("layer weight", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)


def class_pair_png(first: RASVolume, second: RASVolume, scan_ras: RASVolume | None, *,
                   labels: Sequence[str], weights: Sequence[Mapping[str, float]],
                   title: str = "", dpi: int = 80, mask_ras: RASVolume | None = None,
                   threshold: float = DISPLAY_THRESHOLD, region_ras: RASVolume | None = None,
                   region_label: str = "explained region") -> bytes:
    """Misclassification analysis: the predicted class's map (top row) beside the map of
    the class it competes with (bottom row), axial, coronal and sagittal slices each
    through its own map's peak (marked +: where the model found the most evidence for
    that class; the titles give the planes' LPS positions), each row with its per-layer
    weights on one shared scale.

    Args:
        first, second: the two maps on one grid (RAS order, as :func:`to_ras` gives).
        scan_ras: the scan under both, or ``None``.
        labels: each row's name (e.g. ``predicted 'absent' (p = 0.97)``).
        weights: each map's per-layer weights, in network order.
        region_ras, region_label: a segmentation target's region, outlined on every panel
            with a legend (see :func:`montage_png`).
    """
    import matplotlib

    if first.data.shape != second.data.shape:
        raise ValueError(f"the two maps are on different grids ({first.data.shape} and "
                         f"{second.data.shape}); they must come from one scan.")
    peak = _peak(first.data)
    peak2 = _peak(second.data)
    grey, lo, hi = _grey_window(scan_ras)
    mask = _mask_of(mask_ras, first.data.shape)
    region = _mask_of(region_ras, first.data.shape)
    if region is not None and not region.any():
        region = None
    cmap = matplotlib.colormaps[MAP_CMAP]
    fig = _figure(12.0, 6.6)
    axes = fig.subplots(2, 4, width_ratios=[1, 1, 1, 0.8])
    top = max([1e-9, *(float(v) for w in weights for v in w.values())]) * 1.25
    for row, (vol, label, w) in enumerate(zip((first, second), labels, weights, strict=True)):
        for col, view in enumerate(_VIEWS):
            ax = axes[row, col]
            own = peak if row == 0 else peak2
            _draw_view(ax, vol, grey, (lo, hi), mask, view, own, own, cmap, threshold,
                       region)
        axes[row, 0].set_ylabel(label, fontsize=9)
        _weights_bars(axes[row, 3], w, top)
        axes[row, 3].set_title("per-layer weights", fontsize=9)
    _colorbar(fig, axes[:, :3], cmap, threshold, grey is not None, mask is not None)
    if region is not None:
        _outline_legend(fig, region_label, mask is not None)
    if title:
        fig.suptitle(title, fontsize=10)
    return _fig_png(fig, dpi)


def layer_weights_png(weights: Mapping[str, float], *, dpi: int = 80) -> bytes:
    """Horizontal bars: each layer's weight in the fused map, shallow layers on top."""
    names = list(weights)
    values = [float(weights[n]) for n in names]
    fig = _figure(4.6, 0.45 * max(len(names), 2) + 0.9)
    ax = fig.subplots()
    pos = np.arange(len(names))
    ax.barh(pos, values, color="#3b6ea5")
    ax.set_yticks(pos, [n if len(n) <= 28 else "..." + n[-25:] for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max([1e-9, *values]) * 1.18)
    for p, val in zip(pos, values, strict=True):
        ax.text(val, p, f" {val:.3f}", va="center", fontsize=8)
    ax.set_xlabel("layer weight (weights sum to 1)", fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    return _fig_png(fig, dpi)


def confusion_png(matrix: np.ndarray, expected: Sequence[str], predicted: Sequence[str], *,
                  dpi: int = 80) -> bytes:
    """Counts of expected (rows) vs predicted (columns) labels."""
    n_r, n_c = matrix.shape
    fig = _figure(1.2 * n_c + 2.2, 1.0 * n_r + 1.6)
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(1, int(matrix.max())))
    for i in range(n_r):
        for j in range(n_c):
            color = "white" if matrix[i, j] > matrix.max() / 2 else "black"
            ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", color=color,
                    fontsize=11)
    ax.set_xticks(range(n_c), list(predicted), fontsize=9)
    ax.set_yticks(range(n_r), list(expected), fontsize=9)
    ax.set_xlabel("predicted")
    ax.set_ylabel("expected")
    ax.set_title("confusion matrix", fontsize=10)
    return _fig_png(fig, dpi)


def score_distribution_png(groups: Mapping[str, Sequence[float]], *, threshold: float,
                           dpi: int = 80) -> bytes:
    """Stacked histogram of the predicted class's probability by outcome group."""
    colours = {"correct": "#4c9a2a", "wrong": "#c0392b", "no expected label": "#7f8c8d"}
    fig = _figure(5.2, 3.0)
    ax = fig.subplots()
    data = [list(v) for v in groups.values()]
    if any(data):
        ax.hist(data, bins=np.linspace(0, 1, 21), stacked=True,
                label=[f"{k} ({len(v)})" for k, v in groups.items()],
                color=[colours.get(k, "#34495e") for k in groups])
        ax.legend(fontsize=8, loc="upper left")
    ax.axvline(threshold, color="black", ls="--", lw=1)
    ax.text(threshold, ax.get_ylim()[1] * 0.95, " confident", fontsize=8, va="top")
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability of the predicted class")
    ax.set_ylabel("scans")
    ax.set_title("score distribution", fontsize=10)
    return _fig_png(fig, dpi)

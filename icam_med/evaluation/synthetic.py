"""Deterministic synthetic lesions on the MNI152 brain, with their ground-truth masks.

This is the data behind the demo model and the evaluation suite: a real anatomical
background (the MNI152 ICBM 2009 T1 template that ships inside nilearn, no download) and
a lesion whose extent is known exactly, so that a saliency map can be scored against the
truth.

Every volume is a pure function of ``(seed, split, index)``: the same arguments give the
same bytes on any machine, in any order, so training and held-out sets are generated on
the fly and never shipped, and the ``"train"`` and ``"test"`` splits never share a volume.

What varies from volume to volume (all in physical units, so one generator serves the
2 mm sample grid and the 4 mm model grid alike):

* lesion present or absent (``p_present``);
* size (mean radius ``radius_mm``), elongation (axis ratios 0.55-1), orientation (a
  random rotation) and an irregular outline (a smooth random perturbation of the radius);
* contrast: ``contrast`` times the brain's intensity standard deviation, hyper-intense
  with probability ``p_hyper`` (the demo uses hyper-intense lesions only, see
  ``sample_data/MODEL_CARD.md``), else hypo-intense, with a mild internal texture;
* location: anywhere in the brain where the lesion fits (centre at least ``0.6 x`` its
  largest radius from the brain's edge), the lesion clipped to the brain;
* nuisances applied to every volume, lesion or not: a smooth multiplicative bias field,
  Gaussian noise inside the brain, a slight blur, and a small rigid shift.

The mask is the set of voxels whose lesion occupancy exceeds one half, after the shift.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "INTENSITY_TRANSFORMS",
    "SPLITS",
    "EvalSynthesizer",
    "EvalSyntheticVolume",
    "LesionSynthesizer",
    "SyntheticVolume",
    "apply_transforms",
    "input_space_synthesizer",
    "mni_brain",
    "normalise",
    "normalise_with_twin",
    "split_preprocessing",
]

#: Named, disjoint random streams: the held-out set never meets the training set.
SPLITS: dict[str, int] = {"train": 0, "validation": 1, "test": 2, "sample": 3}

#: MONAI dictionary transforms that change intensities only. In a demo-style pipeline they
#: come after every spatial transform, so synthetic data can be drawn on the spatially
#: preprocessed template and then normalised exactly as a real scan would be.
INTENSITY_TRANSFORMS = frozenset({
    "NormalizeIntensityd",
    "ScaleIntensityd",
    "ScaleIntensityRanged",
    "ScaleIntensityRangePercentilesd",
    "ClipIntensityPercentilesd",
    "ThresholdIntensityd",
})

#: Scanner-like units for the sample brain: the template (0-1) times this, stored as int16.
MNI_SCALE = 1000.0


@dataclass(frozen=True)
class SyntheticVolume:
    """One generated volume.

    Attributes:
        image: float32 array on the generator's grid (``(X, Y, Z)`` for a 3D template).
        mask: bool array of the same shape; the lesion (all False when absent).
        label: 1 when a lesion is present, else 0.
        params: JSON-serialisable description of what was drawn (lesion centre in voxels,
            radii in mm, contrast, polarity, nuisances).
    """

    image: np.ndarray
    mask: np.ndarray
    label: int
    params: dict[str, Any] = field(default_factory=dict)


def mni_brain(resolution_mm: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The skull-stripped MNI152 (ICBM 2009) T1 template from nilearn, in scanner-like units.

    nilearn resamples its packaged 1 mm template to ``resolution_mm``; no download happens.
    Interpolation leaves values of order 1e-16 outside the brain: they are set to exactly
    zero (so a NIfTI copy and a DICOM copy of the volume hold the same data), and the
    template is scaled by :data:`MNI_SCALE` and rounded, as an int16 MR image would be.

    Returns:
        ``(image, affine, brain_mask)``: float32 ``(X, Y, Z)`` RAS image, its 4x4 affine and
        the bool brain mask (the template's non-zero voxels).

    Raises:
        ValueError: nilearn is not installed (it is part of the ``data`` extra).
    """
    try:
        from nilearn.datasets import load_mni152_template
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ValueError(
            "the MNI152 sample brain needs nilearn; install the 'data' extra "
            "(pip install 'icam-med[data]')."
        ) from exc
    img = load_mni152_template(resolution=resolution_mm)
    data = np.asarray(img.get_fdata(dtype=np.float32))
    data = np.where(data > 1e-3, data, 0.0)
    image = np.round(data * MNI_SCALE).astype(np.float32)
    return image, np.asarray(img.affine, dtype=np.float64), image > 0


def _random_rotation(rng: np.random.Generator, ndim: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(ndim, ndim)))
    return q * np.sign(np.diag(r))


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: Sequence[float]
                  ) -> np.ndarray:
    """Zero-mean, unit-max smooth random field (Gaussian-filtered white noise)."""
    f = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), sigma=sigma_vox,
                                mode="nearest")
    f -= f.mean()
    peak = float(np.abs(f).max())
    return f / peak if peak > 0 else f


class LesionSynthesizer:
    """Seeded generator of brain volumes with or without a lesion.

    Args:
        template: the healthy background, an ``(X, Y, Z)`` (or 2D) float array.
        brain_mask: bool array, where lesions may be placed (and where noise is added).
        spacing: voxel size in mm along each axis.
        seed: base seed; ``(seed, split, index)`` determines a volume completely.
        p_present: probability that a volume holds a lesion.
        radius_mm: range of the lesion's mean radius.
        contrast: range of the lesion's contrast, in units of the brain's intensity SD.
        p_hyper: probability that a lesion is hyper-intense (else hypo-intense).
        noise: range of the noise SD, in units of the brain's intensity SD.
        bias_field: largest relative amplitude of the multiplicative bias field.
        blur_vox: largest Gaussian blur sigma, in voxels.
        max_shift_mm: largest rigid shift along each axis.
    """

    def __init__(self, template: np.ndarray, brain_mask: np.ndarray, spacing: Sequence[float],
                 *, seed: int = 0, p_present: float = 0.5,
                 radius_mm: tuple[float, float] = (6.0, 14.0),
                 contrast: tuple[float, float] = (2.0, 3.5), p_hyper: float = 1.0,
                 noise: tuple[float, float] = (0.02, 0.06), bias_field: float = 0.05,
                 blur_vox: float = 0.5, max_shift_mm: float = 0.0) -> None:
        template = np.asarray(template, dtype=np.float32)
        brain_mask = np.asarray(brain_mask, dtype=bool)
        if template.shape != brain_mask.shape:
            raise ValueError(
                f"template shape {template.shape} and brain_mask shape {brain_mask.shape} differ."
            )
        spacing = tuple(float(s) for s in spacing)
        if len(spacing) != template.ndim or any(s <= 0 for s in spacing):
            raise ValueError(
                f"spacing must give one positive size (mm) per axis of the {template.ndim}-D "
                f"template, got {spacing}."
            )
        if not brain_mask.any():
            raise ValueError("brain_mask is empty: there is nowhere to place a lesion.")
        if not 0.0 <= p_present <= 1.0:
            raise ValueError(f"p_present must lie in [0, 1], got {p_present}.")
        if not 0 < radius_mm[0] <= radius_mm[1]:
            raise ValueError(f"radius_mm must be (low, high) with 0 < low <= high, got {radius_mm}.")
        self.template = template
        self.brain_mask = brain_mask
        self.spacing = np.asarray(spacing)
        self.seed = int(seed)
        self.p_present = float(p_present)
        self.radius_mm = (float(radius_mm[0]), float(radius_mm[1]))
        self.contrast = (float(contrast[0]), float(contrast[1]))
        if not 0.0 <= p_hyper <= 1.0:
            raise ValueError(f"p_hyper must lie in [0, 1], got {p_hyper}.")
        self.p_hyper = float(p_hyper)
        self.noise = (float(noise[0]), float(noise[1]))
        self.bias_field = float(bias_field)
        self.blur_vox = float(blur_vox)
        self.max_shift_mm = float(max_shift_mm)
        self.brain_sd = float(template[brain_mask].std())
        # Depth of every brain voxel (mm to the nearest non-brain voxel): where centres may go.
        self._depth = ndimage.distance_transform_edt(brain_mask, sampling=spacing)
        self._coords = np.stack(
            np.meshgrid(*[np.arange(n, dtype=np.float32) * s
                          for n, s in zip(template.shape, spacing, strict=True)],
                        indexing="ij"), axis=-1)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.template.shape)

    def rng(self, index: int, split: str = "train") -> np.random.Generator:
        """The random stream of one volume."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}.")
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}.")
        return np.random.default_rng([self.seed, SPLITS[split], int(index)])

    def lesion_occupancy(self, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
        """Draw one lesion: soft occupancy in [0, 1] on the template grid, and its parameters."""
        ndim = self.template.ndim
        mean_r = rng.uniform(*self.radius_mm)
        ratios = rng.uniform(0.55, 1.0, size=ndim)
        radii = mean_r * ratios / np.exp(np.log(ratios).mean())  # geometric mean = mean_r
        rot = _random_rotation(rng, ndim)
        min_depth = 0.6 * float(radii.max())
        candidates = np.flatnonzero(self._depth >= min_depth)
        if candidates.size == 0:
            candidates = np.flatnonzero(self._depth >= self._depth.max() * 0.5)
        flat = int(candidates[rng.integers(candidates.size)])
        centre_vox = np.array(np.unravel_index(flat, self.shape), dtype=np.float64)
        centre_vox += rng.uniform(-0.5, 0.5, size=ndim)
        centre_mm = centre_vox * self.spacing
        rel = (self._coords - centre_mm.astype(np.float32)) @ rot.astype(np.float32)
        rho = np.sqrt(((rel / radii.astype(np.float32)) ** 2).sum(-1))
        # Irregular outline: the radius varies smoothly by up to +-irregularity.
        irregularity = rng.uniform(0.0, 0.35)
        sigma = np.maximum(mean_r * 0.5 / self.spacing, 0.5)
        wobble = _smooth_field(rng, self.shape, sigma)
        signed_mm = (1.0 - rho / (1.0 + irregularity * wobble)) * mean_r
        edge_mm = 0.5 * float(self.spacing.min())
        occupancy = 1.0 / (1.0 + np.exp(-np.clip(signed_mm / edge_mm, -30, 30)))
        occupancy = (occupancy * self.brain_mask).astype(np.float32)
        params = {
            "centre_vox": [round(float(c), 3) for c in centre_vox],
            "mean_radius_mm": round(float(mean_r), 3),
            "radii_mm": [round(float(r), 3) for r in radii],
            "irregularity": round(float(irregularity), 3),
        }
        return occupancy, params

    def __call__(self, index: int, split: str = "train", label: int | None = None
                 ) -> SyntheticVolume:
        """Generate volume ``index`` of ``split``.

        Args:
            index: position in the split (any non-negative integer).
            split: one of :data:`SPLITS`.
            label: force a lesion (1) or none (0); default draws it with ``p_present``.
        """
        rng = self.rng(index, split)
        present = bool(rng.uniform() < self.p_present) if label is None else bool(label)
        image = self.template.copy()
        occupancy = np.zeros(self.shape, dtype=np.float32)
        params: dict[str, Any] = {"split": split, "index": int(index), "seed": self.seed}
        if present:
            occupancy, lesion = self.lesion_occupancy(rng)
            polarity = 1.0 if rng.uniform() < self.p_hyper else -1.0
            contrast = rng.uniform(*self.contrast)
            texture = 1.0 + 0.2 * _smooth_field(rng, self.shape, 1.0)
            image = image + polarity * contrast * self.brain_sd * occupancy * texture
            lesion.update(polarity="hyper" if polarity > 0 else "hypo",
                          contrast_sd=round(float(contrast), 3))
            params["lesion"] = lesion
        # Nuisances, for every volume.
        bias_amp = rng.uniform(0.0, self.bias_field)
        bias_sigma = np.asarray(self.shape, dtype=np.float64) / 4.0
        image = image * (1.0 + bias_amp * _smooth_field(rng, self.shape, bias_sigma))
        noise_sd = rng.uniform(*self.noise) * self.brain_sd
        image = image + self.brain_mask * rng.normal(0.0, noise_sd, size=self.shape)
        floor = 0.02 * self.brain_sd  # keep the brain non-zero (background stays exactly 0)
        image = np.where(self.brain_mask, np.maximum(image, floor), 0.0).astype(np.float32)
        blur = rng.uniform(0.0, self.blur_vox)
        if blur > 0.05:
            image = ndimage.gaussian_filter(image, blur, mode="constant")
        shift_vox = rng.uniform(-self.max_shift_mm, self.max_shift_mm, size=image.ndim) / self.spacing
        image = ndimage.shift(image, shift_vox, order=1, mode="constant", cval=0.0)
        occupancy = ndimage.shift(occupancy, shift_vox, order=1, mode="constant", cval=0.0)
        image = np.where(image > 1e-3 * self.brain_sd, image, 0.0).astype(np.float32)
        params["nuisance"] = {
            "bias_amplitude": round(float(bias_amp), 4),
            "noise_sd": round(float(noise_sd / self.brain_sd), 4),
            "blur_vox": round(float(blur), 3),
            "shift_vox": [round(float(s), 3) for s in shift_vox],
        }
        mask = occupancy > 0.5
        if present and not mask.any():  # a lesion shifted out of view: keep its peak voxel
            mask = occupancy >= occupancy.max()
        return SyntheticVolume(image=image, mask=mask, label=int(present), params=params)


#: Sub-streams of one evaluation volume: each part of a volume draws from its own stream,
#: so the healthy twin (no lesion) shares every other draw with its lesioned volume, and
#: the distractors cannot depend on the label.
_STREAMS = {"label": 0, "lesion": 1, "nuisance": 2, "distractor": 3}
POLARITIES = ("hypo", "hyper")


@dataclass(frozen=True, kw_only=True)
class EvalSyntheticVolume(SyntheticVolume):
    """One volume of the evaluation benchmark (see :class:`EvalSynthesizer`).

    Attributes:
        twin: the healthy twin: the same volume (same anatomy, nuisances and distractors)
            without the lesion(s); equal to ``image`` outside the lesions' footprint.
        distractor_mask: bool mask of the bright structures outside the brain (independent
            of the label).
        polarity: ``"hypo"`` or ``"hyper"`` (every lesion of a volume shares it), ``None``
            for a healthy volume.
        n_lesions: number of lesions (0, 1 or 2).
    """

    twin: np.ndarray | None
    distractor_mask: np.ndarray
    polarity: str | None = None
    n_lesions: int = 0


class EvalSynthesizer(LesionSynthesizer):
    """The harder generator of the evaluation benchmark (issue 11).

    Unlike the demo's :class:`LesionSynthesizer` (bright lesions only, one per volume):

    * lesions of both polarities, hypo-intense (like CT infarcts or T1 black holes) with
      probability ``1 - p_hyper`` (0.5 by default), else hyper-intense; every lesion of a
      volume shares the polarity, so each volume is counted once per polarity;
    * one lesion, or two with probability ``p_two``;
    * ``distractors`` (a ``(low, high)`` count) bright structures outside the brain, in
      every volume, drawn from their own random stream so they are independent of the
      label, with their own mask: a model must learn to ignore them, and a map that
      peaks on one is wrong;
    * each volume's healthy twin (same seed, no lesion), for counterfactual deletion.

    Each part of a volume draws from its own stream ``(seed, split, index, part)``, so the
    twin shares the anatomy, nuisances and distractors of its volume exactly; the two
    differ only in the lesions' footprint: the lesion (``mask``, occupancy > 1/2), its
    soft rim (occupancy 1/4 to 1/2) and the blur's reach, at most 5 voxels from the mask
    and mostly inside it. Splits are disjoint streams (:data:`SPLITS`).

    Args:
        template: the healthy background.
        brain_mask: where lesions may be placed; distractors go outside it.
        spacing: voxel size in mm.
        seed: base seed.
        p_hyper: probability of a hyper-intense lesion.
        p_two: probability of two lesions instead of one.
        distractors: range of the number of distractors per volume (inclusive).
        distractor_radius_mm: range of a distractor's radius.
        distractor_contrast: range of a distractor's intensity above the brain's mean, in
            brain SDs.
        distractor_gap_mm: smallest distance from a distractor's surface to the brain.
        **options: the other :class:`LesionSynthesizer` options (``p_present``,
            ``radius_mm``, ``contrast``, ``noise``, ``bias_field``, ``blur_vox``).
    """

    def __init__(self, template: np.ndarray, brain_mask: np.ndarray, spacing: Sequence[float],
                 *, seed: int = 0, p_hyper: float = 0.5, p_two: float = 0.5,
                 distractors: tuple[int, int] = (1, 2),
                 distractor_radius_mm: tuple[float, float] = (6.0, 10.0),
                 distractor_contrast: tuple[float, float] = (3.0, 5.0),
                 distractor_gap_mm: float = 4.0, **options: Any) -> None:
        if options.get("max_shift_mm", 0.0):
            raise ValueError("EvalSynthesizer does not shift volumes (the twin and the masks "
                             "must stay on the template's grid); leave max_shift_mm at 0.")
        super().__init__(template, brain_mask, spacing, seed=seed, p_hyper=p_hyper, **options)
        if not 0.0 <= p_two <= 1.0:
            raise ValueError(f"p_two must lie in [0, 1], got {p_two}.")
        if not 0 <= distractors[0] <= distractors[1]:
            raise ValueError(f"distractors must be (low, high) with 0 <= low <= high, got "
                             f"{distractors}.")
        if not 0 < distractor_radius_mm[0] <= distractor_radius_mm[1]:
            raise ValueError("distractor_radius_mm must be (low, high) with 0 < low <= high, "
                             f"got {distractor_radius_mm}.")
        self.p_two = float(p_two)
        self.distractors = (int(distractors[0]), int(distractors[1]))
        self.distractor_radius_mm = (float(distractor_radius_mm[0]),
                                     float(distractor_radius_mm[1]))
        self.distractor_contrast = (float(distractor_contrast[0]), float(distractor_contrast[1]))
        self.distractor_gap_mm = float(distractor_gap_mm)
        self.brain_mean = float(template[brain_mask].mean())
        # Distance (mm) of every voxel to the brain, and to the edge of the field of view.
        self._outside = ndimage.distance_transform_edt(~brain_mask, sampling=spacing)
        edge = np.ones(self.shape, dtype=bool)
        edge[tuple(slice(1, -1) for _ in self.shape)] = False
        self._to_edge = ndimage.distance_transform_edt(~edge, sampling=spacing)
        if self.distractors[1] > 0 and not self._distractor_candidates(
                self.distractor_radius_mm[0]).size:
            raise ValueError(
                f"there is no room outside the brain for a distractor of radius "
                f"{self.distractor_radius_mm[0]} mm with a {self.distractor_gap_mm} mm gap in a "
                f"{self.shape} grid; lower distractor_radius_mm or distractor_gap_mm, or set "
                "distractors=(0, 0)."
            )

    def _distractor_candidates(self, radius: float) -> np.ndarray:
        ok = (self._outside >= radius + self.distractor_gap_mm) & (self._to_edge >= radius)
        return np.flatnonzero(ok)

    def streams(self, index: int, split: str = "train") -> dict[str, np.random.Generator]:
        """The independent random streams of one volume, by part."""
        self.rng(index, split)  # validates split and index
        return {name: np.random.default_rng([self.seed, SPLITS[split], int(index), k])
                for name, k in _STREAMS.items()}

    def _distractor_field(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray,
                                                                   list[dict[str, Any]]]:
        """Additive intensity of the distractors, their mask, and their parameters."""
        field_ = np.zeros(self.shape, dtype=np.float32)
        count = int(rng.integers(self.distractors[0], self.distractors[1] + 1))
        described = []
        for _ in range(count):
            radius = float(rng.uniform(*self.distractor_radius_mm))
            candidates = self._distractor_candidates(radius)
            if candidates.size == 0:
                radius = self.distractor_radius_mm[0]
                candidates = self._distractor_candidates(radius)
            flat = int(candidates[rng.integers(candidates.size)])
            centre = np.array(np.unravel_index(flat, self.shape), dtype=np.float64)
            centre_mm = centre * self.spacing
            ratios = rng.uniform(0.6, 1.0, size=len(self.shape))
            radii = radius * ratios / np.exp(np.log(ratios).mean())
            rot = _random_rotation(rng, len(self.shape))
            rel = (self._coords - centre_mm.astype(np.float32)) @ rot.astype(np.float32)
            rho = np.sqrt(((rel / radii.astype(np.float32)) ** 2).sum(-1))
            edge_mm = 0.5 * float(self.spacing.min())
            occ = 1.0 / (1.0 + np.exp(-np.clip((1.0 - rho) * radius / edge_mm, -30, 30)))
            occ = np.where(occ > 1e-3, occ, 0.0).astype(np.float32)
            occ *= ~self.brain_mask
            level = self.brain_mean + rng.uniform(*self.distractor_contrast) * self.brain_sd
            field_ = np.maximum(field_, level * occ)
            described.append({"centre_vox": [round(float(c), 3) for c in centre],
                              "radius_mm": round(radius, 3),
                              "level_sd_above_mean": round(
                                  (level - self.brain_mean) / self.brain_sd, 3)})
        return field_, field_ > 0.5 * field_.max() if count else np.zeros(self.shape, bool), \
            described

    def __call__(self, index: int, split: str = "train", label: int | None = None,
                 polarity: str | None = None, with_twin: bool = True) -> EvalSyntheticVolume:
        """Generate volume ``index`` of ``split`` with its healthy twin.

        Args:
            index: position in the split.
            split: one of :data:`SPLITS`.
            label: force a lesion (1) or none (0); default draws it with ``p_present``.
            polarity: force ``"hypo"`` or ``"hyper"`` lesions; default draws it with
                ``p_hyper``. Forcing changes nothing else of the volume.
            with_twin: render the healthy twin (training does not need it: ``twin`` is
                then ``None`` and the image equal up to float rounding, below 1e-4 of
                the brain's SD, outside the lesions' reach).
        """
        if polarity is not None and polarity not in POLARITIES:
            raise ValueError(f"polarity must be one of {POLARITIES} or None, got {polarity!r}.")
        rngs = self.streams(index, split)
        drawn = bool(rngs["label"].uniform() < self.p_present)
        present = drawn if label is None else bool(label)
        params: dict[str, Any] = {"split": split, "index": int(index), "seed": self.seed,
                                  "generator": "EvalSynthesizer"}
        # Lesions (their own stream; drawn for every volume so forcing the label or the
        # polarity changes nothing else).
        rng = rngs["lesion"]
        drawn_polarity = "hyper" if rng.uniform() < self.p_hyper else "hypo"
        n_lesions = 2 if rng.uniform() < self.p_two else 1
        lesion_field = np.zeros(self.shape, dtype=np.float32)
        occupancy = np.zeros(self.shape, dtype=np.float32)
        lesions = []
        pol = polarity or drawn_polarity
        sign = 1.0 if pol == "hyper" else -1.0
        for _ in range(n_lesions):
            occ, desc = self.lesion_occupancy(rng)
            # A hard edge on the soft rim keeps the footprint (where the twin differs)
            # within a voxel of the mask, plus the blur's reach.
            occ = np.where(occ > 0.25, occ, 0.0).astype(np.float32)
            contrast = rng.uniform(*self.contrast)
            texture = 1.0 + 0.2 * _smooth_field(rng, self.shape, 1.0)
            contribution = sign * contrast * self.brain_sd * occ * texture
            # Overlapping lesions: the stronger contribution wins, never a sum.
            lesion_field = np.where(np.abs(contribution) > np.abs(lesion_field), contribution,
                                    lesion_field).astype(np.float32)
            occupancy = np.maximum(occupancy, occ)
            desc["contrast_sd"] = round(float(contrast), 3)
            lesions.append(desc)
        distractor, distractor_mask, distractors = self._distractor_field(rngs["distractor"])
        # Nuisances (their own stream, shared by the volume and its twin).
        rng = rngs["nuisance"]
        bias_amp = rng.uniform(0.0, self.bias_field)
        bias_sigma = np.asarray(self.shape, dtype=np.float64) / 4.0
        bias = 1.0 + bias_amp * _smooth_field(rng, self.shape, bias_sigma)
        noise_sd = rng.uniform(*self.noise) * self.brain_sd
        noise = rng.normal(0.0, noise_sd, size=self.shape)
        blur = rng.uniform(0.0, self.blur_vox)
        support = self.brain_mask | (distractor > 0)
        floor = 0.02 * self.brain_sd

        def render(with_lesion: bool) -> np.ndarray:
            image = self.template + distractor
            if with_lesion:
                image = image + lesion_field
            image = image * bias + support * noise
            image = np.where(support, np.maximum(image, floor), 0.0).astype(np.float32)
            if blur > 0.05:
                image = ndimage.gaussian_filter(image, blur, mode="constant")
            return np.where(image > 1e-3 * self.brain_sd, image, 0.0).astype(np.float32)

        if present and not with_twin:
            twin, image = None, render(True)
        else:
            twin = render(False)
            image = twin.copy()
            if present:
                # Outside the lesions' reach (occupancy > 0 spread by the blur's radius)
                # the two renderings differ by float rounding only: keep the twin's bytes.
                reach = 1 + (int(4.0 * blur + 0.5) if blur > 0.05 else 0)  # scipy's radius
                footprint = ndimage.binary_dilation(occupancy > 0, iterations=reach)
                image = np.where(footprint, render(True), twin).astype(np.float32)
        mask = (occupancy > 0.5) if present else np.zeros(self.shape, dtype=bool)
        if present and not mask.any():
            mask = occupancy >= occupancy.max()
        if present:
            params["lesion"] = {"polarity": pol, "n_lesions": n_lesions, "lesions": lesions}
        params["distractors"] = distractors
        params["nuisance"] = {"bias_amplitude": round(float(bias_amp), 4),
                              "noise_sd": round(float(noise_sd / self.brain_sd), 4),
                              "blur_vox": round(float(blur), 3)}
        return EvalSyntheticVolume(
            image=image, mask=mask, label=int(present), params=params, twin=twin,
            distractor_mask=distractor_mask, polarity=pol if present else None,
            n_lesions=n_lesions if present else 0)


def split_preprocessing(steps: Sequence[Mapping[str, Any]]
                        ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split a config's preprocessing into its spatial head and its intensity tail.

    Raises:
        ValueError: an intensity transform is followed by a spatial one; the synthetic
            data could then not be normalised the way a real scan is.
    """
    steps = [copy.deepcopy(dict(s)) for s in steps]
    first = next((i for i, s in enumerate(steps) if s["name"] in INTENSITY_TRANSFORMS),
                 len(steps))
    head, tail = steps[:first], steps[first:]
    late = [s["name"] for s in tail if s["name"] not in INTENSITY_TRANSFORMS]
    if late:
        raise ValueError(
            f"preprocessing has spatial transform(s) {late} after an intensity transform; put "
            f"every intensity transform ({sorted(INTENSITY_TRANSFORMS)}) last so that synthetic "
            "volumes can be normalised like real scans."
        )
    return head, tail


def apply_transforms(steps: Sequence[Mapping[str, Any]], data: dict[str, Any],
                     keys: Sequence[str] = ("image",)) -> dict[str, Any]:
    """Apply MONAI dictionary transforms named as in a config's ``preprocessing`` section.

    Built by :func:`icam_med.io.preprocessing.build_preprocessing`, the same builder the
    scan pipeline uses, so synthetic volumes are transformed exactly as real scans are.
    Steps that give no ``keys`` are applied to ``keys``.
    """
    from icam_med.io.preprocessing import build_preprocessing

    if not steps:
        return data
    return build_preprocessing(steps, keys=keys, source="synthetic data")(data)


def input_space_synthesizer(preprocessing: Sequence[Mapping[str, Any]], *, seed: int = 0,
                            resolution_mm: int = 2,
                            synthesizer: type[LesionSynthesizer] | None = None, **options: Any
                            ) -> tuple[LesionSynthesizer, list[dict[str, Any]]]:
    """A synthesizer on the model's input grid, and the intensity steps still to apply.

    The MNI brain at ``resolution_mm`` goes through the spatial part of ``preprocessing``
    (as a real scan does) and the synthesizer draws lesions on the result. Each generated
    image must then go through the returned intensity steps (see :func:`normalise`),
    exactly as a scan would.

    Args:
        preprocessing: the config's preprocessing steps.
        seed: the generator's base seed.
        resolution_mm: resolution of the MNI template before the spatial steps.
        synthesizer: the generator class (default :class:`LesionSynthesizer`, the demo's;
            :class:`EvalSynthesizer` for the evaluation benchmark).
        **options: passed to the generator.

    Returns:
        ``(synthesizer, intensity_steps)``.
    """
    import torch
    from monai.data import MetaTensor

    head, tail = split_preprocessing(preprocessing)
    image, affine, _ = mni_brain(resolution_mm)
    data = {"image": MetaTensor(torch.from_numpy(image)[None], affine=torch.from_numpy(affine))}
    data = apply_transforms(head, data)
    out_image = np.asarray(data["image"].numpy()[0], dtype=np.float32)
    # The brain is where the resampled scan is non-zero: the same voxels that a
    # non-zero intensity normalisation of a real scan would use.
    out_brain = out_image > 0
    spacing = [float(s) for s in data["image"].pixdim[: out_image.ndim]]
    cls = LesionSynthesizer if synthesizer is None else synthesizer
    synth = cls(out_image, out_brain, spacing, seed=seed, **options)
    return synth, tail


def normalise(image: np.ndarray, intensity_steps: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Apply a config's intensity steps to one ``(*spatial)`` image; returns ``(1, *spatial)``."""
    import torch

    data = apply_transforms(intensity_steps, {"image": torch.from_numpy(image[None].copy())})
    out = data["image"]
    return np.asarray(out.numpy() if hasattr(out, "numpy") else out, dtype=np.float32)


def normalise_with_twin(image: np.ndarray, twin: np.ndarray,
                        intensity_steps: Sequence[Mapping[str, Any]]
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Normalise a volume and its healthy twin with the volume's own statistics.

    With a single ``NormalizeIntensityd`` step (over the non-zero voxels, as in the 3-D
    evaluation configs, or over every pixel, as in the 2-D demo config) the twin is
    normalised with the lesioned volume's mean and SD, so the two stay equal wherever the
    raw volumes are (a deletion that copies a voxel outside the lesion changes nothing).
    Any other intensity steps are applied to each volume separately (the twin then differs
    slightly everywhere).

    Returns:
        ``(x, x_twin)``, each ``(1, *spatial)`` float32.
    """
    steps = [dict(s) for s in intensity_steps]
    x = normalise(image, intensity_steps)
    step = steps[0] if len(steps) == 1 else {}
    if step.get("name") != "NormalizeIntensityd" or set(step) - {"name", "nonzero"}:
        return x, normalise(twin, intensity_steps)
    nonzero = bool(step.get("nonzero", False))
    vals = (image[image != 0] if nonzero else np.ravel(image)).astype(np.float64)
    mean, sd = float(vals.mean()), float(vals.std())
    t = np.asarray(twin, dtype=np.float32)
    scaled = (t - np.float32(mean)) / np.float32(sd if sd > 0 else 1.0)
    out = np.where(t != 0, scaled, 0.0) if nonzero else scaled
    out = out.astype(np.float32)[None]
    # Where the raw volumes agree, take the bytes of x itself (MONAI's float rounding).
    same = (np.asarray(image) == t)[None]
    return x, np.where(same, x, out).astype(np.float32)

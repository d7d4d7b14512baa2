"""The 2-D evaluation suite: synthetic radiographs with one known finding (issue 13).

:func:`radiograph_volumes` turns held-out synthetic chest radiographs
(:func:`icam_med.evaluation.radiographs.synthetic_radiograph`) into
:class:`~icam_med.evaluation.evaluate.EvalVolume` cases for
:func:`~icam_med.evaluation.evaluate.evaluate`, the same run, rows and metrics as the 3-D
evaluation; :func:`negative_predictions` records what the model says on radiographs
without a finding (the maps are scored on positives only: a negative has no target).

Each case is drawn as the 2-D demo model was trained (``training_batch``): an image
:data:`DRAW_UPSAMPLE` times the model's input size, one bright round finding centred at
rows 20-80 % and columns 15-85 % of the image, its radius 2.5/64-5/64 of the image's
size. It then goes through the config's own preprocessing (the MONAI transforms of
``configs/demo2d.yaml``: the spatial steps on the image, its healthy twin and the
finding's disc; the intensity steps with the image's statistics, see
:func:`~icam_med.evaluation.synthetic.normalise_with_twin`), in MONAI's 2-D layout
``(1, columns, rows)``. The finding's mask on the model's grid is the disc's occupancy
after the same spatial steps, at least one half.

**Held out by construction.** The demo model was trained on batches drawn from
``numpy.random.default_rng([seed, step])`` (two words, ``scripts/train_demo2d_model.py``)
and checked on ``[seed, 10**6]``; the sample radiographs use ``[0, i]``. A case here
draws from the five-word stream :func:`stream` ``[seed, STREAM_TAG, split, kind, index +
1]``, whose last word is never 0, so no stream here equals one of theirs (NumPy's
``SeedSequence`` ignores trailing zero words, hence the ``+ 1``). The ``validation`` and
``test`` splits, and positives and negatives, differ in their own words.

The healthy twin is the same draw without the finding: ``synthetic_radiograph`` draws no
random number for the finding, so replaying the generator's state gives the same body,
texture and noise; the two images differ only where the finding's soft edge reaches.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from icam_med.evaluation.evaluate import EvalVolume

__all__ = [
    "DRAW_UPSAMPLE",
    "NOMINAL_SPACING_MM",
    "SPLITS",
    "STREAM_TAG",
    "RadiographCase",
    "data_settings",
    "draw_case",
    "model_input",
    "negative_predictions",
    "radiograph_volumes",
    "stream",
]

#: Second word of every stream of this suite (``0x2DE7``, "2-D eval"): no other generator
#: of the project uses it.
STREAM_TAG = 0x2DE7
#: Split words of the streams: ``validation`` for choices, ``test`` for the table only.
SPLITS = {"validation": 1, "test": 2}
_KINDS = {"positive": 1, "negative": 2}
#: Cases are drawn at this multiple of the model's input size, as the training images were.
DRAW_UPSAMPLE = 4
#: Nominal pixel spacing of the drawn images (the sample DX files' Imager Pixel Spacing):
#: synthetic radiographs have no physical scale; it only turns the tolerance into pixels.
NOMINAL_SPACING_MM = 0.4
#: Finding radius as a fraction of the image's size (``training_batch``: 2.5-5 px at 64).
RADIUS_FRACTION = (2.5 / 64, 5.0 / 64)
#: Finding centre range as fractions of (rows, columns) (``training_batch``).
CENTRE_RANGE = ((0.2, 0.8), (0.15, 0.85))


def stream(index: int, *, split: str = "test", positive: bool = True, seed: int = 0) -> list[int]:
    """The entropy words of case ``index``: ``[seed, STREAM_TAG, split, kind, index + 1]``.

    Raises:
        ValueError: an unknown split, or a negative index or seed.
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {sorted(SPLITS)}.")
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be >= 0, got {index} and {seed}.")
    kind = _KINDS["positive" if positive else "negative"]
    return [int(seed), STREAM_TAG, SPLITS[split], kind, int(index) + 1]


@dataclass(frozen=True)
class RadiographCase:
    """One drawn radiograph, as displayed (``(rows, columns)``, brighter = denser).

    Attributes:
        image: the radiograph.
        twin: the same radiograph without the finding (equal to ``image`` for a negative).
        disc: bool ``(rows, columns)`` pixels within ``radius`` of the finding's centre
            (empty for a negative).
        centre: ``(row, column)`` of the finding's centre in pixels, or ``None``.
        radius: the finding's radius in pixels (0 for a negative).
        stream: the generator's entropy words (:func:`stream`).
    """

    image: np.ndarray
    twin: np.ndarray
    disc: np.ndarray
    centre: tuple[float, float] | None
    radius: float
    stream: list[int]


def draw_case(index: int, shape: tuple[int, int], *, split: str = "test", positive: bool = True,
              seed: int = 0) -> RadiographCase:
    """Draw case ``index`` of a split at ``shape = (rows, columns)`` (see the module doc)."""
    from icam_med.evaluation.radiographs import synthetic_radiograph

    words = stream(index, split=split, positive=positive, seed=seed)
    rng = np.random.default_rng(words)
    rows, cols = int(shape[0]), int(shape[1])
    if not positive:
        image = synthetic_radiograph(rng, (rows, cols))
        return RadiographCase(image, image, np.zeros((rows, cols), bool), None, 0.0, words)
    centre = (rng.uniform(*CENTRE_RANGE[0]) * rows, rng.uniform(*CENTRE_RANGE[1]) * cols)
    radius = rng.uniform(*RADIUS_FRACTION) * min(rows, cols)
    state = rng.bit_generator.state
    image = synthetic_radiograph(rng, (rows, cols), finding=centre, radius=radius)
    replay = np.random.default_rng()
    replay.bit_generator.state = state
    twin = synthetic_radiograph(replay, (rows, cols))
    rr = np.arange(rows)[:, None] - centre[0]
    cc = np.arange(cols)[None, :] - centre[1]
    disc = np.sqrt(rr ** 2 + cc ** 2) <= radius
    return RadiographCase(image, twin, disc, (float(centre[0]), float(centre[1])), float(radius),
                          words)


def _draw_shape(spatial_size: Sequence[int]) -> tuple[int, int]:
    if len(spatial_size) != 2:
        raise ValueError(f"the radiograph suite needs a 2-D model input, got spatial_size "
                         f"{list(spatial_size)}; use the brain suite for 3-D models.")
    # MONAI's 2-D layout is (columns, rows): spatial_size = [columns, rows].
    return (DRAW_UPSAMPLE * int(spatial_size[1]), DRAW_UPSAMPLE * int(spatial_size[0]))


def model_input(case: RadiographCase, preprocessing: Sequence[Mapping[str, Any]]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[float, ...]]:
    """A case on the model's grid through the config's preprocessing.

    Returns:
        ``(x, twin, mask, spacing)``: ``x`` and ``twin`` ``(1, columns, rows)`` float32
        after every step (the twin normalised with ``x``'s statistics), ``mask`` the
        finding's disc after the spatial steps (occupancy >= 1/2), ``spacing`` the model
        pixel's size in mm (from :data:`NOMINAL_SPACING_MM`).
    """
    from monai.data import MetaTensor

    from icam_med.evaluation.synthetic import (
        apply_transforms,
        normalise_with_twin,
        split_preprocessing,
    )

    head, tail = split_preprocessing(preprocessing)
    affine = torch.diag(torch.tensor([NOMINAL_SPACING_MM, NOMINAL_SPACING_MM, 1.0, 1.0],
                                     dtype=torch.float64))

    def layout(a: np.ndarray) -> MetaTensor:  # (rows, columns) -> (1, columns, rows)
        return MetaTensor(torch.from_numpy(np.ascontiguousarray(a.T[None], dtype=np.float32)),
                          affine=affine.clone())

    data = {"image": layout(case.image), "twin": layout(case.twin),
            "mask": layout(case.disc.astype(np.float32))}
    data = apply_transforms(head, data, keys=("image", "twin", "mask"))
    image = np.asarray(data["image"].numpy()[0], dtype=np.float32)
    twin = np.asarray(data["twin"].numpy()[0], dtype=np.float32)
    x, x_twin = normalise_with_twin(image, twin, tail)
    mask = torch.as_tensor(np.asarray(data["mask"].numpy()[0]) >= 0.5)
    spacing = tuple(float(s) for s in data["image"].pixdim[:2])
    return torch.from_numpy(x), torch.from_numpy(x_twin), mask, spacing


def radiograph_volumes(preprocessing: Sequence[Mapping[str, Any]], spatial_size: Sequence[int],
                       n: int, *, target: int, split: str = "test", seed: int = 0
                       ) -> Iterator[EvalVolume]:
    """``n`` positive cases (each with a finding and its healthy twin) for
    :func:`~icam_med.evaluation.evaluate.evaluate`.

    Args:
        preprocessing: the config's preprocessing steps.
        spatial_size: the model's input size ``[columns, rows]``.
        n: number of cases (indices ``0 .. n-1`` of the split's positive stream).
        target: the class index to explain (``present``).
        split: ``"validation"`` or ``"test"``.
        seed: the base seed (the first word of every stream).

    Raises:
        ValueError: the preprocessing does not land on ``spatial_size``, or a finding
            covers no model pixel.
    """
    shape = _draw_shape(spatial_size)
    for i in range(int(n)):
        case = draw_case(i, shape, split=split, positive=True, seed=seed)
        x, twin, mask, spacing = model_input(case, preprocessing)
        if tuple(x.shape[1:]) != tuple(int(s) for s in spatial_size):
            raise ValueError(f"the preprocessing yields {tuple(x.shape[1:])} but the model "
                             f"expects {tuple(spatial_size)}; the radiograph suite needs a "
                             "config whose spatial steps land on the model's input.")
        if not mask.any():
            raise ValueError(f"{split}-{i:04d}: the finding (radius {case.radius:.1f} px) covers "
                             "no pixel of the model's grid.")
        yield EvalVolume(x=x, mask=mask, target=int(target), spacing=spacing, twin=twin,
                         polarity="hyper", name=f"{split}-{i:04d}")


@torch.no_grad()
def negative_predictions(model: nn.Module, preprocessing: Sequence[Mapping[str, Any]],
                         spatial_size: Sequence[int], n: int, *, target: int,
                         split: str = "test", seed: int = 0) -> list[dict[str, Any]]:
    """The model's answer on ``n`` radiographs without a finding (the split's negative
    stream), each ``{"case", "stream", "p_target", "predicted"}``; eval mode is used and
    the model's training flag restored."""
    shape = _draw_shape(spatial_size)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(int(n)):
            case = draw_case(i, shape, split=split, positive=False, seed=seed)
            x, _, _, _ = model_input(case, preprocessing)
            probs = torch.softmax(model(x[None].to(device)).float(), 1)[0]
            out.append({"case": f"{split}-negative-{i:04d}", "stream": case.stream,
                        "p_target": float(probs[int(target)]), "predicted": int(probs.argmax())})
    finally:
        model.train(was_training)
    return out


def data_settings(split: str, seed: int, spatial_size: Sequence[int], n_positive: int,
                  n_negative: int) -> dict[str, Any]:
    """What the suite drew, for ``settings.json``."""
    shape = _draw_shape(spatial_size)
    return {
        "generator": "icam_med.evaluation.radiographs.synthetic_radiograph (chest-like, one "
                     "bright round finding), via icam_med.evaluation.radiograph_suite",
        "split": split, "seed": seed,
        "streams": {"positive": f"[{seed}, {STREAM_TAG}, {SPLITS[split]}, 1, i + 1], i < "
                                f"{n_positive}",
                    "negative": f"[{seed}, {STREAM_TAG}, {SPLITS[split]}, 2, i + 1], i < "
                                f"{n_negative}",
                    "training (not used here)": "[seed, step] and [seed, 10**6] "
                                                "(scripts/train_demo2d_model.py)"},
        "drawn_shape_rows_columns": list(shape),
        "nominal_spacing_mm": NOMINAL_SPACING_MM,
        "finding_radius_fraction": list(RADIUS_FRACTION),
        "finding_centre_range_rows_columns": [list(r) for r in CENTRE_RANGE],
        "mask": "the finding's disc after the config's spatial steps, occupancy >= 1/2",
        "label": "present", "polarity": "bright (every finding)",
        "n_positive": n_positive, "n_negative": n_negative,
    }

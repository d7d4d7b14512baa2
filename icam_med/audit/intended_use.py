"""A model's intended use, stated in its model card, and the check of each scan against it.

A model card (``MODEL_CARD.md`` beside the weights) states what the model was trained on
in one fenced block tagged ``yaml intended-use``::

    ```yaml intended-use
    modality: [MR]                 # DICOM Modality values
    body_part: [BRAIN, HEAD]       # DICOM Body Part Examined values
    spacing_mm: [1.0, 3.0]         # every voxel spacing within this range
    fov_mm: [150, 260]             # every axis' field of view (shape x spacing) within this
    intensity: {mean: 149, std: 20, max_z: 4}   # the training scans' mean voxel value:
                                   # a scan whose mean lies more than max_z std away is out
    ```

Every key is optional; what a scan cannot tell (a NIfTI file has no modality or body part)
is recorded as not checkable, never as passed. The audit puts the result in each record's
``analysis.intended_use`` (what was checked, against which card, and every violation) and
the report lists violations in its review list.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CARD_NAME", "IntendedUse", "card_beside"]

#: The model card's file name, looked for beside the weights.
CARD_NAME = "MODEL_CARD.md"
_BLOCK = re.compile(r"^```ya?ml[ \t]+intended-use[ \t]*\n(.*?)^```", re.S | re.M)
_KEYS = ("modality", "body_part", "spacing_mm", "fov_mm", "intensity")


def card_beside(weights: str | Path | None) -> Path | None:
    """The model card beside a weights file, if there is one."""
    if not weights:
        return None
    card = Path(weights).parent / CARD_NAME
    return card if card.is_file() else None


def _range(value: Any, key: str, source: str) -> tuple[float, float]:
    ok = (isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2
          and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                  and math.isfinite(v) for v in value) and value[0] <= value[1])
    if not ok:
        raise ValueError(f"{source}: intended-use '{key}' is {value!r}; expected [low, high] "
                         "in mm with low <= high, e.g. [1.0, 3.0].")
    return float(value[0]), float(value[1])


def _words(value: Any, key: str, source: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not (isinstance(value, Sequence) and value and all(isinstance(v, str) for v in value)):
        raise ValueError(f"{source}: intended-use '{key}' is {value!r}; expected a list of "
                         "DICOM values, e.g. [MR].")
    return tuple(v.strip().upper() for v in value)


@dataclass(frozen=True)
class IntendedUse:
    """What a model is for, from its card.

    Attributes:
        card: the card's file name.
        card_sha256: the SHA-256 of the card's bytes (recorded with every check).
        modality, body_part: accepted DICOM values (empty: not stated).
        spacing_mm, fov_mm: accepted ranges (``None``: not stated).
        intensity: ``{"mean", "std", "max_z"}`` of the training scans' mean voxel value.
    """

    card: str
    card_sha256: str
    modality: tuple[str, ...] = ()
    body_part: tuple[str, ...] = ()
    spacing_mm: tuple[float, float] | None = None
    fov_mm: tuple[float, float] | None = None
    intensity: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_card(cls, path: str | Path) -> IntendedUse | None:
        """The intended use a card states, or ``None`` when it states none.

        Raises:
            ValueError: the block is not valid YAML, or a value has the wrong form (named).
        """
        import yaml

        p = Path(path)
        raw = p.read_bytes()
        m = _BLOCK.search(raw.decode("utf-8", errors="replace"))
        if m is None:
            return None
        try:
            data = yaml.safe_load(m.group(1)) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{p}: the intended-use block is not valid YAML ({exc}).") from None
        if not isinstance(data, Mapping):
            raise ValueError(f"{p}: the intended-use block must be a mapping of {_KEYS}.")
        unknown = sorted(set(data) - set(_KEYS))
        if unknown:
            raise ValueError(f"{p}: unknown intended-use key(s) {unknown}; known: {list(_KEYS)}.")
        src = str(p)
        intensity: dict[str, float] = {}
        if "intensity" in data:
            iv = data["intensity"]
            good = (isinstance(iv, Mapping) and {"mean", "std"} <= set(iv)
                    and all(isinstance(iv[k], (int, float)) and not isinstance(iv[k], bool)
                            for k in iv) and float(iv["std"]) > 0)
            if not good:
                raise ValueError(f"{src}: intended-use 'intensity' is {iv!r}; expected "
                                 "{mean: M, std: S, max_z: Z} with S > 0 (max_z default 4).")
            intensity = {"mean": float(iv["mean"]), "std": float(iv["std"]),
                         "max_z": float(iv.get("max_z", 4.0))}
        return cls(
            card=p.name, card_sha256=hashlib.sha256(raw).hexdigest(),
            modality=_words(data["modality"], "modality", src) if "modality" in data else (),
            body_part=(_words(data["body_part"], "body_part", src)
                       if "body_part" in data else ()),
            spacing_mm=(_range(data["spacing_mm"], "spacing_mm", src)
                        if "spacing_mm" in data else None),
            fov_mm=_range(data["fov_mm"], "fov_mm", src) if "fov_mm" in data else None,
            intensity=intensity,
        )

    def check(self, info: Any, image: Any) -> dict[str, Any]:
        """Check one loaded scan; returns the record's ``analysis.intended_use``.

        Args:
            info: its :class:`icam_med.io.ScanInfo` (modality, headers, shape, spacing).
            image: its voxels as loaded (before preprocessing).

        Returns:
            ``{"card", "card_sha256", "checked": [...], "not_checkable": [...],
            "violations": [...]}``.
        """
        checked: list[str] = []
        unknown: list[str] = []
        out: list[str] = []
        if self.modality:
            mod = (getattr(info, "modality", None) or "").upper() or None
            if mod is None:
                unknown.append("modality (not in the file)")
            else:
                checked.append("modality")
                if mod not in self.modality:
                    out.append(f"modality {mod}, intended {'/'.join(self.modality)}")
        if self.body_part:
            headers = getattr(info, "headers", None) or []
            part = str(getattr(headers[0], "BodyPartExamined", "") or "").upper() \
                if headers else ""
            if not part:
                unknown.append("body part (not in the file)")
            else:
                checked.append("body part")
                if part not in self.body_part:
                    out.append(f"body part {part}, intended {'/'.join(self.body_part)}")
        spacing = [float(s) for s in getattr(info, "spacing", ()) or ()]
        shape = [int(s) for s in tuple(getattr(info, "shape", ()) or ())[-3:]]
        if self.spacing_mm is not None:
            checked.append("spacing")
            lo, hi = self.spacing_mm
            bad = [s for s in spacing if not lo <= s <= hi]
            if bad:
                out.append(f"voxel spacing {[round(s, 3) for s in spacing]} mm, intended "
                           f"{lo:g}-{hi:g} mm")
        if self.fov_mm is not None and len(shape) == len(spacing):
            checked.append("field of view")
            lo, hi = self.fov_mm
            fov = [n * s for n, s in zip(shape, spacing, strict=True)]
            if any(not lo <= f <= hi for f in fov):
                out.append(f"field of view {[round(f, 1) for f in fov]} mm, intended "
                           f"{lo:g}-{hi:g} mm per axis")
        if self.intensity:
            checked.append("intensity")
            a = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
            mean = float(np.mean(a, dtype=np.float64))
            z = (mean - self.intensity["mean"]) / self.intensity["std"]
            if abs(z) > self.intensity["max_z"]:
                out.append(f"mean intensity {mean:.4g}, {z:+.1f} SD from the training scans' "
                           f"{self.intensity['mean']:g} (limit {self.intensity['max_z']:g} SD)")
        return {"card": self.card, "card_sha256": self.card_sha256, "checked": checked,
                "not_checkable": unknown, "violations": out}

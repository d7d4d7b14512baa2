"""Shared helpers for the tests that show a segmentation target's region (report, napari):
a small scan with an oblique-free but flipped, offset affine, a mask on its grid and a
random-weight MONAI UNet config that explains the label ``lesion`` over that mask (not a
test module)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import yaml

#: The scan's affine: x stored right-to-left (an LAS-like grid), offset origin, anisotropic.
AFFINE = np.array([[-1.5, 0.0, 0.0, 30.0],
                   [0.0, 1.8, 0.0, -12.0],
                   [0.0, 0.0, 2.2, 8.0],
                   [0.0, 0.0, 0.0, 1.0]])
SHAPE = (24, 20, 18)
#: The lesion box (and mask) in the scan's own voxel indices.
LESION = np.s_[5:12, 7:14, 6:12]


def write_scan_and_mask(folder: Path, *, name: str = "seg") -> tuple[Path, Path]:
    """``<name>.nii.gz`` (a bright body with a brighter lesion) and
    ``<name>_lesion_mask.nii.gz`` (1 in the lesion) on one grid, in ``folder``."""
    rng = np.random.default_rng(11)
    grid = np.indices(SHAPE, dtype=float)
    centre = (np.array(SHAPE) - 1) / 2
    r = (((grid - centre[:, None, None, None]) / (np.array(SHAPE)[:, None, None, None] * 0.45))
         ** 2).sum(0)
    vol = np.where(r <= 1, 300.0 + rng.normal(0, 20, SHAPE), 0.0).astype(np.float32)
    vol[LESION] += 400.0
    scan = folder / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(vol, AFFINE), str(scan))
    mask = np.zeros(SHAPE, np.uint8)
    mask[LESION] = 1
    mask_path = folder / f"{name}_lesion_mask.nii.gz"
    nib.save(nib.Nifti1Image(mask, AFFINE), str(mask_path))
    return scan, mask_path


def write_unet_config(folder: Path, *, mask: Path | None = None,
                      name: str = "unet.yaml") -> Path:
    """A random-weight 3-D UNet (labels background, lesion) explaining ``lesion`` by
    Grad-CAM; the region is ``mask`` if given, else the predicted region."""
    data = {
        "model": {"name": "lesion-unet", "architecture": "UNet",
                  "args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                           "channels": [4, 8], "strides": [2], "num_res_units": 0},
                  "labels": ["background", "lesion"],
                  "input": {"channels": 1, "spatial_size": [32, 32, 32]}},
        "preprocessing": [{"name": "Orientationd", "axcodes": "RAS"},
                          {"name": "Spacingd", "pixdim": [2.0, 2.0, 2.0]},
                          {"name": "ResizeWithPadOrCropd", "spatial_size": [32, 32, 32]},
                          {"name": "NormalizeIntensityd"}],
        "method": {"name": "gradcam", "target_layers": "last"},
        "target": {"label": "lesion",
                   "region": {"mask": str(mask)} if mask is not None else "predicted"},
    }
    path = folder / name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path

"""MONAI dictionary transform that runs the CAM engine inside a user's own pipeline.

Example::

    from monai.transforms import Compose, Invertd, LoadImaged, Orientationd, Spacingd
    from icam_med.cam import ComputeCAMd

    pre = Compose([Orientationd("image", "RAS"), Spacingd("image", (2, 2, 2))])
    pipeline = Compose([LoadImaged("image", ensure_channel_first=True), pre,
                        ComputeCAMd("image", model, method="integrative"),
                        Invertd("image_cam", transform=pre, orig_keys="image")])
    out = pipeline({"image": "scan.nii.gz"})
    out["image_cam"]          # MetaTensor on the scan's grid, the scan's affine

The map is written under ``{key}{cam_postfix}`` as a MetaTensor that shares (a copy of) the
image's metadata and applied operations, so MONAI's ``Invertd`` and ``SaveImaged`` place it
exactly where the image is. The engine's summary (method, options, target class, score and
per-layer weights: :meth:`icam_med.cam.summary.CAMSummary.to_dict`) is stored in the map's
``meta["icam"]``; MONAI's ``Invertd`` rebuilds
the metadata from the image's, so read that summary before inverting.
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from icam_med.cam.summary import CAMSummary

__all__ = ["ComputeCAMd"]


class ComputeCAMd(MapTransform):
    """Compute a class-activation map for each image key and store it as a MetaTensor.

    Args:
        keys: image keys; each holds a channel-first ``(C, *spatial)`` tensor.
        model: the network (an ``nn.Module``), or an already built CAM object from
            :func:`icam_med.cam.make_cam` (then ``method``/options are ignored).
        method: CAM method name (``"integrative"`` default, ``"gradcam"``...).
        targets: what to explain: ``None`` (predicted class), a class index, or a callable
            (see :mod:`icam_med.cam`).
        cam_postfix: the map goes to ``f"{key}{cam_postfix}"``.
        layer_maps: also store each layer's map (native resolution) under
            ``f"{key}{cam_postfix}_layers"`` as a dict of tensors.
        allow_missing_keys: don't raise for missing keys.
        **method_options: options of the method (``target_layers``, ``alpha_fn``...).
    """

    def __init__(self, keys: KeysCollection, model: Any, *, method: str = "integrative",
                 targets: Any = None, cam_postfix: str = "_cam", layer_maps: bool = False,
                 allow_missing_keys: bool = False, **method_options: Any) -> None:
        super().__init__(keys, allow_missing_keys)
        from icam_med.cam.base import BaseCAM
        from icam_med.cam.methods import make_cam

        self.cam = model if isinstance(model, BaseCAM) else make_cam(method, model,
                                                                       **method_options)
        self.targets = targets
        self.cam_postfix = cam_postfix
        self.layer_maps = layer_maps

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            x = torch.as_tensor(img.as_tensor() if isinstance(img, MetaTensor) else img)
            if x.ndim < 3:
                raise ValueError(f"ComputeCAMd: '{key}' must be (C, *spatial), got {tuple(x.shape)}.")
            result = self.cam(x.unsqueeze(0).float(), targets=self.targets).cpu()
            fused = result.fused[0]
            if isinstance(img, MetaTensor):
                out = MetaTensor(fused, meta=copy.deepcopy(img.meta),
                                 applied_operations=copy.deepcopy(img.applied_operations))
            else:
                out = MetaTensor(fused)
            out.meta["icam"] = CAMSummary.from_result(result).to_dict()
            d[f"{key}{self.cam_postfix}"] = out
            if self.layer_maps:
                d[f"{key}{self.cam_postfix}_layers"] = {
                    name: m[0] for name, m in result.layer_maps.items()}
        return d

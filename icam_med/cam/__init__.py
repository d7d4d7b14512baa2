"""Integrative CAM and the classic CAM methods, on one engine (2D and 3D, CPU and GPU).

Example:
    >>> from icam_med.cam import IntegrativeCAM
    >>> cam = IntegrativeCAM(model)                    # target_layers="stages"
    >>> result = cam(volume_batch)                     # (N, C, D, H, W)
    >>> result.fused.shape                             # (N, 1, D, H, W), in [0, 1]
"""

from __future__ import annotations

from icam_med.cam.alpha import ALPHA_FUNCTIONS
from icam_med.cam.base import (
    BIAS_MODES,
    FUSIONS,
    LAYER_WEIGHTINGS,
    BaseCAM,
    CAMResult,
    minmax_normalize,
)
from icam_med.cam.layers import LAYER_PRESETS
from icam_med.cam.lrp import LRP, LRP_RULES
from icam_med.cam.methods import (
    ACTIVATION_TERMS,
    METHODS,
    GradCAM,
    GradCAMPlusPlus,
    GuidedBackprop,
    GuidedGradCAM,
    HiResCAM,
    IntegrativeCAM,
    LayerCAM,
    ScoreCAM,
    SmoothGrad,
    VanillaGradient,
    make_cam,
)
from icam_med.cam.targets import ClassTarget, SegmentationTarget


def __getattr__(name: str):
    # ComputeCAMd pulls in monai.transforms: imported only when asked for.
    if name == "ComputeCAMd":
        from icam_med.cam.monai import ComputeCAMd

        return ComputeCAMd
    raise AttributeError(f"module 'icam_med.cam' has no attribute {name!r}")


__all__ = [
    "ACTIVATION_TERMS",
    "ALPHA_FUNCTIONS",
    "BIAS_MODES",
    "FUSIONS",
    "LAYER_PRESETS",
    "LAYER_WEIGHTINGS",
    "LRP",
    "LRP_RULES",
    "METHODS",
    "BaseCAM",
    "CAMResult",
    "ClassTarget",
    "ComputeCAMd",
    "GradCAM",
    "GradCAMPlusPlus",
    "GuidedBackprop",
    "GuidedGradCAM",
    "HiResCAM",
    "IntegrativeCAM",
    "LayerCAM",
    "ScoreCAM",
    "SegmentationTarget",
    "SmoothGrad",
    "VanillaGradient",
    "make_cam",
    "minmax_normalize",
]

"""Small CNNs shipped with icam-med: the demo lesion classifier.

:class:`LesionNet` is the architecture of the demo model (``configs/demo.yaml`` names it
``icam_med.networks:LesionNet``). It is deliberately ordinary: conv-norm-ReLU stages with
strided convolutions, global average pooling and a linear head, so that every CAM method
has a clear set of layers to hook and the normalisation layers carry real (effective)
biases for Integrative CAM's bias term. It works for 2D and 3D inputs
(``spatial_dims``), like MONAI's networks.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["LesionNet"]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BATCH_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_INSTANCE_NORM = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


def _norm(kind: str, spatial_dims: int, channels: int) -> nn.Module:
    if kind == "batch":
        return _BATCH_NORM[spatial_dims](channels)
    if kind == "instance":
        return _INSTANCE_NORM[spatial_dims](channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    raise ValueError(f"norm '{kind}' is not supported; use 'batch', 'instance' or 'group'.")


class ConvNormAct(nn.Sequential):
    """Convolution (with bias) -> normalisation -> ReLU, named ``conv``, ``norm``, ``act``."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, *,
                 stride: int = 1, norm: str = "batch") -> None:
        super().__init__()
        self.conv = _CONV[spatial_dims](in_channels, out_channels, kernel_size=3, stride=stride,
                                        padding=1, bias=True)
        self.norm = _norm(norm, spatial_dims, out_channels)
        self.act = nn.ReLU()


class LesionNet(nn.Module):
    """A small 2D/3D classification CNN: a stem, strided stages, global pooling, linear head.

    Layout (module names as seen by ``named_modules()``, which CAM ``target_layers`` use)::

        stem                      ConvNormAct(in -> channels[0]), full resolution
        stages.0 .. stages.S-1    each: ConvNormAct(stride 2), then convs_per_stage - 1
                                  ConvNormAct(stride 1)
        pool                      global average pooling
        head                      Linear(channels[-1] -> out_channels)

    Every convolution has a bias and is followed by a normalisation layer, so the bias
    term of Integrative CAM is non-trivial at every stage.

    Args:
        spatial_dims: 2 or 3 (1 also works).
        in_channels: input channels.
        out_channels: number of classes (logits).
        channels: width of the stem and of each stage; ``len(channels) - 1`` stages, each
            halving the spatial size.
        norm: ``"batch"`` (default), ``"instance"`` or ``"group"``.
        convs_per_stage: convolutions per stage (the first one strided).
        dropout: dropout probability before the head (0 disables it).
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2,
                 channels: Sequence[int] = (8, 16, 32, 64), norm: str = "batch",
                 convs_per_stage: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        if spatial_dims not in _CONV:
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}.")
        channels = tuple(int(c) for c in channels)
        if len(channels) < 2 or any(c < 1 for c in channels):
            raise ValueError(
                f"channels must list at least two positive widths (stem + one stage), got {channels}."
            )
        self.spatial_dims = spatial_dims
        self.stem = ConvNormAct(spatial_dims, in_channels, channels[0], norm=norm)
        if convs_per_stage < 1:
            raise ValueError(f"convs_per_stage must be >= 1, got {convs_per_stage}.")
        stages = []
        for c_in, c_out in itertools.pairwise(channels):
            blocks = [ConvNormAct(spatial_dims, c_in, c_out, stride=2, norm=norm)]
            blocks += [ConvNormAct(spatial_dims, c_out, c_out, norm=norm)
                       for _ in range(convs_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool1d(1) if spatial_dims == 1 else (
            nn.AdaptiveAvgPool2d(1) if spatial_dims == 2 else nn.AdaptiveAvgPool3d(1))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(channels[-1], out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, out_channels)`` for an input ``(N, in_channels, *spatial)``."""
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"LesionNet(spatial_dims={self.spatial_dims}) expects input (N, C, *spatial) with "
                f"{self.spatial_dims + 2} dimensions, got shape {tuple(x.shape)}."
            )
        x = self.stages(self.stem(x))
        return self.head(self.dropout(torch.flatten(self.pool(x), 1)))

"""Shared fixtures: tiny 2D and 3D CNNs built in code (no test downloads anything)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn


class TinyCNN(nn.Module):
    """conv-BN-ReLU stages with pooling, a global pool and a linear head (2D or 3D).

    BatchNorm running statistics are randomised so the effective biases are non-trivial.
    """

    def __init__(self, dims: int = 3, in_channels: int = 1, n_classes: int = 3,
                 inplace: bool = False, seed: int = 0) -> None:
        super().__init__()
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        bn = nn.BatchNorm3d if dims == 3 else nn.BatchNorm2d
        pool = nn.MaxPool3d if dims == 3 else nn.MaxPool2d
        gap = nn.AdaptiveAvgPool3d if dims == 3 else nn.AdaptiveAvgPool2d
        g = torch.Generator().manual_seed(seed)
        self.features = nn.Sequential(
            conv(in_channels, 4, 3, padding=1), bn(4), nn.ReLU(inplace=inplace),
            pool(2),
            conv(4, 6, 3, padding=1), bn(6), nn.ReLU(inplace=inplace),
            pool(2),
            conv(6, 8, 3, padding=1), nn.ReLU(inplace=inplace),
        )
        self.gap = gap(1)
        self.fc = nn.Linear(8, n_classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            for m in self.modules():
                if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
                    m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                    m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.gap(self.features(x)).flatten(1))


@pytest.fixture
def tiny3d() -> TinyCNN:
    return TinyCNN(dims=3)


@pytest.fixture
def tiny2d() -> TinyCNN:
    return TinyCNN(dims=2)


@pytest.fixture
def make_tiny():
    return TinyCNN


REPO = Path(__file__).resolve().parents[1]

# The plugin's sample scans (icam_med.resources.sample_scans_dir): in the tests, the
# checkout's git-ignored sample_data/scans (as `make demo` and `make napari` use), never the
# user's cache. tests/test_packaging.py checks the cache default from an installed wheel.
os.environ.setdefault("ICAM_MED_SAMPLE_DIR", str(REPO / "sample_data" / "scans"))


@pytest.fixture(scope="session")
def repo_script():
    """Import a script of the repository's ``scripts/`` folder by name (they are no package)."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    return load

"""Shared helpers for the audit, ledger and batch tests (not a test module)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.networks.nets import Classifier
from safetensors.torch import save_file

from icam_med.audit import (
    Ledger,
    activity_section,
    build_record,
    file_ref,
    geometry_summary,
    input_section,
    method_section,
    model_section,
    preprocessing_section,
    runtime_section,
    utc_now,
)
from icam_med.config import ModelConfig
from icam_med.models import load_model

# Made-up identifiers written into DICOM headers; none may reach records, ledger, summary
# or report.
PHI = {
    "PatientName": "QUIXOTE^ALONSO",
    "PatientID": "PID-738291",
    "PatientBirthDate": "19470923",
    "InstitutionName": "La Mancha General Hospital",
    "AccessionNumber": "ACC99173",
    "StudyDate": "20230417",
    "ReferringPhysicianName": "PANZA^SANCHO",
}
PHI_NEEDLES = [*PHI.values(), "QUIXOTE", "ALONSO", "PANZA", "Mancha"]

TINY_LESIONNET_CONFIG = """
model:
  name: {name}
  architecture: icam_med.networks:LesionNet
  args: {{spatial_dims: 3, in_channels: 1, out_channels: 2, channels: [4, 8]}}
  weights: tiny.safetensors
  labels: [absent, present]
  input: {{channels: 1, spatial_size: [16, 16, 16]}}
preprocessing:
  - {{name: Orientationd, axcodes: RAS}}
  - {{name: ResizeWithPadOrCropd, spatial_size: [16, 16, 16]}}
  - {{name: NormalizeIntensityd}}
method: {{name: integrative, target_layers: stages}}
"""


def write_tiny_lesionnet_config(folder: Path, *, name: str = "tiny-lesion-net",
                                head_scale: float = 1.0) -> Path:
    """A seeded two-stage LesionNet (safetensors) and its YAML config in ``folder``.

    ``head_scale`` multiplies the linear head's weights (large values: confident logits).
    """
    from icam_med.networks import LesionNet

    torch.manual_seed(0)
    net = LesionNet(spatial_dims=3, in_channels=1, out_channels=2, channels=[4, 8])
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    state["head.weight"] = state["head.weight"] * head_scale
    save_file(state, str(folder / "tiny.safetensors"))
    cfg = folder / "tiny.yaml"
    cfg.write_text(TINY_LESIONNET_CONFIG.format(name=name))
    return cfg


def tiny_model_config(tmp: Path, *, sha: str | None = None) -> ModelConfig:
    """A tiny real MONAI classifier with safetensors weights written to ``tmp``."""
    torch.manual_seed(0)
    net = Classifier(in_shape=(1, 8, 8, 8), classes=2, channels=(4, 8), strides=(2, 2))
    weights = tmp / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    return ModelConfig(
        name="tiny", architecture="Classifier",
        args={"in_shape": [1, 8, 8, 8], "classes": 2, "channels": [4, 8], "strides": [2, 2]},
        weights=weights, weights_sha256=sha, labels=("absent", "present"),
        in_channels=1, spatial_size=(8, 8, 8),
    )


def write_scan_outputs(root: Path, scan_id: str, *, seed: int = 0, ledger: Ledger | None = None,
                       model_cfg: ModelConfig | None = None, uids: dict | None = None,
                       site_key=None):
    """Write one real NIfTI map under ``root/scan_id`` and commit its record to the ledger."""
    rng = np.random.default_rng(seed)
    volume = rng.integers(0, 1000, size=(8, 8, 6)).astype(np.int16)
    cam = rng.random((8, 8, 6)).astype(np.float32)
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    folder = root / scan_id
    folder.mkdir(parents=True, exist_ok=True)
    map_path = folder / "icam.nii.gz"
    nib.save(nib.Nifti1Image(cam, affine), str(map_path))
    started = utc_now()
    cfg = model_cfg or tiny_model_config(root.parent if root.parent.exists() else root)
    _, info = load_model(cfg)
    record = build_record(
        scan_id=scan_id,
        input=input_section(
            volume, fmt="nifti", modality="MR",
            geometry=geometry_summary(volume.shape, (1.5, 1.5, 3.0), "RAS", affine),
            checks=[{"name": "orthogonal-axes", "status": "passed"}],
            uids=uids, site_key=site_key),
        preprocessing=preprocessing_section([{"name": "Orientationd", "axcodes": "RAS"}]),
        model=model_section(info),
        method=method_section(
            "integrative", {"target_layers": ["net.layer1", "net.layer2"], "alpha_fn": "exp",
                            "bias_mode": "signed", "bias_weight": 1.0,
                            "layer_weighting": "score"},
            layer_weights={"net.layer1": 0.25, "net.layer2": torch.tensor([0.75])},
            target_class=1, score=2.5, predicted_class=1,
            map_range=(float(cam.min()), float(cam.max())),
            labels=info.labels, logits=[-1.0, 2.5]),
        runtime=runtime_section("cpu", seed=0),
        activity=activity_section("run1", started, operator="op-7", warnings=["a warning"]),
        outputs=[file_ref(root, map_path, "map-nifti")],
    )
    ledger = ledger or Ledger(root)
    return ledger.commit_record(record, folder / "icam.icam.json")


def write_three_scans(base: Path) -> Path:
    """An output folder ``base/out`` with three scans (``scan-1`` .. ``scan-3``) and their ledger.

    Built once per test module (``pristine`` fixtures); tests work on copies of it.
    """
    out = base / "out"
    out.mkdir()
    cfg = tiny_model_config(base)
    for i, name in enumerate(["scan-1", "scan-2", "scan-3"]):
        write_scan_outputs(out, name, seed=i, model_cfg=cfg)
    return out

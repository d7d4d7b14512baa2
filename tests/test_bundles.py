"""MONAI bundles as models (issue 13 item 1): built with MONAI's own bundle tooling in a temp
folder (nothing downloaded), explained through the CLI, refused with a message otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from icam_med.audit.hashing import sha256_file
from icam_med.audit.schema import validate_record
from icam_med.cli import main as cli_main
from icam_med.config import ConfigError, load_config
from icam_med.evaluation.dicom_series import write_dicom_series
from icam_med.io import load_volume
from tests.io_helpers import blob_volume

NET = {"_target_": "DenseNet121", "spatial_dims": 3, "in_channels": 1,
       "out_channels": "@num_classes", "init_features": 4, "growth_rate": 4,
       "block_config": [1, 1, 1, 1]}
METADATA = {
    "name": "tiny_lesion_bundle", "version": "0.2.1", "monai_version": "1.6.1",
    "task": "lesion present or absent", "authors": "icam-med tests",
    "network_data_format": {
        "inputs": {"image": {"type": "image", "num_channels": 1,
                             "spatial_shape": [32, 32, 32]}},
        "outputs": {"pred": {"type": "probabilities", "num_channels": 2,
                             "channel_def": {"0": "absent", "1": "present"}}},
    },
}


def _inference(network_def=None, transforms=None) -> dict:
    """An inference config in the Model Zoo's shape: imports, device, loader transforms,
    the evaluator and its handlers (items icam-med must never evaluate)."""
    return {
        "imports": ["$import glob"],
        "bundle_root": ".",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "num_classes": 2,
        "network_def": network_def or NET,
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": transforms or [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "monai.transforms.ScaleIntensityd", "keys": "image"},
            {"_target_": "Resized", "keys": "@image_keys", "spatial_size": [32, 32, 32]},
            {"_target_": "EnsureTyped", "keys": "image", "device": "@device"},
        ]},
        "image_keys": ["image"],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device",
                      "val_data_loader": "$exec('import os; os.system(\"false\")')",
                      "network": "@network"},
    }


def make_bundle(folder: Path, *, network_def=None, transforms=None, weights=True) -> Path:
    from monai.bundle import ConfigParser, init_bundle

    inference = _inference(network_def, transforms)
    net = None
    if weights:
        parser = ConfigParser({"num_classes": 2, "network_def": network_def or NET})
        torch.manual_seed(3)
        net = parser.get_parsed_content("network_def")
    init_bundle(str(folder), network=net, metadata_str=METADATA, inference_str=inference)
    return folder


def write_config(folder: Path, bundle: Path, **model) -> Path:
    data = {"model": {"bundle": str(bundle), **model},
            "method": {"name": "gradcam", "target_layers": ["features.denseblock3"]}}
    path = folder / "bundle.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.fixture
def bundle(tmp_path):
    return make_bundle(tmp_path / "tiny_bundle")


def test_bundle_config_reads_network_weights_preprocessing_and_metadata(tmp_path, bundle):
    cfg = load_config(write_config(tmp_path, bundle, bundle_config="inference"))
    m = cfg.model
    assert m.architecture == "monai.networks.nets.densenet:DenseNet121"
    assert m.args["out_channels"] == 2 and m.args["block_config"] == [1, 1, 1, 1]
    assert m.weights == bundle / "models" / "model.pt"
    assert m.labels == ("absent", "present") and m.spatial_size == (32, 32, 32)
    assert m.name == "tiny_lesion_bundle"
    # Loaders, channel-first and device moves dropped; the rest kept, references resolved.
    assert [s["name"] for s in cfg.preprocessing] == ["Orientationd", "ScaleIntensityd", "Resized"]
    assert cfg.preprocessing[2]["keys"] == ["image"]
    assert m.bundle["name"] == "tiny_lesion_bundle" and m.bundle["version"] == "0.2.1"
    assert m.bundle["config_sha256"] == sha256_file(bundle / "configs" / "inference.json")
    assert m.bundle["metadata"]["task"] == "lesion present or absent"
    assert any(d.startswith("LoadImaged") for d in m.bundle["dropped_transforms"])


def test_bundle_explained_through_the_cli(tmp_path, bundle, capsys):
    scan = tmp_path / "scan"
    write_dicom_series(blob_volume((12, 20, 18), centre_zyx=(6, 10, 9)), scan,
                       spacing=(1.0, 1.1, 2.0), origin=(-9, 4, 20), modality="CT")
    sha = sha256_file(bundle / "models" / "model.pt")
    config = write_config(tmp_path, bundle, weights_sha256=sha)
    out = tmp_path / "out"
    rc = cli_main(["explain", str(scan), "--config", str(config), "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "Traceback" not in captured.err
    assert "predicted: absent" in captured.out or "predicted: present" in captured.out
    _, info = load_volume(scan)
    cam = nib.load(str(out / "cam.nii.gz"))
    assert cam.shape == info.shape
    np.testing.assert_allclose(cam.affine, info.affine, atol=1e-4)
    record = json.loads((out / "cam.icam.json").read_text())
    validate_record(record)
    model = record["model"]
    assert model["weights_sha256"] == sha and model["labels"] == ["absent", "present"]
    assert model["bundle"]["name"] == "tiny_lesion_bundle"
    assert model["bundle"]["version"] == "0.2.1"
    assert model["bundle"]["config_sha256"] == sha256_file(bundle / "configs" / "inference.json")
    assert [s["name"] for s in record["preprocessing"]] == ["Orientationd", "ScaleIntensityd",
                                                            "Resized"]


def test_bundle_weights_are_pinned(tmp_path, bundle, capsys):
    config = write_config(tmp_path, bundle, weights_sha256="0" * 64)
    rc = cli_main(["explain", str(tmp_path), "--config", str(config), "--out",
                   str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "not the audited ones" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("network_def", "transforms", "message"), [
    ({**NET, "_target_": "torch.nn.Conv3d"}, None, r"network_def.*not an allowed source"),
    ({**NET, "_target_": "os.system"}, None, r"network_def.*not an allowed source"),
    ({**NET, "init_features": "$__import__('os').getpid() % 4 + 4"}, None,
     r"network_def#init_features' is an expression.*never evaluates"),
    ({**NET, "act": {"_target_": "torch.nn.ReLU"}}, None, r"nested component"),
    (None, [{"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "ScaleIntensityd", "keys": ["image", "label"]}],
     r"works on keys \['image', 'label'\].*Use keys: image"),
    (None, [{"_target_": "ScaleIntensity"}], r"not a dictionary transform on 'image'"),
    (None, [{"_target_": "Lambdad", "keys": "image", "func": "$lambda x: x * 2"}],
     r"is an expression"),
    (None, [{"_target_": "torch.nn.Identity"}], r"not a MONAI transform"),
])
def test_bundle_items_icam_med_cannot_take(tmp_path, network_def, transforms, message, capsys):
    bundle = make_bundle(tmp_path / "b", network_def=network_def, transforms=transforms,
                         weights=False)
    config = write_config(tmp_path, bundle)
    with pytest.raises(ConfigError, match=message):
        load_config(config)
    rc = cli_main(["explain", str(tmp_path), "--config", str(config), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and str(config) in err


def test_bundle_misconfigurations(tmp_path, bundle):
    cases = [
        ({"architecture": "DenseNet121"}, r"both set.*remove architecture and args"),
        ({"bundle_config": "train.json"}, r"no config 'train.json' in configs/.*inference.json"),
    ]
    for extra, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_config(write_config(tmp_path, bundle, **extra))
    with pytest.raises(ConfigError, match="not a MONAI bundle folder"):
        load_config(write_config(tmp_path, tmp_path / "nothing"))
    (bundle / "models" / "model.pt").rename(bundle / "models" / "model.ts")
    with pytest.raises(ConfigError, match=r"only a TorchScript model.*state dict"):
        load_config(write_config(tmp_path, bundle))
    data = {"model": {"name": "x", "architecture": "DenseNet121", "bundle_config": "a.json"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"bundle_config' is set without 'model\.bundle'"):
        load_config(tmp_path / "c.yaml")

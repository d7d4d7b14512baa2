"""Sliding-window explanation (issue 13 item 5): windows at MONAI's positions, only those that
intersect the target region explained, maps stitched with the inference's own blending; the
config's inference.sliding_window through the CLI gives a map on the scan's grid and a record
of the settings. Tiny random-weight UNets; the 512x512x300 figures come from
scripts/bench_sliding.py, never from a timed test.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from monai.networks.nets import UNet

from icam_med.audit.schema import validate_record
from icam_med.cam import SegmentationTarget, make_cam
from icam_med.cam.sliding import SlidingWindow, explain_sliding, predict_sliding
from icam_med.cli import main as cli_main
from icam_med.config import ConfigError, parse_config
from icam_med.io import load_volume


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=[4, 8], strides=[2],
                num_res_units=0).eval()


@pytest.fixture(scope="module")
def volume():
    torch.manual_seed(1)
    return torch.randn(1, 1, 40, 36, 12)


def test_one_window_is_the_engines_own_explanation(unet):
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    cam = make_cam("gradcam", unet, target_layers="last")
    region = torch.zeros(16, 16, 16)
    region[3:9, 4:12, 2:7] = 1
    res = explain_sliding(cam, x, SlidingWindow((16, 16, 16), mode="gaussian"), class_index=1,
                          region=region)
    direct = cam(x, targets=SegmentationTarget(1, region[None]))
    assert (res.windows_total, res.windows_explained) == (1, 1)
    # one window: Z = its importance, so its mask is the region itself and its map comes back
    torch.testing.assert_close(res.fused[0], direct.fused[0, 0], atol=1e-5, rtol=0)
    assert res.score == pytest.approx(float(direct.scores[0]), rel=1e-5)


@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_score_is_the_blended_inference_output_over_the_region(unet, volume, mode):
    """The window terms add up to the target on MONAI's blended output, padding included
    (the last axis, 12, is smaller than the window)."""
    window = SlidingWindow((16, 16, 16), overlap=0.5, mode=mode, sw_batch_size=3)
    region = torch.zeros(volume.shape[2:])
    region[5:30, 8:20, 2:10] = 1
    cam = make_cam("gradcam", unet, target_layers="last")
    res = explain_sliding(cam, volume, window, class_index=1, region=region)
    blended = predict_sliding(unet, volume, window)
    assert res.score == pytest.approx(float((blended[0, 1] * region).sum()), rel=1e-4)
    assert res.fused.shape == (1, *volume.shape[2:])
    assert float(res.fused.min()) == 0.0 and float(res.fused.max()) == pytest.approx(1.0)


def test_predicted_region_comes_from_the_blended_prediction(unet, volume):
    window = SlidingWindow((16, 16, 16), overlap=0.25)
    cam = make_cam("gradcam", unet, target_layers="last")
    res = explain_sliding(cam, volume, window, class_index=1)
    blended = predict_sliding(unet, volume, window)
    predicted = (blended[0].argmax(0) == 1).float()
    torch.testing.assert_close(res.region[0], predicted)
    assert res.score == pytest.approx(float(blended[0, 1][predicted > 0].sum()), rel=1e-4)


def test_only_windows_meeting_the_region_are_explained(unet, volume):
    window = SlidingWindow((16, 16, 16), overlap=0.0)
    region = torch.zeros(volume.shape[2:])
    region[1:4, 2:5, 1:3] = 1  # inside the first window only
    calls = []

    class Counting:
        def __init__(self, inner):
            self.inner, self.model = inner, inner.model

        def __call__(self, x, targets=None):
            calls.append(x.shape[0])
            return self.inner(x, targets=targets)

    res = explain_sliding(Counting(make_cam("gradcam", unet, target_layers="last")), volume,
                          window, class_index=1, region=region)
    # 40 x 36 x 12(->16 padded) with 16^3 windows and no overlap: 3 x 3 x 1 windows
    assert res.windows_total == 9 and res.windows_explained == 1 and calls == [1]
    # a skipped window contributes a zero map, as in the inference's blending
    assert float(res.fused[0, 16:, :, :].abs().max()) == 0.0
    assert float(res.fused[0, :16, :16, :].max()) == pytest.approx(1.0)


def test_empty_region_and_classifiers_are_refused(unet, volume):
    from monai.networks.nets import DenseNet121

    cam = make_cam("gradcam", unet, target_layers="last")
    with pytest.raises(ValueError, match="region is empty"):
        explain_sliding(cam, volume, SlidingWindow((16, 16, 16)), class_index=1,
                        region=torch.zeros(volume.shape[2:]))
    with pytest.raises(ValueError, match="shape"):
        explain_sliding(cam, volume, SlidingWindow((16, 16, 16)), class_index=1,
                        region=torch.ones(4, 4, 4))
    net = DenseNet121(spatial_dims=3, in_channels=1, out_channels=2, init_features=4,
                      growth_rate=4, block_config=(1, 1, 1, 1)).eval()
    classifier = make_cam("gradcam", net, target_layers=["features.denseblock3"])
    with pytest.raises(ValueError, match="segmentation networks"):
        explain_sliding(classifier, torch.randn(1, 1, 40, 32, 32), SlidingWindow((32, 32, 32)),
                        class_index=1)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"roi_size": (16, 0, 16)}, "roi_size"),
    ({"roi_size": (16, 16, 16), "overlap": 1.0}, "overlap"),
    ({"roi_size": (16, 16, 16), "mode": "gauss"}, "mode"),
])
def test_bad_window_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SlidingWindow(**kwargs)


CONFIG = {
    "model": {"name": "unet-sw", "architecture": "UNet",
              "args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                       "channels": [4, 8], "strides": [2], "num_res_units": 0},
              "labels": ["background", "lesion"]},
    "preprocessing": [{"name": "Orientationd", "axcodes": "RAS"},
                      {"name": "Spacingd", "pixdim": [1.5, 1.5, 1.5]},
                      {"name": "NormalizeIntensityd"}],
    "method": {"name": "gradcam", "target_layers": "last"},
    "target": {"label": "lesion"},
    "inference": {"sliding_window": {"roi_size": [16, 16, 16], "overlap": 0.25,
                                     "mode": "gaussian", "sw_batch_size": 2}},
}


def test_sliding_window_config_through_the_cli(tmp_path, capsys):
    rng = np.random.default_rng(5)
    affine = np.diag([-1.2, 1.0, 2.0, 1.0])
    affine[:3, 3] = (30.0, -12.0, 4.0)
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(rng.normal(50, 10, (40, 30, 16)).astype(np.float32), affine),
             str(scan))
    config = tmp_path / "sw.yaml"
    config.write_text(yaml.safe_dump(CONFIG), encoding="utf-8")
    out = tmp_path / "out"
    rc = cli_main(["explain", str(scan), "--config", str(config), "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "sliding window: roi [16, 16, 16]" in captured.out
    _, info = load_volume(scan)
    cam = nib.load(str(out / "cam.nii.gz"))
    assert cam.shape == info.shape
    np.testing.assert_allclose(cam.affine, info.affine, atol=1e-4)
    record = json.loads((out / "cam.icam.json").read_text())
    validate_record(record)
    sw = record["method"]["sliding_window"]
    assert sw["roi_size"] == [16, 16, 16] and sw["mode"] == "gaussian"
    # the preprocessed grid: 40*1.2/1.5=32, 30/1.5=20, 16*2/1.5=21.3 -> 21; windows at MONAI's
    # interval 12: 3 x 2 x 2
    assert sw["windows_total"] == 12 and 1 <= sw["windows_explained"] <= 12
    assert record["method"]["target"]["region"]["source"] == "predicted"


def test_sliding_window_config_errors():
    bad = json.loads(json.dumps(CONFIG))
    bad["model"]["input"] = {"spatial_size": [32, 32, 32]}
    with pytest.raises(ConfigError, match="roi_size"):
        parse_config(bad)
    bad = json.loads(json.dumps(CONFIG))
    bad["inference"]["sliding_window"]["overlap"] = 1.5
    with pytest.raises(ConfigError, match=r"inference\.sliding_window\.overlap"):
        parse_config(bad)
    bad = json.loads(json.dumps(CONFIG))
    bad["inference"]["sliding_window"]["roi"] = [16, 16, 16]
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['roi'\] in inference.sliding_window"):
        parse_config(bad)

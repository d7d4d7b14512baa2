"""2-D radiographs end to end: DX, CR and MG DICOM files and 2-D NIfTI in; maps on the
radiograph's own pixel grid, a PNG overlay and a Presentation State out.

Every DICOM here is a real file written with pydicom (icam_med.evaluation.radiographs), or
pydicom's own CR test file; the model is a 2-D LesionNet trained here, in seconds, to find
a bright round finding; the validator is dicom3tools' dciodvfy.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
import yaml
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from icam_med.audit.schema import validate_record
from icam_med.cli import main as cli_main
from icam_med.evaluation.radiographs import (
    synthetic_radiograph,
    train_finding_classifier,
    write_radiograph,
)
from icam_med.explain import explain_scan
from icam_med.io import load_volume
from icam_med.io.radiograph import is_radiograph
from icam_med.io.validation import GeometryError
from icam_med.networks import LesionNet
from tests.io_helpers import dciodvfy

ARGS = {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "channels": [8, 16, 32],
        "norm": "batch"}
PRE = [{"name": "Resized", "spatial_size": [64, 64], "mode": "area"},
       {"name": "NormalizeIntensityd"}]


def _radiograph(path, shape=(300, 240), finding=(100, 170), radius=16.0, seed=1, **kw):
    image = synthetic_radiograph(np.random.default_rng(seed), shape, finding=finding,
                                 radius=radius)
    return write_radiograph(path, image, **kw), image


def _config(folder, *, weights=None, architecture="icam_med.networks:LesionNet", args=None,
            pre=None, method=None, spatial=(64, 64), name="t2d"):
    data = {"model": {"name": name, "architecture": architecture, "args": args or ARGS,
                      "labels": ["absent", "present"],
                      "input": {"channels": 1, "spatial_size": list(spatial)}},
            "preprocessing": pre or PRE,
            "method": method or {"name": "integrative", "target_layers": "stages"}}
    if weights is not None:
        data["model"]["weights"] = str(weights)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-D LesionNet trained to find the synthetic finding (about 15 s on one free core)."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("model2d")
    torch.manual_seed(0)
    model = LesionNet(**ARGS)
    train_finding_classifier(model, steps=80, batch_size=24, seed=3, upsample=1)
    weights = folder / "finder.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return _config(folder, weights=weights)


# ---------------------------------------------------------------------------------------
# Input: spacing, geometry and the viewer's display chain
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("modality", "tag", "used"), [
    ("DX", "ImagerPixelSpacing", "ImagerPixelSpacing (0018,1164)"),
    ("CR", "PixelSpacing", "PixelSpacing (0028,0030)"),
    ("MG", "both", "PixelSpacing (0028,0030)"),
])
def test_projection_files_load_on_their_pixel_grid_with_the_spacing_recorded(
        tmp_path, modality, tag, used):
    path, image = _radiograph(tmp_path / "x.dcm", modality=modality, spacing=(0.3, 0.25),
                              spacing_tag=tag)
    loaded, info = load_volume(path)
    assert loaded.shape == (1, 240, 300, 1)  # (column, row, one slice)
    assert is_radiograph(info) and info.modality == modality
    # columns -> x, rows -> y (LPS), written in RAS as every DICOM here
    np.testing.assert_allclose(info.affine, np.diag([-0.25, -0.3, 1.0, 1.0]))
    checks = {c.name: c for c in info.checks}
    assert checks["pixel_spacing"].detail.startswith(used)
    if tag == "both":  # the calibrated spacing wins over the detector's
        assert "ImagerPixelSpacing" not in checks["pixel_spacing"].detail
    if tag == "ImagerPixelSpacing":
        assert "detector plane" in checks["pixel_spacing"].detail
    # no window in the file: the display values are the stored ones, rows/columns kept
    np.testing.assert_array_equal(loaded[0, :, :, 0].numpy().T, np.rint(image))


def test_a_file_without_any_spacing_is_refused_unless_allowed(tmp_path):
    path, _ = _radiograph(tmp_path / "x.dcm", spacing_tag="none")
    with pytest.raises(GeometryError, match=r"pixel size is unknown.*allow_unknown_spacing"):
        load_volume(path)
    _, info = load_volume(path, geometry={"allow_unknown_spacing": True})
    check = {c.name: c for c in info.checks}["pixel_spacing"]
    assert check.status == "warned" and "1 x 1 mm assumed" in check.detail
    assert info.spacing[:2] == (1.0, 1.0)


def test_monochrome1_displays_as_its_monochrome2_twin(tmp_path):
    m2, _ = _radiograph(tmp_path / "m2.dcm")
    m1, _ = _radiograph(tmp_path / "m1.dcm", photometric="MONOCHROME1")
    assert pydicom.dcmread(m1).pixel_array.mean() > 2048  # stored inverted: dense is dark
    a, _ = load_volume(m2)
    b, info = load_volume(m1)
    np.testing.assert_array_equal(a.numpy(), b.numpy())  # no window: exactly the same
    assert "MONOCHROME1 inverted" in {c.name: c for c in info.checks}["display_transform"].detail
    # With a window: the same picture within one display step of pydicom's LINEAR window
    w2, _ = _radiograph(tmp_path / "w2.dcm", window=(1800.0, 2400.0))
    w1, _ = _radiograph(tmp_path / "w1.dcm", window=(1800.0, 2400.0), photometric="MONOCHROME1")
    c, _ = load_volume(w2)
    d, _ = load_volume(w1)
    assert float((c - d).abs().max()) <= 4095 / 2399 + 1e-3


def test_window_and_voi_lut_are_applied_as_a_viewer_would(tmp_path):
    path, image = _radiograph(tmp_path / "w.dcm", window=(1500.0, 1000.0))
    loaded, info = load_volume(path)
    plane = loaded[0, :, :, 0].numpy().T
    stored = np.rint(image)
    assert plane[stored <= 1000].max() == 0 and plane[stored > 2000].min() == 4095  # clipped
    inside = (stored > 1100) & (stored < 1900)
    expected = ((stored[inside] - 1499.5) / 999 + 0.5) * 4095  # PS3.3 C.11.2.1.2.1
    np.testing.assert_allclose(plane[inside], expected, atol=1e-2)
    assert "window centre 1500 width 1000" in {c.name: c.detail for c in info.checks}[
        "display_transform"]
    lut = (np.sqrt(np.arange(4096) / 4095) * 65535).astype(np.uint16)  # a gamma-like VOI LUT
    path, image = _radiograph(tmp_path / "lut.dcm", voi_lut=lut)
    loaded, info = load_volume(path)
    np.testing.assert_array_equal(loaded[0, :, :, 0].numpy().T, lut[np.rint(image).astype(int)])
    assert "VOI LUT" in {c.name: c.detail for c in info.checks}["display_transform"]


def test_pydicoms_real_monochrome1_cr_file(tmp_path):
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG3_UNCR.dcm")  # CR, MONOCHROME1, 1760 x 1760, no spacing
    with pytest.raises(GeometryError, match=r"RG3_UNCR\.dcm: the pixel size is unknown"):
        load_volume(path)
    image, info = load_volume(path, geometry={"allow_unknown_spacing": True})
    assert image.shape == (1, 1760, 1760, 1) and info.modality == "CR"
    ds = pydicom.dcmread(path)
    stored = ds.pixel_array.astype(np.float64)
    shown = image[0, :, :, 0].numpy().T
    # bright = dense: what the detector stored low (MONOCHROME1) is shown high
    assert np.corrcoef(shown.ravel()[::97], stored.ravel()[::97])[0, 1] < -0.9
    viewer = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    np.testing.assert_allclose(shown, 1023.0 - viewer, atol=1e-3)  # inverted over [0, 1023]


def test_a_folder_of_one_radiograph_loads_and_of_two_is_refused(tmp_path):
    one = tmp_path / "one"
    _radiograph(one / "a.dcm")
    _, info = load_volume(one)
    assert is_radiograph(info) and info.shape == (240, 300, 1)
    two = tmp_path / "two"
    _radiograph(two / "a.dcm")
    _radiograph(two / "b.dcm")
    with pytest.raises(GeometryError, match=r"holds 2 single 2-D images.*each is a scan"):
        load_volume(two)


def test_a_2d_nifti_is_a_2d_image(tmp_path):
    data = np.arange(30 * 20, dtype=np.float32).reshape(30, 20)
    affine = np.diag([0.5, 0.7, 1.0, 1.0])
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "x.nii.gz"))
    image, info = load_volume(tmp_path / "x.nii.gz")
    assert is_radiograph(info) and image.shape == (1, 30, 20, 1)
    np.testing.assert_allclose(info.affine, affine)
    np.testing.assert_array_equal(image[0, :, :, 0].numpy(), data)


# ---------------------------------------------------------------------------------------
# The map on the radiograph's own grid, and the outputs
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("finding", "photometric"), [((100, 170), "MONOCHROME2"),
                                                      ((210, 70), "MONOCHROME1")])
def test_the_maps_peak_lands_on_the_finding(tmp_path, trained, finding, photometric):
    # non-square image and pixels, resized to 64 x 64 and back
    scan, _ = _radiograph(tmp_path / "dx.dcm", shape=(300, 240), finding=finding, radius=16.0,
                          spacing=(0.3, 0.25), photometric=photometric, window=(2048, 4096))
    explanation, written = explain_scan(scan, trained, tmp_path / "out")
    info = explanation.scan_info
    fused = explanation.fused
    assert fused.shape == (1, 240, 300, 1)
    col, row = np.unravel_index(int(fused[0, :, :, 0].argmax()), (240, 300))
    assert np.hypot(row - finding[0], col - finding[1]) <= 16.0, (row, col)
    assert explanation.predicted_label == "present"
    cam = nib.load(str(tmp_path / "out" / "cam.nii.gz"))
    assert cam.shape == (240, 300, 1)
    np.testing.assert_allclose(cam.affine, info.affine, atol=1e-6)
    np.testing.assert_allclose(np.asarray(cam.dataobj), fused.numpy()[0], atol=1e-6)
    roles = {w.role for w in written}
    assert {"cam_nifti", "overlay_png", "presentation_state", "summary",
            "audit_record"} <= roles and "parametric_map" not in roles


def test_outputs_png_overlay_and_a_valid_presentation_state(tmp_path, trained):
    from PIL import Image

    scan, _ = _radiograph(tmp_path / "cr.dcm", modality="CR", photometric="MONOCHROME1",
                          spacing=(0.3, 0.25), spacing_tag="PixelSpacing", window=(2048, 4096))
    out = tmp_path / "out"
    rc = cli_main(["explain", str(scan), "--config", str(trained), "--out", str(out)])
    assert rc == 0
    record = json.loads((out / "cam.icam.json").read_text())
    validate_record(record)
    pinned = {o["role"]: o for o in record["outputs"]}
    assert {"overlay_png", "presentation_state"} <= set(pinned)
    checks = {c["name"]: c for c in record["input"]["checks"]} if "checks" in record[
        "input"] else {}
    summary = json.loads((out / "cam_summary.json").read_text())
    names = {c["name"] for c in summary["scan"]["checks"]}
    assert {"image_2d", "pixel_spacing", "display_transform"} <= names or checks
    fused = nib.load(str(out / "cam.nii.gz")).get_fdata()[:, :, 0].T  # (rows, columns)
    row, col = np.unravel_index(int(fused.argmax()), fused.shape)
    # PNG: the radiograph's own size, rows down; colour where the map is high, grey elsewhere
    png = np.asarray(Image.open(out / "cam_overlay.png"))
    assert png.shape == (300, 240, 3)
    r, _, b = png[row, col].astype(int)
    assert r - b > 40  # inferno's warm end at the peak
    low = fused < 0.01
    assert np.abs(png[low][:, 0].astype(int) - png[low][:, 2].astype(int)).max() <= 2
    # GSPS: valid, references the radiograph, keeps its window, inverse for MONOCHROME1
    gsps = out / "cam_gsps.dcm"
    errors, _warnings = dciodvfy(gsps)
    assert errors == []
    ps = pydicom.dcmread(gsps)
    src = pydicom.dcmread(scan)
    ref = ps.ReferencedSeriesSequence[0].ReferencedImageSequence[0]
    assert ref.ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert ps.PresentationLUTShape == "INVERSE"
    assert float(ps.SoftcopyVOILUTSequence[0].WindowCenter) == float(src.WindowCenter)
    objects = ps.GraphicAnnotationSequence[0].GraphicObjectSequence
    assert all(o.GraphicAnnotationUnits == "PIXEL" for o in objects)
    circle = next(o for o in objects if o.GraphicType == "CIRCLE")
    np.testing.assert_allclose(circle.GraphicData[:2], [col + 0.5, row + 0.5], atol=1e-3)
    polylines = [np.asarray(o.GraphicData).reshape(-1, 2) for o in objects
                 if o.GraphicType == "POLYLINE"]
    assert polylines and all(p.min() >= 0 and p[:, 0].max() <= 240 and p[:, 1].max() <= 300
                             for p in polylines)


def test_nifti_input_gets_the_nifti_map_and_the_png(tmp_path, trained):
    image = synthetic_radiograph(np.random.default_rng(4), (300, 240), finding=(150, 60),
                                 radius=16.0)
    affine = np.diag([-0.25, -0.3, 1.0, 1.0])
    nib.save(nib.Nifti1Image(image.T.astype(np.float32), affine), str(tmp_path / "x.nii.gz"))
    out = tmp_path / "out"
    explanation, written = explain_scan(tmp_path / "x.nii.gz", trained, out)
    assert {w.role for w in written} >= {"cam_nifti", "overlay_png"}
    assert not (out / "cam_gsps.dcm").exists()
    col, row = np.unravel_index(int(explanation.fused[0, :, :, 0].argmax()), (240, 300))
    assert np.hypot(row - 150, col - 60) <= 16.0


def test_a_3d_config_on_a_radiograph_is_refused_with_the_fix(tmp_path, capsys):
    scan, _ = _radiograph(tmp_path / "dx.dcm")
    pre3d = [{"name": "Spacingd", "pixdim": [2.0, 2.0, 2.0]},
             {"name": "ResizeWithPadOrCropd", "spatial_size": [16, 16, 16]}]
    config = _config(tmp_path, args={**ARGS, "spatial_dims": 3}, pre=pre3d, spatial=(16, 16, 16))
    out = tmp_path / "out"
    rc = cli_main(["explain", str(scan), "--config", str(config), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "is a 2-D image" in err and "2-D model" in err
    assert not (out / "cam.nii.gz").exists()


# ---------------------------------------------------------------------------------------
# Batch audit, report and napari take 2-D scans
# ---------------------------------------------------------------------------------------

def test_batch_audit_verify_and_report_of_a_folder_of_radiographs(tmp_path, trained, capsys):
    from icam_med.audit.verify import verify_folder

    scans = tmp_path / "xrays"
    _radiograph(scans / "a.dcm", finding=(100, 170))
    _radiograph(scans / "b.dcm", finding=None, modality="CR", photometric="MONOCHROME1")
    out = tmp_path / "audit"
    rc = cli_main(["audit", str(scans), "--config", str(trained), "--out", str(out),
                   "--no-progress"])
    captured = capsys.readouterr()
    stdout = captured.out
    assert rc == 0, stdout + captured.err
    assert "2 scan(s): 2 explained" in stdout
    report = verify_folder(out)
    assert report.ok and report.n_scans == 2, report.problems
    for sid in ("a", "b"):
        folder = out / "scans" / sid
        assert (folder / "cam_overlay.png").is_file() and (folder / "cam_gsps.dcm").is_file()
        validate_record(json.loads((folder / "cam.icam.json").read_text()))
    rc = cli_main(["report", str(out), "--scans", str(scans), "--config", str(trained),
                   "--overwrite"])
    assert rc == 0, capsys.readouterr().err
    text = (out / "report.html").read_text()
    # each radiograph has its section with its map drawn over the radiograph it matched
    assert "<h3>a</h3>" in text and "<h3>b</h3>" in text
    assert text.count("map over scan") >= 2
    assert text.count("yes (voxel SHA-256 matches the record)") >= 2  # drawn over each scan


def test_napari_layers_of_a_radiograph_and_its_explanation(tmp_path, trained):
    from icam_med.explain import explain_volume, prepare
    from napari_plugin._layers import explanation_layers, scan_layer
    from napari_plugin._reader import get_reader

    scan, _ = _radiograph(tmp_path / "dx.dcm", photometric="MONOCHROME1", window=(1500, 1000))
    image, info = load_volume(scan)
    data, kwargs, kind = scan_layer(image, info)
    assert kind == "image" and data.shape == (1, 300, 240)  # napari (z, y, x): rows down
    # the stored window (centre 2595 on the inverted values) is already applied: the
    # layer's limits span the displayed values, not the file's raw window
    lo, hi = kwargs["contrast_limits"]
    assert lo < 1000 and hi > 3000
    explanation = explain_volume(image, info, prepare(trained))
    layers = explanation_layers(explanation, scan_name="dx")
    maps = [layer for layer in layers if layer[2] == "image" and layer[0].shape == (1, 300, 240)]
    assert maps
    np.testing.assert_allclose(maps[0][1]["affine"], kwargs["affine"])
    # the plugin's reader (its public entry) opens the radiograph file on the same grid
    (read,) = get_reader(str(scan))(str(scan))
    assert read[0].shape == (1, 300, 240)
    np.testing.assert_allclose(read[1]["affine"], kwargs["affine"])


def test_a_parametric_map_of_a_radiograph_is_refused_naming_the_output_to_use(tmp_path):
    from icam_med.io import write_parametric_map

    scan, _ = _radiograph(tmp_path / "dx.dcm")
    image, info = load_volume(scan)
    with pytest.raises(ValueError, match=r"2-D image.*Presentation State"):
        write_parametric_map(image * 0, info, tmp_path / "pm.dcm", method="gradcam")
    assert not (tmp_path / "pm.dcm").exists()

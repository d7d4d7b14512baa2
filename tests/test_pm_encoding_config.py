"""The Parametric Map's encoding chosen in the config (``outputs.parametric_map``): a real CT
series explained through the CLI gives the transfer syntax asked for, one that dcm2niix (and
so a PACS that refuses deflate) reads; a compression DICOM does not define for float pixel
data is refused when the config is loaded, before anything is written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import yaml
from io_helpers import blob_volume, listing, write_tiny_config
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    RLELossless,
)

from icam_med import cli
from icam_med.config import (
    PM_COMPRESSIONS,
    PM_PIXEL_TYPES,
    ConfigError,
    ParametricMapConfig,
    load_config,
)
from icam_med.evaluation.dicom_series import write_dicom_series
from icam_med.io import writers


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ct") / "series"
    write_dicom_series(blob_volume((6, 14, 12)), folder, spacing=(0.8, 1.1, 3.0),
                       origin=(-10, 5, 40), modality="CT")
    return folder


def _config(folder: Path, outputs: dict | None) -> Path:
    path = write_tiny_config(folder)
    if outputs is not None:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        data["outputs"] = outputs
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _explain(series: Path, config: Path, out: Path, capsys) -> tuple[int, str]:
    rc = cli.main(["explain", str(series), "--config", str(config), "--out", str(out)])
    return rc, capsys.readouterr().err


def _map_file(out: Path) -> Path:
    (pm,) = [p for p in out.iterdir() if p.name.endswith("_parametric_map.dcm")]
    return pm


def _summary(out: Path) -> dict:
    (path,) = [p for p in out.iterdir() if p.name.endswith("_summary.json")]
    return json.loads(path.read_text(encoding="utf-8"))


def _fused(out: Path) -> np.ndarray:
    (path,) = [p for p in out.iterdir() if p.name.endswith(".nii.gz")
               and "_layer_" not in p.name and "_region" not in p.name]
    return np.asarray(nib.load(str(path)).dataobj, dtype=np.float64)


def test_config_names_match_the_writer():
    assert PM_COMPRESSIONS == writers.PM_COMPRESSIONS
    assert set(PM_PIXEL_TYPES) == {"float32", "uint16"}
    # the config's defaults are the writer's
    import inspect

    params = inspect.signature(writers.write_parametric_map).parameters
    default = ParametricMapConfig()
    assert default.writer_options() == {"pixel_type": params["pixel_type"].default,
                                        "compress": params["compress"].default}


def test_uncompressed_map_is_read_by_dcm2niix(tmp_path, ct_series, capsys):
    out = tmp_path / "o"
    rc, err = _explain(ct_series, _config(tmp_path, {"parametric_map": {"compression": "none"}}),
                       out, capsys)
    assert rc == 0, err
    pm = _map_file(out)
    ds = pydicom.dcmread(pm)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert "FloatPixelData" in ds
    assert _summary(out)["parametric_map_encoding"] == {"pixel_type": "float32",
                                                        "compression": "none"}
    exe = Path(sys.executable).parent / "dcm2niix"
    if not exe.exists():
        pytest.skip("dcm2niix (pip dcm2niix) not installed")
    nout = tmp_path / "dcm2niix"
    nout.mkdir()
    proc = subprocess.run([str(exe), "-s", "y", "-z", "n", "-f", "pm", "-o", str(nout), str(pm)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    converted = np.asarray(nib.load(str(nout / "pm.nii")).dataobj, dtype=np.float64).squeeze()
    fused = _fused(out)
    assert converted.size == fused.size
    # the same values as the NIfTI map (float32 exact; dcm2niix may reorder the voxels)
    np.testing.assert_allclose(np.sort(converted.ravel()), np.sort(fused.ravel()), atol=1e-6)
    assert converted.max() > 0


def test_uint16_rle_map_has_integer_pixels(tmp_path, ct_series, capsys):
    out = tmp_path / "o"
    cfg = _config(tmp_path, {"parametric_map": {"pixel_type": "uint16", "compression": "rle"}})
    rc, err = _explain(ct_series, cfg, out, capsys)
    assert rc == 0, err
    ds = pydicom.dcmread(_map_file(out))
    assert ds.file_meta.TransferSyntaxUID == RLELossless
    assert "PixelData" in ds and "FloatPixelData" not in ds
    assert ds.BitsAllocated == 16 and ds.PixelRepresentation == 0
    pixels = ds.pixel_array
    assert pixels.dtype == np.uint16
    rwvm = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    values = pixels.astype(np.float64) * float(rwvm.RealWorldValueSlope) + float(
        rwvm.RealWorldValueIntercept)
    fused = _fused(out)
    np.testing.assert_allclose(np.sort(values.ravel()), np.sort(fused.ravel()), atol=1 / 65535)
    assert _summary(out)["parametric_map_encoding"] == {"pixel_type": "uint16",
                                                        "compression": "rle"}


def test_default_stays_deflated_float(tmp_path, ct_series, capsys):
    out = tmp_path / "o"
    rc, err = _explain(ct_series, _config(tmp_path, None), out, capsys)
    assert rc == 0, err
    ds = pydicom.dcmread(_map_file(out))
    assert ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert "FloatPixelData" in ds
    assert _summary(out)["parametric_map_encoding"] == {"pixel_type": "float32",
                                                        "compression": "deflate"}


@pytest.mark.parametrize("compression", ["jpeg-ls", "rle"])
def test_float_with_encapsulated_compression_is_refused_before_writing(
        tmp_path, ct_series, capsys, compression):
    out = tmp_path / "o"
    cfg = _config(tmp_path, {"parametric_map": {"compression": compression}})
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    message = str(info.value)
    assert str(cfg) in message and "outputs.parametric_map.compression" in message
    assert repr(compression) in message and "uint16" in message and "deflate" in message
    rc, err = _explain(ct_series, cfg, out, capsys)
    assert rc == 2
    assert "outputs.parametric_map.compression" in err and "Traceback" not in err
    assert listing(out) == []


def test_unknown_compression_is_refused_naming_the_choices(tmp_path):
    cfg = _config(tmp_path, {"parametric_map": {"compression": "jpeg2000"}})
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    message = str(info.value)
    assert "outputs.parametric_map.compression" in message and "jpeg2000" in message
    assert "'rle'" in message and "'none'" in message


def test_batch_audit_honours_the_config(tmp_path, ct_series, capsys):
    from pydicom.uid import JPEGLSLossless

    from icam_med.audit.verify import verify_folder

    cfg = _config(tmp_path, {"parametric_map": {"pixel_type": "uint16",
                                                "compression": "jpeg-ls"}})
    scans = tmp_path / "scans.csv"
    scans.write_text(f"path\n{ct_series}\n", encoding="utf-8")
    out = tmp_path / "audit"
    rc = cli.main(["audit", str(scans), "--config", str(cfg), "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.out + captured.err
    (pm,) = out.rglob("*_parametric_map.dcm")
    ds = pydicom.dcmread(pm)
    assert ds.file_meta.TransferSyntaxUID == JPEGLSLossless
    assert ds.pixel_array.dtype == np.uint16
    (summary,) = out.rglob("*_summary.json")
    assert json.loads(summary.read_text(encoding="utf-8"))["parametric_map_encoding"] == {
        "pixel_type": "uint16", "compression": "jpeg-ls"}
    report = verify_folder(out)  # the summary (and so the encoding) is sealed in the record
    assert report.ok, report.problems

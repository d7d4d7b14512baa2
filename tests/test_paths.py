"""File-name conventions (icam_med.paths): the one place stems and output names come from."""

from __future__ import annotations

from pathlib import Path

import pytest

from icam_med.discovery import collect_scans
from icam_med.explain import output_paths
from icam_med.paths import (
    audit_folder_for,
    class_stem,
    is_nifti,
    record_path_for,
    scan_stem,
    sidecar_path_for,
)


@pytest.mark.parametrize(("name", "stem"), [
    ("t1.nii.gz", "t1"), ("T1.NII.GZ", "T1"), ("t1.nii", "t1"), ("slice.dcm", "slice"),
    ("ct.series", "ct.series"), ("sub-01.v2.nii.gz", "sub-01.v2"), ("series1", "series1"),
    (".nii.gz", ".nii.gz"),  # a suffix alone is no stem
])
def test_scan_stem_strips_only_known_endings(name, stem):
    assert scan_stem(Path("/data") / name) == stem


def test_is_nifti_by_name_only():
    assert is_nifti("a/b.nii.gz") and is_nifti("b.NII") and not is_nifti("b.nii.gz.bak")
    assert not is_nifti("folder") and not is_nifti("x.dcm")


def test_output_names_and_record_beside_the_map(tmp_path):
    paths = output_paths(tmp_path, is_dicom=True, layer_names=["features.3.conv"],
                         stem=class_stem(2))
    assert {k: p.name for k, p in paths.items()} == {
        "cam_nifti": "cam_class2.nii.gz",
        "parametric_map": "cam_class2_parametric_map.dcm",
        "layer_map:features.3.conv": "cam_class2_layer_features-3-conv.nii.gz",
        "summary": "cam_class2_summary.json",
    }
    assert record_path_for(paths["cam_nifti"]) == tmp_path / "cam_class2.icam.json"
    assert record_path_for(tmp_path / "cam.NII.GZ").name == "cam.icam.json"
    assert sidecar_path_for(tmp_path / "map.nii").name == "map.record.json"
    assert audit_folder_for("/d/t1.nii.gz") == Path("/d/t1_icam")
    assert audit_folder_for("/d/ct_series") == Path("/d/ct_series_icam")


def test_scan_ids_use_the_same_stems(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("a/x.nii.gz", "y.NII", "z.dcm"):
        (tmp_path / name).write_bytes(b"")
    ids = {s.scan_id for s in collect_scans([tmp_path / "a" / "x.nii.gz", tmp_path / "y.NII",
                                             tmp_path / "z.dcm"])}
    assert ids == {"x", "y", "z"}

"""napari plugin without a display: manifest, reader placement, layer data, writer, boundary.

World convention under test: napari world = DICOM patient coordinates (LPS, mm) in napari
axis order (z, y, x); see napari_plugin/_layers.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

pytest.importorskip("napari")

from napari.components import ViewerModel

from napari_plugin._layers import (
    METADATA_KEY,
    audit_name_for,
    contour_layer,
    napari_affine,
    ras_affine,
)
from napari_plugin._reader import get_reader

REPO = Path(__file__).resolve().parents[1]
ANATOMICAL = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"
CT5N = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests" / "98892001" / "CT5N"


def tiny_config(folder: Path, *, in_channels: int = 1, size: int = 16) -> Path:
    """A small random-weight 3D classifier config (no weights file)."""
    cfg = folder / "tiny.yaml"
    cfg.write_text(
        "model:\n"
        "  name: tiny\n"
        "  architecture: icam_med.networks:LesionNet\n"
        f"  args: {{spatial_dims: 3, in_channels: {in_channels}, out_channels: 2,"
        " channels: [4, 8], norm: batch}\n"
        "  labels: [absent, present]\n"
        f"  input: {{channels: {in_channels}, spatial_size: [{size}, {size}, {size}]}}\n"
        "preprocessing:\n"
        "  - {name: Orientationd, axcodes: RAS}\n"
        "  - {name: Spacingd, pixdim: [4.0, 4.0, 4.0], mode: bilinear}\n"
        f"  - {{name: ResizeWithPadOrCropd, spatial_size: [{size}, {size}, {size}]}}\n"
        "  - {name: NormalizeIntensityd, nonzero: true}\n"
        "method: {name: integrative, target_layers: stages}\n",
        encoding="utf-8")
    return cfg


def open_layers(path: Path) -> tuple[ViewerModel, list]:
    reader = get_reader(str(path))
    assert reader is not None, f"no icam-med reader for {path}"
    viewer = ViewerModel()
    layers = []
    for data, kwargs, kind in reader(str(path)):
        layers.append(getattr(viewer, f"add_{kind}")(data, **kwargs))
    return viewer, layers


def test_manifest_is_valid_and_registered():
    out = subprocess.run([sys.executable, "-m", "npe2", "validate", "icam-med"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    import npe2

    pm = npe2.PluginManager.instance()
    pm.discover()
    mf = pm.get_manifest("icam-med")
    c = mf.contributions
    assert c.readers and c.writers and c.widgets
    assert {s.key for s in c.sample_data} >= {"lesion_brain", "lesion_brain_audit"}


def test_affine_conversion_round_trips_and_uses_lps():
    ras = np.array([[0.0, 0.3, -1.9, 10.0], [1.2, 0.0, 0.4, -20.0], [0.1, 2.5, 0.0, 5.0],
                    [0, 0, 0, 1]])
    nap = napari_affine(ras)
    np.testing.assert_allclose(ras_affine(nap), ras)
    ijk = np.array([3.0, 4.0, 5.0, 1.0])
    r, a, s = (ras @ ijk)[:3]
    np.testing.assert_allclose(nap @ np.r_[ijk[2::-1], 1.0], [s, -a, -r, 1.0])


def test_reader_opens_dicom_series_at_patient_position():
    viewer, (layer,) = open_layers(CT5N)
    headers = sorted((pydicom.dcmread(f, stop_before_pixels=True) for f in CT5N.iterdir()),
                     key=lambda d: float(d.ImagePositionPatient[2]))
    n = len(headers)
    assert layer.data.shape == (n, int(headers[0].Rows), int(headers[0].Columns))
    # every slice's first voxel sits at one of the files' ImagePositionPatient (LPS), in order
    corners = np.array([layer.data_to_world((k, 0, 0)) for k in range(n)])
    ipps = np.array([[float(v) for v in d.ImagePositionPatient][::-1] for d in headers])
    order = np.argsort(corners[:, 0])
    np.testing.assert_allclose(corners[order], ipps, atol=1e-3)
    # one step along the row (napari axis 2) moves by the column spacing along the row cosine
    dy, dx = (float(v) for v in headers[0].PixelSpacing)
    row_cos = np.array([float(v) for v in headers[0].ImageOrientationPatient[:3]])
    step = np.asarray(layer.data_to_world((0, 0, 1))) - np.asarray(layer.data_to_world((0, 0, 0)))
    np.testing.assert_allclose(step, (row_cos * dx)[::-1], atol=1e-4)
    col_step = np.asarray(layer.data_to_world((0, 1, 0))) - np.asarray(layer.data_to_world((0, 0, 0)))
    assert np.linalg.norm(col_step) == pytest.approx(dy, abs=1e-4)
    meta = layer.metadata[METADATA_KEY]
    assert meta["kind"] == "scan" and meta["scan_info"].format == "dicom"
    assert np.ptp(np.asarray(viewer.dims.range)[:, :2], axis=1).max() > 0


def test_reader_opens_written_dicom_series_with_known_geometry(tmp_path):
    from icam_med.evaluation.dicom_series import write_dicom_series

    # (slices, rows, columns), as write_dicom_series takes it: napari's own order
    vol = np.random.default_rng(0).integers(0, 1000, (6, 10, 12)).astype(np.int16)
    # oblique-free but off-origin, anisotropic, and written from a RAS affine
    ras = np.array([[-0.8, 0, 0, 40.0], [0, -0.9, 0, 25.0], [0, 0, 3.0, -12.0], [0, 0, 0, 1]])
    write_dicom_series(vol, tmp_path / "series", affine=ras)
    _, (layer,) = open_layers(tmp_path / "series")
    for ijk in [(0, 0, 0), (11, 9, 5), (3, 7, 2)]:
        r, a, s = (ras @ np.r_[ijk, 1.0])[:3]
        np.testing.assert_allclose(layer.data_to_world(ijk[::-1]), [s, -a, -r], atol=1e-3)
    assert layer.data.shape == vol.shape
    np.testing.assert_allclose(layer.data, vol, atol=1)


def test_reader_opens_nifti_with_its_affine():
    _, (layer,) = open_layers(ANATOMICAL)
    img = nib.load(str(ANATOMICAL))
    assert layer.data.shape == img.shape[::-1]
    for ijk in [(0, 0, 0), (32, 40, 24), (10, 5, 7)]:
        r, a, s = (img.affine @ np.r_[ijk, 1.0])[:3]
        np.testing.assert_allclose(layer.data_to_world(ijk[::-1]), [s, -a, -r], atol=1e-4)
    np.testing.assert_array_equal(layer.data[7, 5, 10], np.asarray(img.dataobj)[10, 5, 7])


def test_reader_declines_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    assert get_reader(str(tmp_path / "notes.txt")) is None
    assert get_reader(str(tmp_path)) is None  # a folder with no DICOM and no audit
    assert get_reader([str(ANATOMICAL), str(ANATOMICAL)]) is None


@pytest.fixture(scope="module")
def audit_folder(tmp_path_factory):
    from icam_med.explain import explain_scan

    root = tmp_path_factory.mktemp("audit")
    scan = root / "anatomical.nii"
    shutil.copy(ANATOMICAL, scan)
    out = audit_name_for(scan)
    explanation, _ = explain_scan(scan, tiny_config(root), out, layer_maps=True)
    return scan, out, explanation


def test_audit_folder_opens_with_maps_aligned_to_scan(audit_folder):
    scan, out, explanation = audit_folder
    assert out == scan.with_name("anatomical_icam")
    _viewer, layers = open_layers(out)
    kinds = [lay.metadata[METADATA_KEY]["kind"] for lay in layers]
    assert kinds[0] == "scan" and kinds.count("fused") == 1
    assert kinds.count("layer") == len(explanation.layer_maps) > 0
    scan_layer, fused = layers[0], layers[kinds.index("fused")]
    assert not scan_layer.metadata[METADATA_KEY]["record_mismatch"]
    for lay in layers[1:]:
        assert lay.data.shape == scan_layer.data.shape
        np.testing.assert_allclose(lay.affine.affine_matrix, scan_layer.affine.affine_matrix,
                                   atol=1e-5)
    assert [lay.visible for lay in layers[1:]] == [k == "fused" for k in kinds[1:]]
    record = fused.metadata[METADATA_KEY]["record"]
    assert record["method"]["name"] == "integrative"
    assert record["input"]["voxel_sha256"]
    # the map's peak lies where the summary (written by the library) says, in world mm
    peak = np.unravel_index(int(np.argmax(fused.data)), fused.data.shape)
    r, a, s = explanation.map_statistics().peak_world_ras_mm
    np.testing.assert_allclose(fused.data_to_world(peak), [s, -a, -r], atol=1e-3)


def test_audit_folder_reports_a_scan_that_is_not_the_recorded_one(audit_folder, tmp_path):
    scan, out, _ = audit_folder
    other = tmp_path / "anatomical.nii"
    img = nib.load(str(scan))
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] += 1
    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(other))
    shutil.copytree(out, tmp_path / "anatomical_icam")
    _, layers = open_layers(tmp_path / "anatomical_icam")
    assert layers[0].metadata[METADATA_KEY]["record_mismatch"] is True


def test_writer_round_trips_map_and_record(audit_folder, tmp_path):
    from napari_plugin._writer import write_map

    _, out, _ = audit_folder
    _, layers = open_layers(out)
    fused = next(lay for lay in layers if lay.metadata[METADATA_KEY]["kind"] == "fused")
    target = tmp_path / "map.nii.gz"
    paths = write_map(str(target), fused.data, fused._get_state())
    assert paths == [str(target), str(tmp_path / "map.record.json")]
    back = nib.load(str(target))
    np.testing.assert_allclose(napari_affine(back.affine), fused.affine.affine_matrix, atol=1e-5)
    np.testing.assert_allclose(np.asarray(back.dataobj).transpose(2, 1, 0), fused.data, atol=1e-6)
    side = json.loads((tmp_path / "map.record.json").read_text())
    assert side["record"]["method"]["name"] == "integrative"
    with pytest.raises(FileExistsError):
        write_map(str(target), fused.data, fused._get_state())
    # the same through napari's save machinery and the manifest's writer contribution
    import npe2
    from napari.plugins.io import save_layers

    pm = npe2.PluginManager.instance()
    try:
        pm.get_manifest("icam-med")
    except KeyError:  # napari's pytest plugin may hand out a manager without discovery
        pm.register(npe2.PluginManifest.from_distribution("icam-med"))
    saved = save_layers(str(tmp_path / "via_napari.nii.gz"), [fused], plugin="icam-med")
    assert [Path(p).name for p in saved] == ["via_napari.nii.gz", "via_napari.record.json"]


def test_writer_places_a_plain_layer_by_its_scale_and_translate(tmp_path):
    from napari_plugin._writer import write_map

    viewer = ViewerModel()
    lay = viewer.add_image(np.random.rand(4, 5, 6).astype(np.float32),
                           scale=(3.0, 2.0, 1.5), translate=(10.0, -5.0, 2.0))
    write_map(str(tmp_path / "plain.nii"), lay.data, lay._get_state())
    back = nib.load(str(tmp_path / "plain.nii"))
    np.testing.assert_allclose(napari_affine(back.affine), lay._data_to_world.affine_matrix,
                               atol=1e-5)


def test_contour_layer_marks_the_iso_region():
    m = np.zeros((4, 8, 8), np.float32)
    m[1:3, 2:5, 2:5] = 0.9
    data, _kwargs, kind = contour_layer(m, 0.5, name="c", affine=np.eye(4))
    assert kind == "labels" and data.sum() == 18 and data[1, 2, 2] == 1
    with pytest.raises(ValueError, match="level"):
        contour_layer(m, 1.5, name="c", affine=np.eye(4))


def test_icam_med_imports_no_gui_module():
    code = (
        "import sys\n"
        "import icam_med, icam_med.cam, icam_med.io, icam_med.explain, icam_med.audit\n"
        "import icam_med.io.loading, icam_med.io.writers, icam_med.config, icam_med.models\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'PyQt5','PyQt6','PySide2','PySide6','qtpy','napari','magicgui','superqt','vispy'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"icam_med pulled GUI modules: {out.stdout}"


def test_sample_data_commands_open_scans_in_place():
    from napari_plugin._sample_data import sample_brain, sample_ct

    (ct,) = sample_ct()
    data, kwargs, kind = ct
    assert kind == "image" and data.shape == (5, 16, 16)
    info = kwargs["metadata"][METADATA_KEY]["scan_info"]
    assert info.format == "dicom" and info.modality == "CT"
    (brain,) = sample_brain()
    bdata, bkwargs, _ = brain
    img = nib.load(str(bkwargs["metadata"][METADATA_KEY]["source_path"]))
    assert bdata.shape == img.shape[::-1]
    np.testing.assert_allclose(bkwargs["affine"], napari_affine(img.affine), atol=1e-5)


def test_explanation_layers_build_overlay_layer_maps_and_contrast(audit_folder):
    from icam_med.explain import explain_volume, prepare
    from icam_med.io import load_volume
    from napari_plugin._layers import explanation_layers

    scan, _, _ = audit_folder
    prepared = prepare(tiny_config(scan.parent))
    image, info = load_volume(scan)
    first = explain_volume(image, info, prepared, targets=0, layer_maps=True)
    second = explain_volume(image, info, prepared, targets=1)
    layers = explanation_layers(first, scan_name="s", contrast=second, threshold=0.25)
    kinds = [kw["metadata"][METADATA_KEY]["kind"] for _, kw, _ in layers]
    assert kinds == ["fused"] + ["layer"] * len(first.layer_maps) + ["contrast", "difference"]
    expected_affine = napari_affine(info.affine)
    for data, kwargs, kind in layers:
        assert kind == "image" and data.shape == tuple(info.shape[::-1])
        np.testing.assert_allclose(kwargs["affine"], expected_affine)
        assert kwargs["visible"] == (kwargs["metadata"][METADATA_KEY]["kind"] == "fused")
    (fused, fkw, _), (contrast, ckw, _), (diff, dkw, _) = layers[0], layers[-2], layers[-1]
    np.testing.assert_array_equal(fused, first.fused[0].numpy().transpose(2, 1, 0))
    np.testing.assert_allclose(diff, fused - contrast)
    # maps keep the fixed 0-1 scale, the threshold is a cut in their colormap; the difference
    # map's limits are symmetric about 0, where it is transparent
    assert fkw["contrast_limits"] == (0.0, 1.0)
    assert fkw["metadata"][METADATA_KEY]["threshold"] == 0.25
    assert fkw["colormap"].map(np.array([0.2]))[0, 3] == 0.0
    assert fkw["colormap"].map(np.array([0.3]))[0, 3] == 1.0
    m = float(np.abs(diff).max())
    assert dkw["contrast_limits"] == pytest.approx((-m, m)) and m > 0
    dmap = dkw["colormap"].map(np.array([0.0, 0.5, 1.0]))  # at -m, 0, +m
    assert dmap[1, 3] == 0.0 and dmap[0, 3] == dmap[2, 3] == 1.0
    assert dmap[0, 2] > dmap[0, 0] and dmap[2, 0] > dmap[2, 2]  # blue below, red above
    assert fkw["name"] == "s integrative [absent]" and ckw["name"] == "s integrative [present]"
    assert fkw["metadata"][METADATA_KEY]["summary"]["result"]["target_class"] == 0
    assert ckw["metadata"][METADATA_KEY]["summary"]["result"]["target_class"] == 1
    weights = first.result.layer_weights
    for _, kw, _ in layers[1:-2]:
        m = kw["metadata"][METADATA_KEY]
        assert m["layer_weight"] == weights[m["layer"]] and "w=" in kw["name"]


def test_reader_opens_small_4d_nifti_as_one_layer_per_volume():
    path = ANATOMICAL.parent / "example4d.nii.gz"
    _, layers = open_layers(path)
    img = nib.load(str(path))
    assert [lay.name for lay in layers] == ["example4d [volume 0]", "example4d [volume 1]"]
    for i, lay in enumerate(layers):
        assert lay.metadata[METADATA_KEY]["scan_info"].volume_index == i
        np.testing.assert_allclose(lay.data, np.asarray(img.dataobj)[..., i].transpose(2, 1, 0))
        np.testing.assert_allclose(lay.affine.affine_matrix, napari_affine(img.affine), atol=1e-4)


def _demo_weights_present() -> bool:
    from icam_med.config import load_config

    cfg = REPO / "configs" / "demo.yaml"
    if not cfg.is_file():
        return False
    w = load_config(cfg).model.weights
    return w is not None and w.is_file()


@pytest.mark.skipif(not _demo_weights_present(),
                    reason="the demo model's weights (sample_data/) are not present")
def test_sample_audit_opens_scan_and_demo_maps_aligned():
    from icam_med.audit.hashing import sha256_file
    from napari_plugin._sample_data import DEMO_CONFIG, sample_audit

    layers = sample_audit()  # computed once into sample_data/scans/..._icam (git-ignored)
    kinds = [kw["metadata"][METADATA_KEY]["kind"] for _, kw, _ in layers]
    assert kinds[0] == "scan" and kinds.count("fused") == 1
    scan_meta = layers[0][1]["metadata"][METADATA_KEY]
    assert scan_meta["record_mismatch"] is False
    fused = layers[kinds.index("fused")][1]
    record = fused["metadata"][METADATA_KEY]["record"]
    from icam_med.config import load_config

    assert record["model"]["weights_sha256"] == sha256_file(load_config(DEMO_CONFIG).model.weights)
    assert record["method"]["predicted"]["label"] == "present"
    for data, kw, _ in layers[1:]:
        assert data.shape == layers[0][0].shape
        np.testing.assert_allclose(kw["affine"], layers[0][1]["affine"], atol=1e-5)


def test_map_threshold_cuts_without_restretching_the_colours():
    from napari_plugin._layers import DEFAULT_THRESHOLD, map_colormap

    assert 0.2 <= DEFAULT_THRESHOLD <= 0.4
    values = np.linspace(0.0, 1.0, 101)
    low, high = map_colormap(0.3).map(values), map_colormap(0.6).map(values)
    shown_low, shown_high = values >= 0.3, values >= 0.6
    assert (low[~shown_low, 3] == 0).all() and (low[shown_low, 3] == 1).all()
    assert (high[~shown_high, 3] == 0).all() and (high[shown_high, 3] == 1).all()
    # a value shown at both thresholds has the same colour at both
    np.testing.assert_allclose(low[shown_high, :3], high[shown_high, :3], atol=2e-3)
    assert map_colormap(0.0).map(np.array([0.0]))[0, 3] == 0.0  # zero is never drawn
    with pytest.raises(ValueError, match="threshold"):
        map_colormap(1.0)


def test_lesion_mask_opens_as_labels_and_ct_with_its_dicom_window():
    mask = REPO / "sample_data" / "scans" / "mni152_t1_2mm_lesion_mask.nii.gz"
    _, (layer,) = open_layers(mask)
    assert layer.__class__.__name__ == "Labels"
    assert layer.metadata[METADATA_KEY]["kind"] == "mask"
    truth = np.asarray(nib.load(str(mask)).dataobj).transpose(2, 1, 0)
    np.testing.assert_array_equal(layer.data, truth)
    assert layer.data.max() >= 1
    # a scan stays an image (the T1 of the same space)
    _, (scan,) = open_layers(REPO / "sample_data" / "scans" / "mni152_t1_2mm_lesion.nii.gz")
    assert scan.__class__.__name__ == "Image"
    # CT opens with the series' own window: Window Center 40, Width 400 in CT5N
    header = pydicom.dcmread(sorted(CT5N.iterdir())[0], stop_before_pixels=True)
    assert (float(header.WindowCenter), float(header.WindowWidth)) == (40.0, 400.0)
    _, (ct,) = open_layers(CT5N)
    assert tuple(ct.contrast_limits) == (-160.0, 240.0)
    # NIfTI has no window: percentiles
    _, (t1,) = open_layers(ANATOMICAL)
    assert t1.metadata[METADATA_KEY]["window"] is None


def test_saved_map_opens_as_a_map_overlay(audit_folder, tmp_path):
    from napari_plugin._layers import difference_colormap
    from napari_plugin._writer import write_map

    _, out, explanation = audit_folder
    _, (cam,) = open_layers(out / "cam.nii.gz")
    meta = cam.metadata[METADATA_KEY]
    assert meta["kind"] == "fused" and meta["record"]["method"]["name"] == "integrative"
    assert cam.name.startswith("anatomical_icam integrative")  # names the scan's audit
    assert cam.colormap.name.startswith("icam inferno") and tuple(cam.contrast_limits) == (0, 1)
    np.testing.assert_allclose(cam.data, explanation.fused[0].numpy().transpose(2, 1, 0),
                               atol=1e-6)
    # a difference map saved by the writer reopens as a difference map
    viewer, layers = open_layers(out)
    fused = next(lay for lay in layers if lay.metadata[METADATA_KEY]["kind"] == "fused")
    diff = viewer.add_image(fused.data - 0.5, affine=fused.affine, name="d",
                            colormap=difference_colormap(),
                            metadata={METADATA_KEY: {"kind": "difference", "record": None,
                                                     "summary": {"x": 1}}})
    path = tmp_path / "d.nii.gz"
    write_map(str(path), diff.data, diff._get_state())
    _, (back,) = open_layers(path)
    assert back.metadata[METADATA_KEY]["kind"] == "difference"
    assert back.colormap.name == difference_colormap().name
    lo, hi = back.contrast_limits
    assert lo == -hi and hi == pytest.approx(float(np.abs(diff.data).max()), rel=1e-5)
    # a NIfTI without a record is a scan
    plain = tmp_path / "plain.nii.gz"
    shutil.copy(out / "cam.nii.gz", plain)
    _, (scan,) = open_layers(plain)
    assert scan.metadata[METADATA_KEY]["kind"] == "scan"


def test_difference_layer_needs_one_grid_and_is_transparent_at_zero():
    from types import SimpleNamespace

    from napari_plugin._layers import difference_layer, napari_affine

    aff = napari_affine(np.diag([2.0, 2.0, 3.0, 1.0]))
    a = SimpleNamespace(name="run A", data=np.zeros((4, 5, 6), np.float32), affine=aff)
    b = SimpleNamespace(name="run B", data=np.zeros((4, 5, 6), np.float32), affine=aff)
    a.data[1, 2, 3], b.data[2, 2, 2] = 0.8, 0.5
    data, kwargs, kind = difference_layer(a, b, name="A minus B")
    assert kind == "image" and kwargs["metadata"][METADATA_KEY]["kind"] == "difference"
    np.testing.assert_allclose(data, a.data - b.data)
    assert np.allclose(kwargs["contrast_limits"], (-0.8, 0.8))  # symmetric about zero
    np.testing.assert_allclose(kwargs["affine"], aff)
    assert kwargs["colormap"].map(np.array([0.5]))[0, 3] == 0.0
    moved = SimpleNamespace(name="run C", data=b.data, affine=napari_affine(
        np.diag([2.0, 2.0, 3.5, 1.0])))
    with pytest.raises(ValueError, match=r"'run A'.*'run C'.*not on one grid"):
        difference_layer(a, moved, name="x")
    with pytest.raises(ValueError, match="not on one grid"):
        difference_layer(a, SimpleNamespace(name="small", data=b.data[:2], affine=aff),
                         name="x")

"""A segmentation target's explained region in a real napari viewer (Qt under Xvfb, started
by pytest-xvfb): an audit folder of a random-weight UNet explained over a lesion mask opens
with the region as a Labels layer, in the same physical space as the scan and the map."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _region_util import write_scan_and_mask, write_unet_config

pytest.importorskip("napari")

from test_napari_layers import tiny_config

from icam_med.cli import main as cli_main
from napari_plugin._layers import METADATA_KEY

pytestmark = pytest.mark.gui


@pytest.fixture(scope="module")
def audits(tmp_path_factory):
    """``seg_icam``: the UNet explained over the mask (``icam-med explain``), beside its scan
    ``seg.nii.gz``; ``plain_icam``: a classifier's audit of the same voxels (no region)."""
    root = tmp_path_factory.mktemp("napari_region")
    scan, mask = write_scan_and_mask(root)
    seg = root / "seg_icam"
    assert cli_main(["explain", str(scan), "--config", str(write_unet_config(root, mask=mask)),
                     "--out", str(seg)]) == 0
    plain_scan = root / "plain.nii.gz"
    plain_scan.write_bytes(scan.read_bytes())
    plain = root / "plain_icam"
    assert cli_main(["explain", str(plain_scan), "--config", str(tiny_config(root)),
                     "--out", str(plain)]) == 0
    return {"scan": scan, "mask": mask, "seg": seg, "plain": plain}


def _world_lps_zyx(affine_ras: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """World positions as the plugin's convention defines them (LPS mm in napari's axis
    order z, y, x), computed here from the NIfTI affine alone."""
    ras = (affine_ras @ np.c_[ijk, np.ones(len(ijk))].T).T[:, :3]
    return np.c_[ras[:, 2], -ras[:, 1], -ras[:, 0]]


def _sorted_rows(a: np.ndarray) -> np.ndarray:
    a = np.round(a, 4)
    return a[np.lexsort(a.T[::-1])]


def test_region_opens_as_labels_where_the_region_lies(make_napari_viewer, audits):
    viewer = make_napari_viewer()
    layers = viewer.open(str(audits["seg"]), plugin="icam-med")
    kinds = [lay.metadata[METADATA_KEY]["kind"] for lay in layers]
    assert kinds.count("scan") == kinds.count("fused") == kinds.count("region") == 1
    region = layers[kinds.index("region")]
    scan, fused = layers[kinds.index("scan")], layers[kinds.index("fused")]
    assert region.__class__.__name__ == "Labels"
    assert "lesion" in region.name and region.visible
    meta = region.metadata[METADATA_KEY]
    assert meta["region"]["source"] == "mask" and meta["region"]["label"] == "lesion"
    assert meta["target_label"] == "lesion" and not meta["record_mismatch"]
    # the region file as written by the audit (role target_region), read with nibabel alone
    img = nib.load(str(audits["seg"] / "cam_region.nii.gz"))
    truth = np.asarray(img.dataobj) != 0
    assert meta["voxels"] == meta["region"]["voxels"] == int(truth.sum()) > 0
    # its voxels are the mask's (the region is the mask itself, on the scan's grid)
    assert np.array_equal(truth, np.asarray(nib.load(str(audits["mask"])).dataobj) != 0)
    # every non-zero voxel of the layer lands, through the layer's affine, where the
    # NIfTI's voxel lies in the world, and nowhere else
    inside = np.argwhere(np.asarray(region.data) != 0)
    shown = np.array([region.data_to_world(p) for p in inside])
    expected = _world_lps_zyx(np.asarray(img.affine), np.argwhere(truth))
    assert shown.shape == expected.shape
    np.testing.assert_allclose(_sorted_rows(shown), _sorted_rows(expected), atol=1e-3)
    # on the scan's and the map's grid: one voxel is one world point for all three layers
    for other in (scan, fused):
        assert other.data.shape == region.data.shape
        np.testing.assert_allclose(other.affine.affine_matrix, region.affine.affine_matrix,
                                   atol=1e-5)
    # the scan layer's value at a region voxel is the scan's own value there (lesion bright)
    p = tuple(inside[0])
    i, j, k = p[::-1]
    stored = np.asarray(nib.load(str(audits["scan"])).dataobj)
    assert float(scan.data[p]) == pytest.approx(float(stored[i, j, k]), rel=1e-5)


def test_a_map_without_a_region_gets_no_labels_layer(make_napari_viewer, audits):
    viewer = make_napari_viewer()
    layers = viewer.open(str(audits["plain"]), plugin="icam-med")
    assert layers and all(lay.__class__.__name__ != "Labels" for lay in layers)
    assert "region" not in [lay.metadata[METADATA_KEY]["kind"] for lay in layers]


def test_opening_the_map_file_itself_brings_its_region(make_napari_viewer, audits):
    viewer = make_napari_viewer()
    layers = viewer.open(str(audits["seg"] / "cam.nii.gz"), plugin="icam-med")
    kinds = [lay.metadata[METADATA_KEY]["kind"] for lay in layers]
    assert kinds == ["fused", "region"]
    fused, region = layers
    np.testing.assert_allclose(fused.affine.affine_matrix, region.affine.affine_matrix)


def test_a_widget_run_shows_the_region_and_its_saved_audit_reopens_with_it(
        make_napari_viewer, audits, tmp_path):
    """The dock widget explaining the UNet config (target lesion over the mask) adds the
    region as a Labels layer on the scan's grid, once per run; Save audit then writes it,
    and the saved folder reopens with it."""
    from napari_plugin._screenshot import wait_for_worker
    from napari_plugin._widget import ExplainWidget

    scan = tmp_path / "seg.nii.gz"
    scan.write_bytes(audits["scan"].read_bytes())
    viewer = make_napari_viewer()
    viewer.open(str(scan), plugin="icam-med")
    widget = ExplainWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.config.value = "other file..."
    widget.config_file.value = write_unet_config(tmp_path, mask=audits["mask"])
    for _ in range(2):  # a redo replaces the run's layers, the region included
        widget.run()
        wait_for_worker(widget)
        assert widget.result is not None and widget.result.ok
        regions = [lay for lay in viewer.layers
                   if (lay.metadata.get(METADATA_KEY) or {}).get("kind") == "region"]
        assert len(regions) == 1
    (region,) = regions
    assert region.__class__.__name__ == "Labels" and "lesion" in region.name
    scan_layer = viewer.layers["seg"]
    np.testing.assert_allclose(region.affine.affine_matrix, scan_layer.affine.affine_matrix,
                               atol=1e-5)
    truth = np.asarray(nib.load(str(audits["mask"])).dataobj) != 0
    np.testing.assert_array_equal(np.asarray(region.data) != 0, truth.transpose(2, 1, 0))
    assert region.metadata[METADATA_KEY]["region"]["voxels"] == int(truth.sum())
    written = widget.save_audit()
    folder = Path(written[0].path).parent
    assert (folder / "cam_region.nii.gz").is_file()
    assert region.metadata[METADATA_KEY]["record_path"]  # the sealed record it stands for
    reopened = make_napari_viewer().open(str(folder), plugin="icam-med")
    assert [lay.metadata[METADATA_KEY]["kind"] for lay in reopened].count("region") == 1

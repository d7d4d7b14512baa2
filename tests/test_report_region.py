"""A segmentation target's explained region in the audit report: a real batch audit
(`icam-med audit`, which builds the report) of a random-weight MONAI UNet explaining the
label 'lesion' over a mask file. The region the audit wrote (cam_region.nii.gz) is outlined
in the scan + map figure where it lies, and nowhere else; the text names it; a classifier's
report has neither."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from html import unescape

import nibabel as nib
import numpy as np
import pytest
from _audit_util import write_tiny_lesionnet_config
from _region_util import write_scan_and_mask, write_unet_config
from PIL import Image

from icam_med.audit import AuditRecord
from icam_med.cli import main as cli_main
from icam_med.io import load_volume
from icam_med.report import build_report
from icam_med.report.collect import collect, montage_title, region_label
from icam_med.report.figures import montage_figure, to_ras

DPI = 80  # the report's montage resolution


@pytest.fixture(scope="module")
def audits(tmp_path_factory):
    root = tmp_path_factory.mktemp("report_region")
    scan, mask = write_scan_and_mask(root)
    seg = root / "seg_audit"
    assert cli_main(["audit", str(scan), "--config", str(write_unet_config(root, mask=mask)),
                     "--out", str(seg), "--no-progress", "--pdf"]) == 0
    plain = root / "plain_audit"
    assert cli_main(["audit", str(scan), "--config", str(write_tiny_lesionnet_config(root)),
                     "--out", str(plain), "--no-progress"]) == 0
    (record,) = sorted(seg.glob("scans/*/cam.icam.json"))
    return {"root": root, "scan": scan, "mask": mask, "seg": seg, "plain": plain,
            "record": AuditRecord.load(record), "folder": record.parent}


def _montages(html: str) -> list[bytes]:
    import base64

    return [base64.b64decode(d) for d in re.findall(
        r'<img alt="map over scan"[^>]*src="data:image/png;base64,([^"]+)"', html)]


def _rgb(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=int)


def _green(rgb: np.ndarray) -> np.ndarray:
    """Pixels of the region outline's colour (#00ff00, anti-aliased over grey or the map):
    green well above red and blue. Neither grey, inferno, cyan nor yellow is."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return (g > 140) & (g - r > 80) & (g - b > 80)


def _text(html: str) -> str:
    return unescape(re.sub(r"<[^>]+>", " ", html))


def _faces(ms: np.ndarray, sp_h: float, sp_v: float) -> np.ndarray:
    """Midpoints (mm) of the voxel faces between inside and outside on a slice ``[v, h]``:
    where a 0.5 outline of the region must run."""
    pts = []
    vv, hh = np.nonzero(ms[:, 1:] != ms[:, :-1])
    pts += [((h + 1) * sp_h, (v + 0.5) * sp_v) for v, h in zip(vv, hh, strict=True)]
    vv, hh = np.nonzero(ms[1:, :] != ms[:-1, :])
    pts += [((h + 0.5) * sp_h, (v + 1) * sp_v) for v, h in zip(vv, hh, strict=True)]
    # the slice's own edge counts too where the region touches it (the outline stops there)
    return np.asarray(pts, dtype=float).reshape(-1, 2)


def _check_outline(png: bytes, item, folder, scan, mask) -> None:
    """The report's montage ``png`` of ``item`` is the library's figure of the audited map,
    scan and region (``folder``'s cam.nii.gz / cam_region.nii.gz, the region being ``mask``);
    on each of its panels the green outline runs along the region's border on that slice
    and nowhere else; the only other green is the legend's line."""
    assert item.montage == png and item.region_shown == "outlined" and item.scan_shown == "matched"
    cam = nib.load(str(folder / "cam.nii.gz"))
    region_img = nib.load(str(folder / "cam_region.nii.gz"))
    image, info = load_volume(scan)
    region = (np.asarray(region_img.dataobj) != 0).astype(np.float32)
    # the region on the scan's grid is the mask given to the audit
    assert np.array_equal(region != 0, np.asarray(nib.load(str(mask)).dataobj) != 0)
    map_ras = to_ras(np.asarray(cam.dataobj, dtype=np.float32), cam.affine)
    region_ras = to_ras(region, region_img.affine)
    fig = montage_figure(map_ras, to_ras(np.asarray(image[0].numpy(), np.float32), info.affine),
                         title=montage_title(item), region_ras=region_ras,
                         region_label=region_label(item.region))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    assert buf.getvalue() == png, "the report's montage is not this figure"
    fig.set_dpi(DPI)  # pixel positions below are the PNG's
    fig.canvas.draw()
    # its legend names the region
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [
        "explained region: 'lesion' over the given mask"]

    rgb = _rgb(png)
    green = _green(rgb)
    height = rgb.shape[0]
    reg = region_ras.data > 0
    idx = np.argwhere(reg)
    points = [tuple(int(i) for i in np.unravel_index(int(np.argmax(map_ras.data)),
                                                     map_ras.data.shape)),
              tuple(s // 2 for s in reg.shape),
              tuple(int(i) for i in idx[int(np.argmin(((idx - idx.mean(0)) ** 2).sum(1)))])]
    views = ((2, (0, 1)), (1, (0, 2)), (0, (1, 2)))  # axial, coronal, sagittal
    panels = fig.axes[:9]
    in_panels = np.zeros_like(green)
    crossing = 0
    for n, ax in enumerate(panels):
        point, (axis, (h, v)) = points[n // 3], views[n % 3]
        sp_h, sp_v = region_ras.spacing[h], region_ras.spacing[v]
        ms = np.take(reg, point[axis], axis=axis).T  # [v, h], as the figure draws it
        box = ax.get_window_extent()
        rows = slice(int(np.ceil(height - box.y1)) + 1, int(np.floor(height - box.y0)) - 1)
        cols = slice(int(np.ceil(box.x0)) + 1, int(np.floor(box.x1)) - 1)
        in_panels[rows, cols] = True
        rr, cc = np.nonzero(green[rows, cols])
        pix = np.c_[cc + cols.start + 0.5, height - (rr + rows.start + 0.5)]
        mm = ax.transData.inverted().transform(pix) if len(pix) else np.zeros((0, 2))
        mm_per_px = abs(ax.transData.inverted().transform([(0, 0), (1, 0)])[1, 0]
                        - ax.transData.inverted().transform([(0, 0), (1, 0)])[0, 0])
        tol = 0.75 * max(sp_h, sp_v) + 2.5 * mm_per_px
        faces = _faces(ms, sp_h, sp_v)
        if not ms.any() or ms.all():
            assert len(mm) == 0, f"panel {n}: outline drawn on a slice the region misses"
            continue
        crossing += 1
        assert len(mm) >= 10, f"panel {n}: the slice cuts the region but no outline is drawn"
        d = np.sqrt(((mm[:, None, :] - faces[None, :, :]) ** 2).sum(-1))
        # every outline pixel lies on the region's border...
        assert d.min(1).max() <= tol, f"panel {n}: outline pixels far from the region"
        # ...and the whole border is outlined
        assert d.min(0).max() <= tol, f"panel {n}: part of the region's border not outlined"
    assert crossing >= 3  # at least the row through the region
    # green elsewhere is only the legend's line, under the panels
    outside = np.argwhere(green & ~in_panels)
    lowest_panel = min(height - ax.get_window_extent().y0 for ax in panels)
    assert len(outside) > 0 and (outside[:, 0] > lowest_panel).all()


def test_region_outline_is_drawn_where_the_region_is(audits):
    seg = audits["seg"]
    (png,) = _montages((seg / "report.html").read_text("utf-8"))
    (item,) = collect(seg, scans=[audits["scan"]]).scans
    _check_outline(png, item, audits["folder"], audits["scan"], audits["mask"])


def test_each_scan_of_a_batch_is_outlined_with_its_own_region(tmp_path):
    """The scan list's region column gives each scan its own mask (issue 13): each scan's
    montage outlines its own region, and its text states its own voxel count."""
    rows = ["path,region,id"]
    masks = {}
    for i, box in enumerate((np.s_[5:12, 7:14, 6:12], np.s_[12:20, 4:9, 3:8])):
        sub = tmp_path / f"case{i}"
        sub.mkdir()
        scan, _ = write_scan_and_mask(sub, name=f"case{i}")
        mask = np.zeros(nib.load(str(scan)).shape, np.uint8)
        mask[box] = 1
        masks[f"case{i}"] = (scan, sub / f"case{i}_region.nii.gz", int(mask.sum()))
        nib.save(nib.Nifti1Image(mask, nib.load(str(scan)).affine), str(masks[f"case{i}"][1]))
        rows.append(f"{scan},{masks[f'case{i}'][1]},case{i}")
    listing = tmp_path / "scans.csv"
    listing.write_text("\n".join(rows) + "\n")
    out = tmp_path / "audit"
    assert cli_main(["audit", str(listing), "--config", str(write_unet_config(tmp_path)),
                     "--out", str(out), "--no-progress"]) == 0
    html = (out / "report.html").read_text("utf-8")
    text = " ".join(_text(html).split())
    items = {s.scan_id: s for s in collect(out, scans=[listing]).scans}
    assert set(items) == set(masks)
    for sid, (scan, mask, voxels) in masks.items():
        item = items[sid]
        assert item.region["voxels"] == voxels and item.region["source"] == "mask"
        assert f"mask file, {voxels} voxels on the scan's grid" in text
        assert item.montage in _montages(html)
        _check_outline(item.montage, item, out / "scans" / sid, scan, mask)


def test_report_text_names_the_region(audits):
    seg, rec = audits["seg"], audits["record"]
    region = rec.method.region
    assert region["source"] == "mask" and region["label"] == "lesion"
    expected = (f"'lesion' summed over the region: mask file, {region['voxels']} voxels on the "
                "scan's grid")
    text = " ".join(_text((seg / "report.html").read_text("utf-8")).split())
    assert "explained region (segmentation target)" in text
    assert expected in text and region["sha256"][:12] in text
    assert "outline drawn in green on the slices that cross it" in text
    assert int(np.asarray(nib.load(str(audits["mask"])).dataobj).sum()) == region["voxels"]
    # the PDF says the same
    if shutil.which("pdftotext") is None:
        pytest.skip("pdftotext (poppler-utils) is not installed")
    pdf = subprocess.run(["pdftotext", "-layout", str(seg / "report.pdf"), "-"],
                         capture_output=True, text=True, check=True).stdout
    pdf = " ".join(pdf.split())
    assert "explained region" in pdf and "mask file," in pdf
    assert f"{region['voxels']} voxels on the" in pdf


def test_a_report_without_a_region_looks_as_before(audits):
    html = (audits["plain"] / "report.html").read_text("utf-8")
    text = _text(html)
    assert "explained region" not in text and "segmentation target" not in text
    (png,) = _montages(html)
    img = Image.open(io.BytesIO(png))
    assert img.size == (round(9.6 * DPI), round(6.6 * DPI))  # two rows of slices
    assert int(_green(_rgb(png)).sum()) == 0


def test_a_missing_region_file_is_said_not_drawn(audits, tmp_path):
    copy = tmp_path / "audit"
    shutil.copytree(audits["seg"], copy)
    (region_file,) = copy.glob("scans/*/cam_region.nii.gz")
    region_file.unlink()
    result = build_report(copy, scans=[audits["scan"]], overwrite=True)
    assert not result.ledger_ok
    html = result.html.read_text("utf-8")
    text = " ".join(_text(html).split())
    assert "not drawn: its file (cam_region.nii.gz) is missing" in text
    (png,) = _montages(html)
    assert int(_green(_rgb(png)).sum()) == 0


def test_pdf_pages_with_the_region_render_and_no_words_collide(audits, tmp_path):
    from render_helpers import pdf_to_pngs
    from test_report import _pdf_words, assert_no_colliding_words

    pdf = audits["seg"] / "report.pdf"
    pages = _pdf_words(pdf)
    assert len(pages) == len(pdf_to_pngs(pdf, tmp_path / "p"))
    assert any("region" in w[4] for page in pages for w in page)
    assert_no_colliding_words(pages)


def test_a_2d_image_region_is_outlined_on_its_one_plane():
    """A radiograph's map is one plane (X, Y, 1): the region is outlined there, its side
    views (one voxel thick) draw no outline and need none, and no third row is added."""
    from icam_med.report.figures import montage_png

    affine = np.diag([0.5, 0.5, 1.0, 1.0])
    cam = np.zeros((30, 20, 1), np.float32)
    cam[10:15, 5:9, 0] = 1.0
    region = np.zeros((30, 20, 1), np.float32)
    region[8:16, 4:10, 0] = 1.0
    png = montage_png(to_ras(cam, affine), None, region_ras=to_ras(region, affine),
                      region_label="explained region: 'nodule' over the given mask")
    assert Image.open(io.BytesIO(png)).size == (round(9.6 * DPI), round(6.6 * DPI))
    assert int(_green(_rgb(png)).sum()) > 20

"""The audit report (`icam_med.report`, `icam-med report`): built from a real audit folder
(real batch runner, real NIfTI and DICOM scans, a tiny LesionNet), parsed, rendered by
headless Chromium, converted from PDF by pdftoppm, checked for PHI and for tampering."""

from __future__ import annotations

import base64
import contextlib
import io
import re
import shutil
import subprocess
import zlib
from html import unescape
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _audit_util import PHI, PHI_NEEDLES, write_tiny_lesionnet_config
from PIL import Image
from render_helpers import pdf_to_pngs, screenshot_html

from icam_med import cli
from icam_med.audit import AuditRecord, sha256_file, verify_folder
from icam_med.batch import run_batch
from icam_med.report import build_report
from icam_med.report.collect import ScanItem, _flag, body_mask, outside_fraction
from icam_med.report.figures import to_ras


def _write_config(folder: Path) -> Path:
    # decisive logits: confident predictions
    return write_tiny_lesionnet_config(folder, name="tiny-report-net", head_scale=60.0)


def _body_scan(shape, rng, lesion):
    """A bright ellipsoid "body" in an empty background, with a brighter "lesion"."""
    grid = np.indices(shape, dtype=float)
    c = (np.array(shape) - 1) / 2
    r = ((grid - c[:, None, None, None]) / (np.array(shape)[:, None, None, None] * 0.42)) ** 2
    vol = np.where(r.sum(0) <= 1, 300 + rng.integers(0, 100, shape), 0).astype(np.int16)
    vol[lesion] += 500
    return vol


@pytest.fixture(scope="module")
def audit(tmp_path_factory):
    """One real audit folder: 3 NIfTI scans (anisotropic), 1 DICOM series with made-up PHI
    and 1 missing scan (a logged failure), built by the batch runner."""
    from icam_med.evaluation.dicom_series import write_dicom_series

    base = tmp_path_factory.mktemp("report")
    cfg = _write_config(base)
    rng = np.random.default_rng(3)
    scans = []
    for i in range(3):
        vol = _body_scan((14, 16, 10), rng, np.s_[3 + i:7 + i, 5:10, 3:6])
        p = base / f"case{i:02d}.nii.gz"
        nib.save(nib.Nifti1Image(vol, np.diag([1.5, 1.5, 3.0, 1.0])), str(p))
        scans.append(p)
    dicom = base / "dicom" / "series1"
    write_dicom_series(_body_scan((12, 14, 10), rng, np.s_[4:8, 4:9, 3:6]), dicom,
                       modality="MR", patient_name=PHI["PatientName"],
                       patient_id=PHI["PatientID"], patient_birth_date=PHI["PatientBirthDate"],
                       InstitutionName=PHI["InstitutionName"],
                       AccessionNumber=PHI["AccessionNumber"],
                       ReferringPhysicianName=PHI["ReferringPhysicianName"])
    listing = base / "scans.csv"
    listing.write_text("path,label\n"
                       f"{scans[0]},present\n{scans[1]},absent\n{scans[2]},present\n"
                       f"{dicom},absent\n{base / 'gone.nii.gz'},present\n")
    out = base / "audit"
    result = run_batch([listing], cfg, out, progress=False)
    assert len(result.done) == 4 and len(result.failed) == 1
    report = build_report(out, scans=[listing], pdf=True, overwrite=True)
    return {"base": base, "out": out, "listing": listing, "config": cfg, "report": report,
            "html": report.html.read_text("utf-8"), "scan_ids": result.done,
            "failed": list(result.failed), "dicom": dicom, "nifti": scans}


def _record(audit, sid) -> AuditRecord:
    return AuditRecord.load(audit["out"] / "scans" / sid / "cam.icam.json")


class _Parser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _parse(text: str) -> list[tuple[str, dict[str, str | None]]]:
    p = _Parser()
    p.feed(text)
    p.close()
    return p.tags


def _not_blank(png: Image.Image) -> np.ndarray:
    a = np.asarray(png.convert("RGB"), dtype=float)
    grey = a.mean(-1)
    assert grey.std() > 10, "the page is (nearly) one flat colour"
    assert (grey < 128).mean() > 0.005, "no text or figure is drawn on the page"
    return a


def test_html_has_every_scan_embedded_images_and_nothing_external(audit):
    tags = _parse(audit["html"])
    ids = {a.get("id") for _, a in tags}
    for scan_id in [*audit["scan_ids"], *audit["failed"]]:
        assert f"scan-{scan_id}" in ids, scan_id
    imgs = [a["src"] for t, a in tags if t == "img"]
    # 2 cohort figures + a montage and a layer-weight chart per explained scan + one
    # misclassification pair per scan whose record holds a second class's map.
    pairs = sum(1 for sid in audit["scan_ids"]
                if _record(audit, sid).output("second_class:cam_nifti") is not None)
    assert len(imgs) == 2 + 2 * len(audit["scan_ids"]) + pairs
    for src in imgs:
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    assert not [t for t, _ in tags if t in ("script", "link", "iframe", "object", "embed")]
    for _, attrs in tags:
        for key in ("src", "href", "action", "data"):
            value = attrs.get(key) or ""
            assert not re.match(r"^\s*([a-z]+:)?//", value, re.I), value
            assert not value.startswith(("http:", "https:", "file:")), value
    assert "url(" not in audit["html"] and "@import" not in audit["html"]
    # Header content a reviewer needs.
    record_model = "tiny-report-net"
    record = AuditRecord.load(next(audit["out"].rglob("*.icam.json")))
    for needle in (record_model, "icam_med.networks:LesionNet", "integrative", "monai",
                   "Methods appendix", "Review first", "confusion matrix", "alpha_fn",
                   *record.method.layers):
        assert needle in audit["html"], needle
    assert "FileNotFoundError" in audit["html"]  # the failure reason of the missing scan


def test_ledger_status_matches_verify(audit, capsys):
    code = cli.main(["verify", str(audit["out"])])
    capsys.readouterr()
    assert code == 0 and verify_folder(audit["out"]).ok
    assert audit["report"].ledger_ok
    assert "Ledger verification: OK" in audit["html"]
    assert "BROKEN" not in audit["html"]
    # The report names the exact ledger state it was built from.
    header = audit["html"][: audit["html"].index('id="cohort"')]
    assert verify_folder(audit["out"]).head_sha256 in header
    assert sha256_file(audit["out"] / "ledger.jsonl") in header


def test_each_scan_is_drawn_over_its_own_audited_voxels(audit):
    html = audit["html"]
    assert html.count("yes (voxel SHA-256 matches the record)") == len(audit["scan_ids"])
    # A scan that is not the audited one (other voxels under the same id) is refused.
    out = audit["base"] / "other-report"
    sid = audit["scan_ids"][0]
    wrong = {sid: audit["nifti"][1] if sid != "case01" else audit["nifti"][0]}
    res = build_report(audit["out"], scans=wrong, report_dir=out)
    text = res.html.read_text("utf-8")
    assert "the scan given is not the audited one" in text
    assert "yes (voxel SHA-256 matches the record)" not in text


def test_confident_wrong_predictions_are_reviewed_first(audit):
    data_rows = re.search(r'id="review".*?</table>', audit["html"], re.S).group(0)
    assert "confident wrong prediction" in audit["html"] or "disagrees" in data_rows
    positions = {sid: data_rows.find(f"#scan-{sid}\"") for sid in audit["scan_ids"]}
    listed = {k: v for k, v in positions.items() if v >= 0}
    assert listed, "scans that disagree with their labels must be in the review list"
    failed_pos = data_rows.find(f"#scan-{audit['failed'][0]}\"")
    assert failed_pos > max(listed.values())  # failures come after wrong predictions


def test_flag_rules_and_order():
    def item(**kw):
        s = ScanItem(scan_id=kw.pop("sid"), seq=1, status="ok", verified=True,
                     map_state="ok", **kw)
        _flag(s)
        return s

    conf = item(sid="a", disagrees=True, probability=0.97, predicted_label="x",
                expected_label="y")
    weak = item(sid="b", disagrees=True, probability=0.6, predicted_label="x",
                expected_label="y")
    odd = item(sid="c", disagrees=False, probability=0.99, outside_body=0.8)
    fine = item(sid="d", disagrees=False, probability=0.99, outside_body=0.1)
    empty = ScanItem(scan_id="e", seq=2, status="ok", verified=True, map_state="empty")
    _flag(empty)
    broken = ScanItem(scan_id="f", seq=3, status="ok", verified=False, map_state="ok",
                      problems=["output 'x' was changed"])
    _flag(broken)
    order = [s.scan_id for s in sorted([fine, odd, weak, conf, empty, broken],
                                       key=lambda s: s.priority)]
    # unverified, confident wrong, empty map (counts as all mass misplaced), 80 % outside,
    # a weak disagreement, and last the unflagged scan.
    assert order == ["f", "a", "e", "c", "b", "d"]
    assert not fine.flags and any("confident wrong" in f for f in conf.flags)
    assert any("outside the body" in f for f in odd.flags)
    assert any("explains nothing" in f for f in empty.flags)


def test_body_mask_and_outside_fraction():
    scan = np.zeros((10, 10, 10), np.float32)
    scan[2:8, 2:8, 2:8] = 100.0
    assert body_mask(scan).sum() == 216
    inside = np.zeros_like(scan)
    inside[4, 4, 4] = 1.0
    outside = np.zeros_like(scan)
    outside[0, 0, 0] = 1.0
    assert outside_fraction(inside, scan) == 0.0
    assert outside_fraction(outside, scan) == 1.0
    assert outside_fraction(np.zeros_like(scan), scan) is None
    # Low diffuse values over the empty background are not salient: they do not count.
    diffuse = np.full_like(scan, 0.2)
    diffuse[4, 4, 4] = 1.0
    assert outside_fraction(diffuse, scan) == 0.0
    assert outside_fraction(np.full_like(scan, 0.2), scan) is None
    spread = np.full_like(scan, 0.6)  # salient everywhere: 784 of 1000 voxels are outside
    assert outside_fraction(spread, scan) == pytest.approx(0.784)


def test_views_keep_physical_proportions_for_anisotropic_and_lps_volumes():
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    lps = np.diag([-0.7, -0.7, 2.5, 1.0])  # DICOM-like: x to the left, y posterior
    ras = to_ras(data, lps)
    assert ras.spacing == pytest.approx((0.7, 0.7, 2.5))
    np.testing.assert_array_equal(ras.data, data[::-1, ::-1, :])
    perm = np.array([[0, 0, 3.0, 0], [2.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]])
    swapped = to_ras(data, perm)  # array axes (i, j, k) run along (A, S, R)
    assert swapped.data.shape == (6, 4, 5)
    assert swapped.spacing == pytest.approx((3.0, 2.0, 1.0))


def test_no_phi_in_html_or_pdf(audit):
    html = audit["html"].lower()
    pdf_bytes = audit["report"].pdf.read_bytes()
    streams = [pdf_bytes]
    for m in re.finditer(rb"stream\r?\n(.*?)\r?\nendstream", pdf_bytes, re.S):
        with contextlib.suppress(zlib.error):
            streams.append(zlib.decompress(m.group(1)))
    text = subprocess.run(["pdftotext", str(audit["report"].pdf), "-"], check=True,
                          capture_output=True, text=True).stdout
    assert "Ledger verification: OK" in text and audit["scan_ids"][0] in text  # text is real
    blob = b"\n".join(streams).lower()
    for needle in PHI_NEEDLES:
        assert needle.lower() not in html, needle
        assert needle.lower() not in text.lower(), needle
        assert needle.lower().encode() not in blob, needle
    # Input paths (which can name a patient) never appear either.
    assert str(audit["base"]).lower() not in html
    assert str(audit["base"]).lower() not in text.lower()


def test_tampered_folder_says_so_in_the_header(audit, tmp_path, capsys):
    bad = tmp_path / "tampered"
    shutil.copytree(audit["out"], bad)
    victim = sorted(bad.glob("scans/*/cam.nii.gz"))[0]
    raw = bytearray(victim.read_bytes())
    raw[-5] ^= 0xFF
    victim.write_bytes(bytes(raw))
    assert cli.main(["verify", str(bad)]) == 1
    capsys.readouterr()
    code = cli.main(["report", str(bad), "--overwrite"])
    captured = capsys.readouterr()
    assert code == 1 and "does not verify" in captured.err
    html = (bad / "report.html").read_text("utf-8")
    header = html[: html.index('id="cohort"')]
    assert "Ledger verification: BROKEN" in header
    assert "cam.nii.gz" in header  # names what changed
    sid = victim.parent.name
    review = re.search(r'id="review".*?</table>', html, re.S).group(0)
    first_row = re.search(r"<tr><td>1</td><td><a href=\"#scan-([^\"]+)\"", review)
    assert first_row and first_row.group(1) == sid  # the unverified scan is reviewed first


def test_cli_refuses_to_overwrite_and_needs_a_ledger(audit, tmp_path, capsys):
    assert cli.main(["report", str(audit["out"])]) == 2
    assert "exists" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "ledger.jsonl" in capsys.readouterr().err


def test_large_cohorts_are_paged_and_each_page_stands_alone(audit, tmp_path):
    res = build_report(audit["out"], scans=[audit["listing"]], per_page=2,
                       report_dir=tmp_path / "paged")
    assert [p.name for p in res.pages] == ["report.html", "report-page-002.html",
                                           "report-page-003.html"]
    seen = []
    for page in res.pages:
        tags = _parse(page.read_text("utf-8"))
        seen += [a["id"] for t, a in tags if t == "section"]
        assert all(a["src"].startswith("data:image/png;base64,")
                   for t, a in tags if t == "img")
    assert sorted(seen) == sorted(f"scan-{s}" for s in [*audit["scan_ids"], *audit["failed"]])
    main = res.pages[0].read_text("utf-8")
    later = [s for s in seen[2:]]
    assert all(re.search(rf'href="report-page-00[23]\.html#{s}"', main) for s in later)


def test_chromium_renders_a_non_blank_page(audit, tmp_path):
    assert shutil.which("chromium"), \
        "chromium is missing: run `make system-deps` (scripts/install_system_deps.sh)"
    shot = screenshot_html(audit["report"].html, tmp_path / "shot.png")
    img = Image.open(shot)
    assert img.size == (1280, 2000)
    rgb = _not_blank(img)
    # The green "Ledger verification: OK" box is drawn (our page and its CSS, not an error page).
    green = np.all(np.abs(rgb - [227, 244, 225]) <= 3, axis=-1)
    assert green.sum() > 20_000
    # Colour figures are on screen: many saturated pixels (map over scan, charts).
    saturation = rgb.max(-1) - rgb.min(-1)
    assert (saturation > 80).sum() > 20_000


def test_pdf_pages_render_non_blank(audit, tmp_path):
    pages = pdf_to_pngs(audit["report"].pdf, tmp_path / "page")
    # header + cohort pages, one page per scan (4 explained + 1 failed), the appendix
    assert len(pages) >= 2 + 5 + 1
    coloured = 0
    for p in pages:
        rgb = np.asarray(Image.open(p).convert("RGB"), dtype=float)
        grey = rgb.mean(-1)
        # Not blank: something is drawn (a page may hold only the last lines of a list).
        assert (grey < 250).mean() > 0.002, f"{p.name} is blank"
        coloured += int(((rgb.max(-1) - rgb.min(-1)) > 80).sum() > 1_000)
    assert coloured >= 1 + 4  # the cohort figures and each explained scan's montage


def test_anchor_proves_the_ledger_was_not_rewritten(audit, tmp_path):
    head = verify_folder(audit["out"]).head_sha256
    good = build_report(audit["out"], anchor=head, report_dir=tmp_path / "good")
    text = good.html.read_text("utf-8")
    assert good.ledger_ok and "Anchored" in text and head in text
    bad = build_report(audit["out"], anchor="ab" * 32, report_dir=tmp_path / "bad")
    assert not bad.ledger_ok
    assert "Ledger verification: BROKEN" in bad.html.read_text("utf-8")


def test_a_changed_record_and_a_deleted_map_are_reported_not_fatal(audit, tmp_path):
    bad = tmp_path / "edited"
    shutil.copytree(audit["out"], bad)
    records = sorted(bad.glob("scans/*/cam.icam.json"))
    text = records[0].read_text("utf-8")
    records[0].write_text(text.replace('"label":"absent"', '"label":"present"')
                          .replace('"label": "absent"', '"label": "present"'))
    (records[1].parent / "cam.nii.gz").unlink()
    res = build_report(bad, overwrite=True)
    html = res.html.read_text("utf-8")
    assert not res.ledger_ok and "Ledger verification: BROKEN" in html
    for rec in records[:2]:
        section = re.search(rf'id="scan-{rec.parent.name}".*?</section>', html, re.S).group(0)
        assert "not verified" in section
    assert "map file missing" in html


def test_report_of_a_single_explain_folder(audit, tmp_path, capsys):
    out = tmp_path / "one"
    assert cli.main(["explain", str(audit["nifti"][0]), "--config", str(audit["config"]),
                     "--out", str(out)]) == 0
    capsys.readouterr()
    assert cli.main(["report", str(out), "--scans", str(audit["nifti"][0]),
                     "--config", str(audit["config"]), "--pdf"]) == 0
    printed = capsys.readouterr().out
    assert str(out / "report.html") in printed and "ledger OK" in printed
    html = (out / "report.html").read_text("utf-8")
    assert "yes (voxel SHA-256 matches the record)" in html  # scan id = folder name, matched
    assert "no expected labels" in html and (out / "report.pdf").stat().st_size > 10_000


# ---------------------------------------------------------------------------------------
# A report a reviewer trusts (issue 14 items 9 and 11)
# ---------------------------------------------------------------------------------------
def _pdf_words(pdf: Path) -> list[list[tuple[float, float, float, float, str]]]:
    """Every page's words with their boxes (pdftotext -bbox)."""
    xml = subprocess.run(["pdftotext", "-bbox", str(pdf), "-"], capture_output=True,
                         text=True, check=True).stdout
    pages = []
    for page in xml.split("<page ")[1:]:
        pages.append([(float(a), float(b), float(c), float(d), w) for a, b, c, d, w in
                      re.findall(r'<word xMin="([\d.]+)" yMin="([\d.]+)" xMax="([\d.]+)" '
                                 r'yMax="([\d.]+)">([^<]*)</word>', page)])
    return pages


def _pdf_text(pdf: Path) -> str:
    return " ".join(w[4] for page in _pdf_words(pdf) for w in page)


def _montages(html: str) -> list[np.ndarray]:
    data = re.findall(r'<img alt="map over scan"[^>]*src="data:image/png;base64,([^"]+)"', html)
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(d))).convert("RGB"), dtype=int)
            for d in data]


def _cyan(rgb: np.ndarray) -> int:
    """Pixels of the mask outline's colour (#00e5ff, anti-aliased)."""
    return int(((rgb[..., 0] < 90) & (rgb[..., 1] > 170) & (rgb[..., 2] > 200)).sum())


@pytest.fixture(scope="module")
def masked(tmp_path_factory):
    """An audit of two scans with lesion masks (CSV mask column), reported with them."""
    base = tmp_path_factory.mktemp("masked")
    cfg = _write_config(base)
    rng = np.random.default_rng(5)
    rows = ["path,label,mask"]
    for i in range(2):
        lesion = np.s_[4 + i:8 + i, 5:10, 3:6]
        vol = _body_scan((14, 16, 10), rng, lesion)
        affine = np.diag([1.5, 1.5, 3.0, 1.0])
        affine[:3, 3] = [-10.0, 20.0, -30.0]
        p = base / f"case{i:02d}.nii.gz"
        nib.save(nib.Nifti1Image(vol, affine), str(p))
        mask = np.zeros(vol.shape, np.uint8)
        mask[lesion] = 1
        m = base / f"case{i:02d}_mask.nii.gz"
        nib.save(nib.Nifti1Image(mask, affine), str(m))
        rows.append(f"{p},present,{m}")
    listing = base / "scans.csv"
    listing.write_text("\n".join(rows) + "\n")
    out = base / "audit"
    assert run_batch([listing], cfg, out, progress=False).exit_code == 0
    card = base / "MODEL_CARD.md"
    card.write_text("# tiny-report-net\nIntended use: synthetic T1 brain MR, research only.\n"
                    "<script>alert('x')</script>\n")
    report = build_report(out, scans=[listing], pdf=True, overwrite=True, model_card=card)
    return {"base": base, "out": out, "listing": listing, "report": report, "card": card,
            "html": report.html.read_text("utf-8")}


def test_mask_outline_and_overlap_context(masked):
    html = masked["html"]
    assert html.count("yes (voxel SHA-256 matches the record)") == 4  # 2 scans + 2 masks
    for sid in ("case00", "case01"):
        rec = AuditRecord.load(masked["out"] / "scans" / sid / "cam.icam.json")
        cam = np.asarray(nib.load(str(masked["out"] / "scans" / sid / "cam.nii.gz")).dataobj)
        mask = np.asarray(nib.load(str(masked["base"] / f"{sid}_mask.nii.gz")).dataobj) != 0
        share = mask.mean()
        inside = bool(mask.reshape(-1)[np.argmax(cam)])
        assert rec.analysis.mask_volume_fraction == pytest.approx(share)
        assert rec.analysis.peak_in_mask is inside
        expected = (f"{rec.analysis.mask_fraction:.1%} of the map&#39;s mass; the mask is "
                    f"{share:.1%} of the volume")
        assert expected in html
        assert ("the map&#39;s peak is inside the mask" if inside else
                "the map&#39;s peak is outside the mask") in html
    # The outline is drawn when the mask is given, and only then.
    assert all(_cyan(m) > 30 for m in _montages(html))
    sid_to_scan = {"case00": masked["base"] / "case00.nii.gz"}
    plain = build_report(masked["out"], scans=sid_to_scan, report_dir=masked["base"] / "plain")
    text = plain.html.read_text("utf-8")
    assert "no (mask not given to the report)" in text
    assert all(_cyan(m) == 0 for m in _montages(text))


def test_map_is_transparent_below_the_display_threshold():
    from icam_med.report.figures import DISPLAY_THRESHOLD, montage_png

    rng = np.random.default_rng(0)
    scan = to_ras(rng.integers(100, 400, (20, 22, 16)).astype(np.float32), np.eye(4))
    spot = np.zeros((20, 22, 16), np.float32)
    spot[8:12, 9:13, 6:9] = 1.0
    below = spot.copy()
    below[below == 0] = DISPLAY_THRESHOLD - 0.01  # a wash just under the threshold
    above = spot.copy()
    above[above == 0] = DISPLAY_THRESHOLD + 0.01
    png_spot = montage_png(to_ras(spot, np.eye(4)), scan)
    # Under the threshold nothing is drawn: the picture is the spot's, pixel for pixel.
    assert montage_png(to_ras(below, np.eye(4)), scan) == png_spot
    drawn = np.asarray(Image.open(io.BytesIO(montage_png(to_ras(above, np.eye(4)), scan))))
    assert not np.array_equal(drawn, np.asarray(Image.open(io.BytesIO(png_spot))))


def test_slice_positions_are_in_mm():
    from icam_med.report.figures import _title

    affine = np.array([[-2.0, 0, 0, 40.0], [0, -2.0, 0, 30.0], [0, 0, 3.0, -12.0],
                       [0, 0, 0, 1.0]])  # LPS storage, offset origin
    vol = to_ras(np.zeros((10, 12, 8), np.float32), affine)
    point = (3, 4, 5)
    world = vol.affine @ np.array([*point, 1.0])
    # The RAS reordering keeps world positions: voxel (3, 4, 5) of the RAS array lies where
    # the stored voxel it came from lies.
    stored = (10 - 1 - 3, 12 - 1 - 4, 5)
    assert np.allclose(world[:3], (affine @ np.array([*stored, 1.0]))[:3])
    # Titles give DICOM patient coordinates (LPS), the ones the napari viewer shows for the
    # same voxel: world (z, y, x) of the plugin's layer = (S, P, L) mm.
    from napari_plugin._layers import napari_affine

    lps_z, lps_y, lps_x = (napari_affine(affine) @ np.array([*stored[::-1], 1.0]))[:3]
    assert (lps_x, lps_y, lps_z) == pytest.approx((-world[0], -world[1], world[2]))
    assert _title("axial", 2, vol, point) == f"axial, z = {lps_z:+.1f} mm"
    assert _title("coronal", 1, vol, point) == f"coronal, y = {lps_y:+.1f} mm"
    assert _title("sagittal", 0, vol, point) == f"sagittal, x = {lps_x:+.1f} mm"
    # stored voxel (6, 7, 5): RAS (28, 16, 3) mm is LPS (-28, -16, 3) mm
    assert (lps_x, lps_y, lps_z) == pytest.approx((-28.0, -16.0, 3.0))


def test_method_rows_name_each_option_once_and_only_used_ones(audit):
    from icam_med.report.content import method_rows

    opts = {"method": "integrative", "layer_weighting": "score", "tau": 1.0,
            "alpha_fn": "exp", "alpha_beta": 2.0, "target_layers": ["a"], "fusion": "weighted"}
    rows = dict(method_rows({"name": "integrative", "layers": ["a"], "options": opts}))
    assert "tau" not in rows and rows["not used by these settings"] == "tau"
    assert rows["alpha_beta"] == 2.0 and "target_layers" not in rows
    rows = dict(method_rows({"name": "integrative", "layers": ["a"], "options": {
        **opts, "layer_weighting": "softmax", "alpha_fn": "tanh"}}))
    assert rows["tau"] == 1.0 and rows["not used by these settings"] == "alpha_beta"
    # In the report: one "method" row, no unused option rows.
    section = re.search(r'id="method".*?</table>', audit["html"], re.S).group(0)
    assert section.count("<th>method</th>") == 1
    assert "<th>tau</th>" not in section
    # counterfactual_keep is listed exactly when the counterfactual weighting uses it
    assert ("<th>counterfactual_keep</th>" in section) == (
        "<th>layer_weighting</th><td>counterfactual</td>" in section)


def test_html_and_pdf_show_the_same_figures(audit):
    from icam_med.report.content import fmt

    assert fmt(0.99984) == "0.9998" and fmt(1.0) == "1" and fmt(0.123456) == "0.1235"
    pdf = _pdf_text(audit["report"].pdf)
    html = audit["html"]
    shown = 0
    for sid in audit["scan_ids"]:
        rec = AuditRecord.load(audit["out"] / "scans" / sid / "cam.icam.json")
        from icam_med.report.collect import probabilities

        probs = probabilities(list(rec.method.logits))
        p = fmt(probs[rec.method.predicted.class_index])
        assert f"<td>{p}</td>" in html, (sid, p)
        assert p in pdf.split(), (sid, p)
        shown += 1
    assert shown == len(audit["scan_ids"])


def test_pdf_has_no_colliding_text(audit, masked, tmp_path):
    for k, pdf in enumerate((audit["report"].pdf, masked["report"].pdf)):
        pages = _pdf_words(pdf)
        assert len(pages) == len(pdf_to_pngs(pdf, tmp_path / f"r{k}"))  # every page renders
        assert_no_colliding_words(pages)


def assert_no_colliding_words(pages) -> None:
    """No two words of any page (as from :func:`_pdf_words`) overlap."""
    for n, words in enumerate(pages, start=1):
        for i, a in enumerate(words):
            for b in words[i + 1:]:
                ox = min(a[2], b[2]) - max(a[0], b[0])
                oy = min(a[3], b[3]) - max(a[1], b[1])
                assert not (ox > 0.5 and oy > 1.0), f"page {n}: '{a[4]}' overlaps '{b[4]}'"


def test_signature_status_in_the_header(audit, tmp_path):
    header = audit["html"][: audit["html"].index('id="cohort"')]
    assert "<b>Signature: UNSIGNED</b>" in header
    assert "Signature: UNSIGNED" in _pdf_text(audit["report"].pdf).replace("  ", " ")
    bad = tmp_path / "forged"
    shutil.copytree(audit["out"], bad)
    (bad / "ledger.sig.jsonl").write_text('{"not": "a signature"}\n')
    res = build_report(bad, overwrite=True)
    text = res.html.read_text("utf-8")
    assert "<b>Signature: BROKEN</b>" in text[: text.index('id="cohort"')]


def test_model_card_is_embedded_and_linked(masked, tmp_path):
    html = masked["html"]
    digest = sha256_file(masked["card"])
    assert '<a href="#model-card">MODEL_CARD.md</a>' in html
    assert 'id="model-card"' in html and digest in html
    assert "Intended use: synthetic T1 brain MR, research only." in html
    assert "<script>" not in html and "&lt;script&gt;" in html  # the template escapes it
    assert "MODEL_CARD.md" in _pdf_text(masked["report"].pdf)
    with pytest.raises(FileNotFoundError, match="model card"):
        build_report(masked["out"], model_card=tmp_path / "none.md",
                     report_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()  # refused before any work


def _coloured(rgb: np.ndarray) -> int:
    """Pixels of a map's warm colours (inferno above the threshold: red over green and blue)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return int(((r > 120) & (r > g + 40) & (r > b + 40)).sum())


def test_misclassified_scans_show_the_predicted_and_the_expected_class_maps(audit):
    """Issue 14 item 10 on a real audit: every labelled scan whose prediction disagrees gets
    the expected class's map, sealed in its record (verified), and the review list shows
    it beside the predicted class's map with both classes' layer weights."""
    import json

    from icam_med.report.collect import LOW_CONFIDENCE_PROBABILITY, probabilities

    html, pdf = audit["html"], unescape(_pdf_text(audit["report"].pdf))
    labels = ["absent", "present"]
    wrong = 0
    for sid in audit["scan_ids"]:
        rec = _record(audit, sid)
        probs = probabilities(list(rec.method.logits))
        pred = rec.method.predicted.class_index
        ref = rec.output("second_class:cam_nifti")
        summary_ref = rec.output("second_class:summary")
        if not rec.analysis.disagrees and probs[pred] >= LOW_CONFIDENCE_PROBABILITY:
            assert ref is None and f'id="pair-{sid}"' not in html  # confident and right
            continue
        assert ref is not None and summary_ref is not None, sid
        result = json.loads(rec.file(summary_ref).read_text("utf-8"))["result"]
        other = result["target_class"]
        if rec.analysis.disagrees:
            wrong += 1
            assert other == labels.index(rec.analysis.expected_label)  # the true class
        else:
            assert other == 1 - pred  # the runner-up of a right but unsure prediction
        assert rec.file(ref).name == f"cam_class{other}.nii.gz"
        first = np.asarray(nib.load(str(rec.map_path)).dataobj)
        second = np.asarray(nib.load(str(rec.file(ref))).dataobj)
        assert first.shape == second.shape and not np.allclose(first, second)
        # The review list: the pair, both classes named, both maps drawn over the scan,
        # and the heaviest layer of each map (from the record and its pinned summary).
        section = re.search(rf'id="pair-{sid}".*?</article>', html, re.S).group(0)
        text = unescape(section)
        assert f"predicted '{rec.method.predicted.label}'" in text
        assert f"'{labels[other]}' (class {other})" in text
        weights = result["layer_weights"]
        heaviest = max(weights, key=weights.get)
        assert f"{heaviest} ({weights[heaviest]:.4g})" in text
        png = re.search(r'src="data:image/png;base64,([^"]+)"', section).group(1)
        rgb = np.asarray(Image.open(io.BytesIO(base64.b64decode(png))).convert("RGB"), int)
        top, bottom = rgb[: rgb.shape[0] // 2], rgb[rgb.shape[0] // 2:]
        assert _coloured(top) > 50 and _coloured(bottom) > 50  # each row shows its map
        assert f"{sid}: predicted '{rec.method.predicted.label}'" in pdf
    assert wrong >= 1, "the fixture's labels must make at least one prediction wrong"
    assert "Misclassification analysis" in html and "Misclassification analysis" in pdf
    assert verify_folder(audit["out"]).ok  # the second maps are sealed, not loose files


def test_class_pair_figure_draws_each_class_through_its_own_peak():
    from icam_med.report.figures import class_pair_png

    rng = np.random.default_rng(1)
    scan = to_ras(rng.integers(100, 400, (20, 22, 16)).astype(np.float32), np.eye(4))
    a = np.zeros((20, 22, 16), np.float32)
    a[2:6, 2:6, 2:5] = 1.0
    b = np.zeros_like(a)
    b[14:18, 15:19, 11:14] = 1.0  # far from a: no plane through a's peak shows it
    png = class_pair_png(to_ras(a, np.eye(4)), to_ras(b, np.eye(4)), scan,
                         labels=("predicted 'x'", "expected class 'y'"),
                         weights=({"l1": 0.7, "l2": 0.3}, {"l1": 0.2, "l2": 0.8}))
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), int)
    top, bottom = rgb[: rgb.shape[0] // 2], rgb[rgb.shape[0] // 2:]
    assert _coloured(top) > 50 and _coloured(bottom) > 50
    with pytest.raises(ValueError, match="different grids"):
        class_pair_png(to_ras(a, np.eye(4)), to_ras(a[:-1], np.eye(4)), scan,
                       labels=("a", "b"), weights=({}, {}))

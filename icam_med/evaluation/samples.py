"""The sample scans of ``make demo`` and of the napari plugin's sample data, built by library code.

Everything is derived from data already installed with the project (nothing is
downloaded):

* ``mni152_t1_2mm.nii.gz``: the MNI152 ICBM 2009a symmetric T1 template that ships in
  nilearn, resampled by nilearn to 2 mm, background set to exactly 0, scaled by 1000 and
  stored as int16 (the healthy brain: the demo model should say "absent").
* ``mni152_t1_2mm_lesion.nii.gz`` and ``..._lesion_mask.nii.gz``: the same brain with one
  synthetic lesion (:class:`icam_med.evaluation.synthetic.LesionSynthesizer`, split
  ``"sample"``) and its ground-truth mask (the demo model should say "present" and point at
  it).
* ``mni152_t1_2mm_lesion_dicom/``: the lesion brain written as an MR DICOM series with
  :func:`icam_med.evaluation.dicom_series.write_dicom_series` (so DICOM loading is
  demonstrated on a scan whose truth is known).
* ``pydicom_ct5n_series/``: a small real CT series (5 slices of 16 x 16) copied from
  pydicom's test data (``dicomdirtests/98892001/CT5N``).
* ``synthetic_radiographs/``: 2-D samples (:func:`generate_radiographs`): synthetic chest
  radiographs drawn by :func:`icam_med.evaluation.radiographs.synthetic_radiograph`, one
  with a bright round finding as a DX file (Imager Pixel Spacing, window), the same kind as
  a MONOCHROME1 CR file (Pixel Spacing) with its finding elsewhere, a DX without a finding,
  and the DX finding image as a 2-D NIfTI; the findings' pixel positions are in the
  manifest (the 2-D demo model, ``configs/demo2d.yaml``, should point at them).
* ``MANIFEST.json``: what each file is, where it came from, and SHA-256 digests (of the
  NIfTI files' bytes, and of the DICOM series' pixel data and geometry, since DICOM
  files carry fresh UIDs and dates each time they are written).

Why generated rather than shipped: see ``sample_data/README.md`` (licence).
``scripts/make_sample_data.py`` writes them into the checkout's ``sample_data/scans/``; the
napari plugin calls :func:`sample_scan_path`, which builds them on demand in
:func:`icam_med.resources.sample_scans_dir` (the per-user cache, or
``$ICAM_MED_SAMPLE_DIR``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "BRAIN",
    "CT_SERIES",
    "LESION",
    "LESION_DICOM",
    "LESION_MASK",
    "MANIFEST",
    "RADIOGRAPHS",
    "RADIOGRAPH_FILES",
    "RADIOGRAPH_NIFTI",
    "SAMPLE_NAMES",
    "SEED",
    "dicom_digest",
    "ensure_sample_scans",
    "generate",
    "generate_radiographs",
    "nifti_bytes",
    "pick_sample_lesion",
    "sample_scan_path",
]

SEED = 0
BRAIN = "mni152_t1_2mm.nii.gz"
LESION = "mni152_t1_2mm_lesion.nii.gz"
LESION_MASK = "mni152_t1_2mm_lesion_mask.nii.gz"
LESION_DICOM = "mni152_t1_2mm_lesion_dicom"
CT_SERIES = "pydicom_ct5n_series"
RADIOGRAPHS = "synthetic_radiographs"
#: The 2-D samples in :data:`RADIOGRAPHS`: name -> (modality, photometric, spacing tag,
#: (row, column) spacing mm, finding centre (row, column) or None, its radius in pixels).
RADIOGRAPH_FILES: dict[str, tuple[str, str, str, tuple[float, float],
                                  tuple[int, int] | None, float]] = {
    "chest_dx_finding.dcm": ("DX", "MONOCHROME2", "ImagerPixelSpacing", (0.4, 0.4),
                             (120, 170), 18.0),
    "chest_cr_finding_mono1.dcm": ("CR", "MONOCHROME1", "PixelSpacing", (0.35, 0.35),
                                   (160, 78), 18.0),
    "chest_dx_normal.dcm": ("DX", "MONOCHROME2", "ImagerPixelSpacing", (0.4, 0.4), None, 0.0),
}
RADIOGRAPH_NIFTI = "chest_dx_finding.nii.gz"
RADIOGRAPH_SHAPE = (320, 256)  # rows, columns
MANIFEST = "MANIFEST.json"
MNI_NOTICE = (
    "Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal "
    "Neurological Institute, McGill University. Permission to use, copy, modify, and "
    "distribute this software and its documentation for any purpose and without fee is "
    "hereby granted, provided that the above copyright notice appear in all copies. The "
    "authors and McGill University make no representations about the suitability of this "
    "software for any purpose. It is provided \"as is\" without express or implied warranty."
)

log = logging.getLogger(__name__)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def nifti_bytes(volume: np.ndarray, affine: np.ndarray, description: str) -> bytes:
    """A gzipped NIfTI-1 file as bytes, reproducible (the gzip header's time is 0)."""
    import nibabel as nib

    img = nib.Nifti1Image(volume, affine)
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = description[:79].encode()
    img.set_qform(affine, code=4)  # MNI152
    img.set_sform(affine, code=4)
    return gzip.compress(img.to_bytes(), compresslevel=9, mtime=0)


def _write_atomic(path: Path, data: bytes) -> None:
    from icam_med.io.atomic import atomic_write_bytes

    atomic_write_bytes(path, data, overwrite=True)


def pick_sample_lesion(synth: Any, *, min_radius_mm: float = 9.0, min_contrast: float = 1.4,
                       max_tries: int = 200) -> Any:
    """The first ``"sample"`` volume whose lesion is clearly visible (deterministic)."""
    for i in range(max_tries):
        vol = synth(i, split="sample", label=1)
        lesion = vol.params["lesion"]
        if lesion["mean_radius_mm"] >= min_radius_mm and lesion["contrast_sd"] >= min_contrast \
                and lesion["polarity"] == "hyper":
            return vol
    raise RuntimeError("no clearly visible sample lesion found; widen the selection rule.")


def dicom_digest(folder: Path) -> dict[str, Any]:
    """SHA-256 of a DICOM series' pixel data and geometry (not its UIDs or dates)."""
    import pydicom

    h = hashlib.sha256()
    files = sorted(folder.glob("*.dcm")) or sorted(p for p in folder.iterdir() if p.is_file())
    for f in files:
        ds = pydicom.dcmread(f)
        h.update(ds.pixel_array.tobytes())
        for key in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                    "RescaleSlope", "RescaleIntercept"):
            h.update(str(ds.get(key)).encode())
    return {"files": len(files), "pixels_and_geometry_sha256": h.hexdigest()}


def generate(out: str | Path, *, force: bool = False) -> dict[str, Any]:
    """Create (or verify) every sample file in ``out``; returns the manifest.

    Deterministic: the NIfTI files are the same bytes on every run (their digests are in
    ``sample_data/scans.sha256.json``); a file that differs from a fresh generation is
    replaced (with a warning), an equal one is left untouched. Needs nilearn (the ``data``
    extra) for the MNI152 template; nothing is downloaded.

    Args:
        out: the folder to write into (created if missing).
        force: rewrite every file, even an equal one.
    """
    import pydicom.data

    from icam_med.evaluation.dicom_series import write_dicom_series
    from icam_med.evaluation.synthetic import LesionSynthesizer, mni_brain

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    image, affine, brain = mni_brain(2)
    files: dict[str, dict[str, Any]] = {}
    rewritten: set[str] = set()

    healthy = nifti_bytes(image.astype(np.int16), affine, "MNI152 2009a T1 (nilearn) 2mm x1000")
    synth = LesionSynthesizer(image, brain, spacing=(2.0, 2.0, 2.0), seed=SEED)
    vol = pick_sample_lesion(synth)
    lesion_img = np.round(vol.image).astype(np.int16)
    lesion = nifti_bytes(lesion_img, affine, "MNI152 2009a T1 2mm + synthetic lesion")
    mask = nifti_bytes(vol.mask.astype(np.uint8), affine, "synthetic lesion mask (truth)")
    for name, data, what in (
        (BRAIN, healthy, "healthy MNI152 brain, 2 mm, int16"),
        (LESION, lesion, "the same brain with one synthetic lesion, int16"),
        (LESION_MASK, mask, "ground-truth mask of the lesion, uint8"),
    ):
        path = out / name
        if force or not path.exists() or _sha256(path.read_bytes()) != _sha256(data):
            if path.exists() and not force:
                log.warning("%s differs from a fresh generation: replacing it", path)
            _write_atomic(path, data)
            rewritten.add(name)
        files[name] = {"description": what, "sha256": _sha256(data), "bytes": len(data)}

    dicom_dir = out / LESION_DICOM
    if (force or LESION in rewritten) and dicom_dir.exists():  # never a stale series
        shutil.rmtree(dicom_dir)
    if not dicom_dir.exists():
        tmp = out / f".{LESION_DICOM}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        from pydicom.uid import generate_uid

        uid = {k: generate_uid(entropy_srcs=["icam-med sample", LESION, k])
               for k in ("study", "series", "for")}
        write_dicom_series(
            lesion_img.transpose(2, 1, 0), tmp, affine=affine, modality="MR",
            series_description="MNI152 T1 2mm with synthetic lesion (icam-med sample)",
            study_description="icam-med sample data (synthetic, no patient)",
            patient_name="Sample^Synthetic", patient_id="ICAMSAMPLE01",
            study_instance_uid=uid["study"], series_instance_uid=uid["series"],
            frame_of_reference_uid=uid["for"],
        )
        tmp.rename(dicom_dir)
    files[LESION_DICOM + "/"] = {"description": "the lesion brain as an MR DICOM series",
                                 **dicom_digest(dicom_dir)}

    ct_src = Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent / "dicomdirtests" \
        / "98892001" / "CT5N"
    ct_dir = out / CT_SERIES
    if force and ct_dir.exists():
        shutil.rmtree(ct_dir)
    if not ct_dir.exists():
        tmp = out / f".{CT_SERIES}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for f in sorted(ct_src.iterdir()):
            shutil.copyfile(f, tmp / f"{f.name}.dcm")
        tmp.rename(ct_dir)
    files[CT_SERIES + "/"] = {
        "description": "small real CT series (5 slices, 16 x 16) from pydicom's test data",
        "source": "pydicom/data/test_files/dicomdirtests/98892001/CT5N",
        **dicom_digest(ct_dir),
    }

    radiographs = generate_radiographs(out / RADIOGRAPHS, force=force)
    files[RADIOGRAPHS + "/"] = {
        "description": "synthetic 2-D chest radiographs (DX, MONOCHROME1 CR, 2-D NIfTI) with "
                       "known findings",
        "findings": radiographs["findings"],
        "sha256": radiographs["sha256"],
    }

    manifest = {
        "generator": "icam_med.evaluation.samples.generate",
        "seed": SEED,
        "mni152_notice": MNI_NOTICE,
        "lesion": vol.params,
        "lesion_mask_voxels": int(vol.mask.sum()),
        "files": files,
    }
    _write_atomic(out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


def generate_radiographs(out: str | Path, *, force: bool = False) -> dict[str, Any]:
    """Write the 2-D samples (:data:`RADIOGRAPH_FILES` and :data:`RADIOGRAPH_NIFTI`) into
    ``out``, deterministically (fixed seeds, UIDs and dates: the same bytes every run).

    Returns:
        ``{"findings": {name: {"row", "column", "radius_px"} or None}, "sha256": digest of
        every file's bytes, in name order}``.
    """
    from pydicom.uid import generate_uid

    from icam_med.evaluation.radiographs import synthetic_radiograph, write_radiograph

    out = Path(out)
    # Always drawn afresh (four small files, well under a second) into a temporary folder:
    # an equal folder is left untouched, a stale or damaged one replaced.
    target = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    findings: dict[str, Any] = {}
    for i, (name, (modality, photometric, tag, spacing, centre, radius)) in enumerate(
            RADIOGRAPH_FILES.items()):
        findings[name] = (None if centre is None else
                          {"row": centre[0], "column": centre[1], "radius_px": radius})
        image = synthetic_radiograph(np.random.default_rng([SEED, i]), RADIOGRAPH_SHAPE,
                                     finding=centre, radius=radius or 1.0)
        uids = {k: generate_uid(entropy_srcs=["icam-med 2-D sample", name, k])
                for k in ("study", "series", "sop")}
        write_radiograph(target / name, image, modality=modality, photometric=photometric,
                         spacing=spacing, spacing_tag=tag, window=(2048.0, 4096.0), uids=uids,
                         series_description=f"synthetic chest radiograph ({name})",
                         patient_name="Anonymous^Phantom", patient_id="PHANTOM2D")
        if name == "chest_dx_finding.dcm":
            dr, dc = spacing
            affine = np.diag([-dc, -dr, 1.0, 1.0])  # the DX file's own grid (io.radiograph)
            data = np.round(image).astype(np.int16).T  # (columns, rows) = (x, y)
            import nibabel as nib

            img = nib.Nifti1Image(data, affine)
            img.header.set_xyzt_units("mm")
            img.header["descrip"] = b"synthetic chest radiograph with a finding (icam-med)"
            img.set_qform(affine, code=1)
            img.set_sform(affine, code=1)
            (target / RADIOGRAPH_NIFTI).write_bytes(
                gzip.compress(img.to_bytes(), compresslevel=9, mtime=0))
    findings[RADIOGRAPH_NIFTI] = findings["chest_dx_finding.dcm"]

    def digest(folder: Path) -> str:
        h = hashlib.sha256()
        for f in sorted(folder.iterdir()):
            h.update(f.name.encode())
            h.update(f.read_bytes())
        return h.hexdigest()

    fresh = digest(target)
    if out.exists() and not force and out.is_dir() and digest(out) == fresh:
        shutil.rmtree(target)
    else:
        if out.exists():
            if not force:
                log.warning("%s differs from a fresh generation: replacing it", out)
            shutil.rmtree(out)
        target.rename(out)
    return {"findings": findings, "sha256": fresh}


#: Every sample a caller may ask :func:`sample_scan_path` for.
SAMPLE_NAMES: tuple[str, ...] = (BRAIN, LESION, LESION_MASK, LESION_DICOM, CT_SERIES,
                                 RADIOGRAPHS)


def ensure_sample_scans(folder: str | Path | None = None) -> Path:
    """The folder holding every sample scan, generated there first when one is missing.

    Args:
        folder: where the scans live; default :func:`icam_med.resources.sample_scans_dir`.

    Raises:
        ModuleNotFoundError: nilearn (the ``data`` extra) is not installed, so the scans
            cannot be built; the message says what to install.
    """
    from icam_med.resources import sample_scans_dir

    out = Path(folder) if folder is not None else sample_scans_dir()
    if all((out / name).exists() for name in SAMPLE_NAMES):
        return out
    try:
        import nilearn  # noqa: F401  (the MNI152 template comes from nilearn)
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"the sample scans are missing from {out} and building them needs nilearn; "
            "install it with: pip install 'icam-med[data]'.") from exc
    log.info("building the sample scans in %s (a few seconds, nothing is downloaded)", out)
    generate(out)
    return out


def sample_scan_path(name: str, folder: str | Path | None = None) -> Path:
    """Path of one sample scan (see :data:`SAMPLE_NAMES`), built on demand.

    Args:
        name: a file or series-folder name, e.g. ``"mni152_t1_2mm_lesion.nii.gz"``.
        folder: where the scans live; default :func:`icam_med.resources.sample_scans_dir`.

    Raises:
        ValueError: ``name`` is not a sample scan; the message lists them.
    """
    if name not in SAMPLE_NAMES:
        raise ValueError(f"'{name}' is not a sample scan; choose one of {list(SAMPLE_NAMES)}.")
    return ensure_sample_scans(folder) / name

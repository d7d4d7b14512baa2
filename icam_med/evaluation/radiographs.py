"""Synthetic radiographs with a known finding, and real DICOM files of them (pydicom).

Used by the 2-D sample data (:mod:`icam_med.evaluation.samples`), the 2-D demo model's
training (``scripts/train_demo2d_model.py``) and the tests; nothing is downloaded.

* :func:`synthetic_radiograph` draws a chest-like projection image (a soft-tissue body,
  two darker lung fields, smooth texture and noise) and, optionally, one bright round
  finding (a "nodule") centred at a known ``(row, column)``.
* :func:`write_radiograph` writes a (rows, columns) array as a single-frame DX, CR or MG
  DICOM file with its spacing (Pixel Spacing or Imager Pixel Spacing), photometric
  interpretation (MONOCHROME1 stores inverted values, as such detectors do), an optional
  window or VOI LUT, and no patient position (a projection image has none).
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "SOP_CLASSES",
    "synthetic_radiograph",
    "train_finding_classifier",
    "training_batch",
    "write_radiograph",
]

#: SOP classes of the "For Presentation" projection images written here.
SOP_CLASSES = {
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",   # Digital X-Ray Image Storage - For Presentation
    "CR": "1.2.840.10008.5.1.4.1.1.1",     # Computed Radiography Image Storage
    "MG": "1.2.840.10008.5.1.4.1.1.1.2",   # Digital Mammography X-Ray Image - For Presentation
}


def _smooth(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Unit-variance smooth noise with correlation length ``sigma`` pixels, drawn on a grid
    ``sigma / 2`` times coarser and interpolated (the same texture at a fraction of the
    cost of filtering at full size)."""
    from scipy.ndimage import gaussian_filter, zoom

    k = max(1, int(sigma // 2))
    low = (-(-shape[0] // k) + 1, -(-shape[1] // k) + 1)
    field = gaussian_filter(rng.standard_normal(low), sigma=sigma / k)
    field = zoom(field, k, order=1)[: shape[0], : shape[1]]
    return field / (field.std() + 1e-8)


def synthetic_radiograph(rng: np.random.Generator, shape: tuple[int, int] = (256, 256), *,
                         finding: tuple[float, float] | None = None, radius: float = 8.0,
                         contrast: float = 0.35, max_value: float = 4095.0) -> np.ndarray:
    """A chest-like projection image, (rows, columns) float64 in ``[0, max_value]``,
    brighter = denser (as displayed).

    Args:
        rng: the random generator (texture, noise, body shape).
        shape: ``(rows, columns)``.
        finding: ``(row, column)`` of a bright round finding's centre, or ``None``.
        radius: the finding's radius in pixels (a soft-edged disc).
        contrast: the finding's brightness relative to the full range.
        max_value: the largest display value.
    """
    rows, cols = shape
    r = (np.arange(rows)[:, None] + 0.5) / rows
    c = (np.arange(cols)[None, :] + 0.5) / cols
    cy, cx = 0.5 + rng.uniform(-0.03, 0.03), 0.5 + rng.uniform(-0.03, 0.03)
    body = (((c - cx) / 0.46) ** 2 + ((r - cy) / 0.52) ** 2) < 1.0
    img = np.where(body, 0.55, 0.05)
    for side in (-1, 1):
        lung = (((c - (cx + side * 0.19)) / 0.14) ** 2 + ((r - (cy - 0.04)) / 0.3) ** 2) < 1.0
        img = np.where(lung, 0.25, img)
    img = img + 0.06 * _smooth(rng, shape, sigma=max(2.0, min(shape) / 24))
    if finding is not None:
        rr = np.arange(rows)[:, None] - float(finding[0])
        cc = np.arange(cols)[None, :] - float(finding[1])
        dist = np.sqrt(rr ** 2 + cc ** 2)
        img = img + contrast / (1.0 + np.exp((dist - radius) / max(0.5, radius / 6)))
    img = img + 0.015 * rng.standard_normal(shape)
    return np.clip(img, 0.0, 1.0) * max_value


_UP = 4  # training images are drawn at this multiple of the model's size, then averaged


def training_batch(rng: np.random.Generator, n: int, size: int = 64, *,
                   radius_range: tuple[float, float] = (2.5, 5.0), upsample: int = _UP
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` radiographs at the model's size, half with a finding.

    Returns:
        ``(images (n, 1, size, size) float32 scaled to [0, 1], labels (n,) int64,
        centres (n, 2) (row, column), NaN without a finding)``. Each image is indexed
        ``[0, column, row]``: MONAI's and icam-med's 2-D layout (x, y), the layout a
        radiograph reaches the model in.
    """
    images = np.empty((n, 1, size, size), dtype=np.float32)
    labels = np.zeros(n, dtype=np.int64)
    centres = np.full((n, 2), np.nan)
    for i in range(n):
        present = i % 2 == 1
        centre = None
        if present:
            centre = (rng.uniform(0.2, 0.8) * size, rng.uniform(0.15, 0.85) * size)
            centres[i] = centre
            labels[i] = 1
        # drawn at ``upsample`` x the size and area-averaged, as a radiograph resized to the
        # model's input is (its pixel noise averaged away)
        up = max(1, int(upsample))
        big = synthetic_radiograph(rng, (up * size, up * size),
                                   finding=None if centre is None else (
                                       up * centre[0] + (up - 1) / 2,
                                       up * centre[1] + (up - 1) / 2),
                                   radius=up * rng.uniform(*radius_range), max_value=1.0)
        img = big.reshape(size, up, size, up).mean(axis=(1, 3))
        images[i, 0] = img.T  # (rows, columns) -> (x, y) = (columns, rows)
    return images, labels, centres


def write_radiograph(path: str | Path, display: np.ndarray, *, modality: str = "DX",
                     spacing: tuple[float, float] = (0.2, 0.2),
                     spacing_tag: str = "ImagerPixelSpacing", photometric: str = "MONOCHROME2",
                     window: tuple[float, float] | None = None, voi_lut: np.ndarray | None = None,
                     bits_stored: int = 12, patient_orientation: str = "L\\F",
                     uids: dict[str, str] | None = None, series_description: str = "",
                     patient_name: str = "Synthetic^Radiograph",
                     patient_id: str = "ICAM2D") -> Path:
    """Write a (rows, columns) image as a single-frame projection DICOM file.

    Args:
        path: the file to write.
        display: the image as it should be displayed (brighter = denser), values in
            ``[0, 2**bits_stored - 1]``; rounded to unsigned integers.
        modality: ``"DX"``, ``"CR"`` or ``"MG"`` (its "For Presentation" SOP class).
        spacing: ``(row, column)`` spacing in mm.
        spacing_tag: ``"ImagerPixelSpacing"``, ``"PixelSpacing"`` or ``"both"`` (Pixel
            Spacing then holds ``spacing`` and Imager Pixel Spacing 1.1 times it, as a
            calibrated image at 10 % magnification would) or ``"none"``.
        photometric: ``"MONOCHROME2"`` stores ``display``; ``"MONOCHROME1"`` stores
            ``max - display`` (and a window, if any, mirrored), so a viewer shows the same.
        window: ``(centre, width)`` in display values, or ``None``.
        voi_lut: a VOI LUT (1-D array of output values for stored values 0..len-1), or None.
        bits_stored: stored bits (unsigned, in 16 allocated).
        patient_orientation: Patient Orientation (0020,0020) (row and column directions).
        uids: ``study``, ``series``, ``sop`` UIDs to use (new ones by default).
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    modality = modality.upper()
    if modality not in SOP_CLASSES:
        raise ValueError(f"modality {modality!r}: expected one of {sorted(SOP_CLASSES)}.")
    top = 2 ** int(bits_stored) - 1
    values = np.clip(np.rint(np.asarray(display, dtype=np.float64)), 0, top).astype(np.uint16)
    if photometric == "MONOCHROME1":
        values = (top - values).astype(np.uint16)
    elif photometric != "MONOCHROME2":
        raise ValueError(f"photometric {photometric!r}: expected MONOCHROME1 or MONOCHROME2.")
    uids = dict(uids or {})
    sop_uid = uids.get("sop") or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SOP_CLASSES[modality]
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SOP_CLASSES[modality]
    ds.SOPInstanceUID = sop_uid
    now = _dt.datetime(2026, 1, 1, 12, 0, 0)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.Manufacturer = "icam-med synthetic"
    ds.ReferringPhysicianName = ""
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = uids.get("study") or generate_uid()
    ds.SeriesInstanceUID = uids.get("series") or generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SeriesDescription = series_description
    ds.PatientOrientation = patient_orientation
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.BodyPartExamined = "BREAST" if modality == "MG" else "CHEST"
    ds.ImageLaterality = "L" if modality == "MG" else "U"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(values.shape[0]), int(values.shape[1])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, int(bits_stored), int(bits_stored) - 1
    ds.PixelRepresentation = 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    spacing_str = [f"{float(s):.6g}" for s in spacing]
    if spacing_tag in ("PixelSpacing", "both"):
        ds.PixelSpacing = spacing_str
        ds.PixelSpacingCalibrationType = "GEOMETRY"
    if spacing_tag == "ImagerPixelSpacing":
        ds.ImagerPixelSpacing = spacing_str
    elif spacing_tag == "both":
        ds.ImagerPixelSpacing = [f"{float(s) * 1.1:.6g}" for s in spacing]
        ds.EstimatedRadiographicMagnificationFactor = 1.1
    elif spacing_tag not in ("PixelSpacing", "none"):
        raise ValueError(f"spacing_tag {spacing_tag!r}: expected ImagerPixelSpacing, "
                         "PixelSpacing, both or none.")
    if window is not None:
        centre, width = float(window[0]), float(window[1])
        if photometric == "MONOCHROME1":
            centre = top - centre
        ds.WindowCenter, ds.WindowWidth = f"{centre:.6g}", f"{width:.6g}"
        ds.VOILUTFunction = "LINEAR"
    if voi_lut is not None:
        item = pydicom.Dataset()
        lut = np.asarray(voi_lut, dtype=np.uint16)
        item.LUTDescriptor = [len(lut), 0, 16]
        item.LUTExplanation = "icam-med synthetic VOI LUT"
        item["LUTData"] = pydicom.DataElement(0x00283006, "US", lut.tolist())
        ds.VOILUTSequence = [item]
    ds.PixelData = values.tobytes()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(p, enforce_file_format=True)
    return p


def train_finding_classifier(model: Any, *, steps: int = 150, batch_size: int = 32,
                             size: int = 64, seed: int = 0, lr: float = 3e-3,
                             upsample: int = _UP) -> list[float]:
    """Train a 2-D classifier (logits absent/present) to find the synthetic finding.

    Each image is z-scored (what ``NormalizeIntensityd`` does in the 2-D config); step
    ``s`` draws its batch from ``numpy.random.default_rng([seed, s])``, so a run is
    reproducible. The model is left in eval mode.

    Returns:
        The loss of every step.
    """
    import torch

    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    losses = []
    model.train()
    for step in range(steps):
        images, labels, _ = training_batch(np.random.default_rng([seed, step]), batch_size, size,
                                           upsample=upsample)
        mean = images.mean(axis=(1, 2, 3), keepdims=True)
        std = images.std(axis=(1, 2, 3), keepdims=True) + 1e-8
        x = torch.from_numpy((images - mean) / std)
        loss = loss_fn(model(x), torch.from_numpy(labels))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    # BatchNorm's running statistics lag the weights after a short run: re-estimate them
    # as plain averages over fresh batches (no gradient), so eval mode sees what training saw.
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    with torch.no_grad():
        for step in range(steps, steps + 8):
            images, _, _ = training_batch(np.random.default_rng([seed, step]), batch_size, size,
                                          upsample=upsample)
            mean = images.mean(axis=(1, 2, 3), keepdims=True)
            std = images.std(axis=(1, 2, 3), keepdims=True) + 1e-8
            model(torch.from_numpy((images - mean) / std))
    for m in norms:
        m.momentum = 0.1
    model.eval()
    return losses

"""npe2 sample data: the project's sample scans and the demo audit, from ``sample_data/``.

The scans are generated, not shipped (see sample_data/README.md): when they are missing,
``scripts/make_sample_data.py`` builds them from installed packages in a few seconds.
The demo audit (the lesion brain explained by the demo model) is computed once, through
:func:`icam_med.explain.explain_scan` as the CLI does, into
``sample_data/scans/mni152_t1_2mm_lesion_icam/`` beside the scan.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from napari_plugin._layers import audit_folder_layers, audit_name_for
from napari_plugin._reader import read_scan

__all__ = ["REPO", "sample_audit", "sample_brain", "sample_brain_dicom", "sample_ct",
           "sample_scan_path"]

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
SCANS = REPO / "sample_data" / "scans"
DEMO_CONFIG = REPO / "configs" / "demo.yaml"


def sample_scan_path(name: str) -> Path:
    """Path of a sample scan, generating the sample scans first when missing.

    Raises:
        FileNotFoundError: neither the scan nor the generator script is available (an
            installation without the source tree).
    """
    path = SCANS / name
    if path.exists():
        return path
    script = REPO / "scripts" / "make_sample_data.py"
    if not script.is_file():
        raise FileNotFoundError(
            f"sample scan {path} is missing and {script} is not available to generate it; "
            "run 'make sample-data' in a clone of the project."
        )
    log.info("generating the sample scans with %s", script)
    spec = importlib.util.spec_from_file_location("icam_make_sample_data", script)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    module.generate(SCANS)
    if not path.exists():
        raise FileNotFoundError(f"{script} ran but did not produce {path}.")
    return path


def sample_brain() -> list[tuple]:
    """MNI152 T1 brain (2 mm) with one synthetic lesion, NIfTI."""
    return read_scan(sample_scan_path("mni152_t1_2mm_lesion.nii.gz"))


def sample_brain_dicom() -> list[tuple]:
    """The same lesion brain as an MR DICOM series (lands exactly on the NIfTI)."""
    return read_scan(sample_scan_path("mni152_t1_2mm_lesion_dicom"))


def sample_ct() -> list[tuple]:
    """A small real CT series (5 slices, pydicom test data)."""
    return read_scan(sample_scan_path("pydicom_ct5n_series"))


def _retire_stale_audit(folder: Path) -> None:
    """Move a cached demo audit aside when the demo weights changed since it was made.

    Audited outputs are never overwritten; the old folder is kept as
    ``<folder>.stale-<old weights hash>`` and a fresh audit is computed.
    """
    import json

    from icam_med.audit.hashing import sha256_file
    from icam_med.config import load_config

    record = folder / "cam.icam.json"
    if not record.is_file():
        return
    weights = load_config(DEMO_CONFIG).model.weights
    if weights is None or not weights.is_file():
        return
    old = (json.loads(record.read_text(encoding="utf-8")).get("model") or {}).get(
        "weights_sha256")
    if old != sha256_file(weights):
        aside = folder.with_name(f"{folder.name}.stale-{str(old)[:12]}")
        log.warning("the demo weights changed since %s was computed; moving it to %s",
                    folder, aside)
        folder.rename(aside)


def sample_audit() -> list[tuple]:
    """The lesion brain with the demo model's Integrative CAM audit (computed once).

    Raises:
        FileNotFoundError: the demo model's weights are not present yet.
    """
    scan = sample_scan_path("mni152_t1_2mm_lesion.nii.gz")
    folder = audit_name_for(scan)
    _retire_stale_audit(folder)
    if not folder.is_dir():
        from icam_med.explain import explain_scan

        explain_scan(scan, DEMO_CONFIG, folder, layer_maps=True)
    return audit_folder_layers(folder)

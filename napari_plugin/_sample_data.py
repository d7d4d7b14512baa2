"""npe2 sample data: the project's sample scans and the demo audit.

The scans are generated, not shipped (licence: see sample_data/README.md): library code,
:mod:`icam_med.evaluation.samples`, builds them on first use (a few seconds, nothing is
downloaded) into :func:`icam_med.resources.sample_scans_dir`: ``$ICAM_MED_SAMPLE_DIR`` when
set (``make napari`` sets the checkout's ``sample_data/scans``), otherwise the per-user cache
(``~/.cache/icam-med/sample_scans`` on Linux). The demo audit (the lesion brain explained by
the packaged demo model) is computed once, through :func:`icam_med.explain.explain_scan` as
the CLI does, into ``mni152_t1_2mm_lesion_icam/`` beside that scan. Nothing here depends on a
source checkout: configs and the demo model are package data (:mod:`icam_med.resources`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from icam_med.evaluation.samples import CT_SERIES, LESION, LESION_DICOM, sample_scan_path
from icam_med.paths import audit_folder_for, map_path, record_path_for
from icam_med.resources import packaged_config
from napari_plugin._layers import audit_folder_layers
from napari_plugin._reader import read_scan

__all__ = ["DEMO_CONFIG", "sample_audit", "sample_brain", "sample_brain_dicom", "sample_ct",
           "sample_scan_path"]

log = logging.getLogger(__name__)


#: The packaged demo config (the trained demo model).
DEMO_CONFIG = packaged_config("demo")


def sample_brain() -> list[tuple]:
    """MNI152 T1 brain (2 mm) with one synthetic lesion, NIfTI."""
    return read_scan(sample_scan_path(LESION))


def sample_brain_dicom() -> list[tuple]:
    """The same lesion brain as an MR DICOM series (lands exactly on the NIfTI)."""
    return read_scan(sample_scan_path(LESION_DICOM))


def sample_ct() -> list[tuple]:
    """A small real CT series (5 slices, pydicom test data)."""
    return read_scan(sample_scan_path(CT_SERIES))


def _retire_stale_audit(folder: Path) -> None:
    """Move a cached demo audit aside when the demo weights changed since it was made.

    Audited outputs are never overwritten; the old folder is kept as
    ``<folder>.stale-<old weights hash>`` and a fresh audit is computed.
    """
    import json

    from icam_med.audit.hashing import sha256_file
    from icam_med.config import load_config

    record = record_path_for(map_path(folder))
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
        FileNotFoundError: the demo model's weights are not present.
    """
    scan = sample_scan_path(LESION)
    folder = audit_folder_for(scan)
    _retire_stale_audit(folder)
    if not folder.is_dir():
        from icam_med.explain import explain_scan

        explain_scan(scan, DEMO_CONFIG, folder, layer_maps=True)
    return audit_folder_layers(folder)

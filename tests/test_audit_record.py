"""Audit records: schema, content, keyed UID hashes and the patient-identifier deny-list."""

from __future__ import annotations

import hashlib
import hmac
import json
import platform
from importlib import metadata

import numpy as np
import pytest
import torch
from _audit_util import tiny_model_config, write_scan_outputs

from icam_med.audit import (
    Ledger,
    check_no_phi,
    find_phi,
    load_record_schema,
    load_site_key,
    record_sha256,
    validate_record,
    verify_folder,
    voxel_sha256,
)
from icam_med.audit.hashing import sha256_file
from icam_med.audit.phi import SiteKey, scrub_paths

KEY = b"0123456789abcdef0123456789abcdef"


@pytest.fixture
def out(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


def test_record_validates_and_pins_its_inputs(out, tmp_path):
    cfg = tiny_model_config(tmp_path)
    record, entry = write_scan_outputs(out, "scan-a", model_cfg=cfg)
    on_disk = json.loads((out / "scan-a" / "icam.icam.json").read_text())
    assert on_disk == record
    validate_record(on_disk)
    assert on_disk["integrity"]["record_sha256"] == record_sha256(on_disk)
    assert on_disk["integrity"]["sequence"] == entry.seq == 1
    assert on_disk["model"]["weights_sha256"] == sha256_file(cfg.weights)
    assert on_disk["model"]["weights_file"] == "tiny.safetensors"  # a name, never a path
    assert on_disk["model"]["weights_format"] == "safetensors"
    assert on_disk["method"]["layer_weights"] == {"net.layer1": 0.25, "net.layer2": 0.75}
    assert on_disk["method"]["target"] == {"class_index": 1, "label": "present"}
    versions = on_disk["runtime"]["versions"]
    assert versions["torch"] == metadata.version("torch")
    assert versions["python"] == platform.python_version()
    assert versions["icam-med"] and versions["monai"] and versions["highdicom"]
    (ref,) = on_disk["outputs"]
    assert ref["path"] == "scan-a/icam.nii.gz" and ref["role"] == "map-nifti"
    assert ref["sha256"] == sha256_file(out / ref["path"])
    # No absolute path of this machine anywhere in the record.
    assert str(tmp_path) not in json.dumps(on_disk)
    assert verify_folder(out).ok


def test_schema_is_shipped_and_rejects_bad_records(out, tmp_path):
    schema = load_record_schema()
    assert schema["$schema"].endswith("2020-12/schema")
    record, _ = write_scan_outputs(out, "s", model_cfg=tiny_model_config(tmp_path))
    bad = json.loads(json.dumps(record))
    del bad["model"]["weights_sha256"]
    with pytest.raises(ValueError, match=r"model: 'weights_sha256' is a required property"):
        validate_record(bad)
    bad = json.loads(json.dumps(record))
    bad["outputs"][0]["path"] = "/etc/passwd"
    with pytest.raises(ValueError, match=r"outputs\.0\.path"):
        validate_record(bad)
    bad = json.loads(json.dumps(record))
    bad["input"]["PatientName"] = "DOE^JANE"
    with pytest.raises(ValueError, match="Additional properties"):
        validate_record(bad)


def test_uids_only_as_keyed_hashes(out, tmp_path):
    uids = {"study": "1.2.826.0.1.3680043.8.498.111", "series": "1.2.826.0.1.3680043.8.498.222",
            "instances": ["1.2.826.0.1.3680043.8.498.3", "1.2.826.0.1.3680043.8.498.4"]}
    cfg = tiny_model_config(tmp_path)
    key = SiteKey(KEY, "test")
    with_key, _ = write_scan_outputs(out, "k", uids=uids, site_key=key, model_cfg=cfg)
    hashed = with_key["input"]["uid_hashes"]
    assert hashed["algorithm"] == "HMAC-SHA256" and hashed["key_id"] == key.key_id
    assert hashed["study"] == hmac.new(KEY, uids["study"].encode(), hashlib.sha256).hexdigest()
    assert hashed["n_instances"] == 2
    without_key, _ = write_scan_outputs(out, "nokey", uids=uids, site_key=None, model_cfg=cfg)
    assert without_key["input"]["uid_hashes"] is None
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for uid in [uids["study"], uids["series"], *uids["instances"]]:
                assert uid.encode() not in data, path
    assert "0123456789abcdef" not in repr(key)


def test_site_key_sources(tmp_path):
    assert load_site_key({}, environ={}) is None
    key = load_site_key({}, environ={"ICAM_MED_SITE_KEY": KEY.decode()})
    assert key.secret == KEY
    key_file = tmp_path / "site.key"
    key_file.write_bytes(KEY + b"\n")
    assert load_site_key({"site_key_file": "site.key"}, environ={}, base_dir=tmp_path).secret == KEY
    assert load_site_key({"site_key_env": "MY_KEY"}, environ={"MY_KEY": "x" * 20}).secret == b"x" * 20
    with pytest.raises(ValueError, match="holds a secret in a config file"):
        load_site_key({"site_key": "x" * 32}, environ={})
    with pytest.raises(ValueError, match="at least 16 bytes"):
        load_site_key({}, environ={"ICAM_MED_SITE_KEY": "short"})
    with pytest.raises(ValueError, match="MY_KEY, which is unset"):
        load_site_key({"site_key_env": "MY_KEY"}, environ={})
    with pytest.raises(FileNotFoundError, match=r"missing\.key"):
        load_site_key({"site_key_file": "missing.key"}, environ={}, base_dir=tmp_path)


def test_voxel_hash_is_about_content_not_encoding():
    a = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    assert voxel_sha256(a) == voxel_sha256(a.astype(">i2"))  # byte order does not matter
    assert voxel_sha256(a) == voxel_sha256(torch.from_numpy(a))
    assert voxel_sha256(a) == voxel_sha256(np.asfortranarray(a))  # memory layout neither
    b = a.copy()
    b[1, 2, 3] += 1
    assert voxel_sha256(b) != voxel_sha256(a)  # one voxel does
    assert voxel_sha256(a.reshape(4, 3, 2)) != voxel_sha256(a)  # shape does
    assert voxel_sha256(a.astype(np.int32)) != voxel_sha256(a)  # dtype does


def test_deny_list_finds_identifiers():
    found = find_phi(
        {"input": {"PatientName": "x", "note": "study 1.2.840.113619.2.55.3"},
         "outputs": [{"path": "/home/alice/scan.nii"}],
         "activity": {"warnings": ["could not read DOE JOHN header"]},
         "runtime": {"versions": {"torch": "2.13.0", "monai": "1.6.1"}}},
        identifiers=["DOE^JOHN"])
    joined = "\n".join(found)
    assert "input.PatientName: identifying attribute name" in joined
    assert "input.note: looks like a raw DICOM UID" in joined
    assert "outputs[0].path: an absolute file path" in joined
    assert "activity.warnings[0]: contains a known patient identifier" in joined
    assert len(found) == 4  # package versions are not mistaken for UIDs
    with pytest.raises(ValueError, match="refusing to write the audit record"):
        check_no_phi({"accession_number": "A1"})
    assert scrub_paths("cannot read /data/DOE^JOHN/ct.dcm: bad", keep=["/out"]) == \
        "cannot read <...>/ct.dcm: bad"
    assert scrub_paths("wrote /out/s1/map.nii.gz", keep=["/out"]) == "wrote s1/map.nii.gz"


def test_record_with_identifiers_is_refused_and_nothing_written(out, tmp_path):
    record, _ = write_scan_outputs(out, "ok", model_cfg=tiny_model_config(tmp_path))
    leaky = json.loads(json.dumps(record))
    del leaky["integrity"]
    leaky["scan_id"] = "DOE_JOHN_01"
    ledger = Ledger(out)
    before = ledger.path.read_bytes()
    with pytest.raises(ValueError, match="scan_id: contains a known patient identifier"):
        ledger.commit_record(leaky, out / "leaky.icam.json", identifiers=("DOE^JOHN",))
    assert not (out / "leaky.icam.json").exists()
    assert ledger.path.read_bytes() == before

"""The same batch on a real Dask LocalCluster, and on local worker processes, gives the same
maps and records as in-process."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from test_batch import write_config, write_scans

from icam_med.audit import verify_folder
from icam_med.batch import run_batch

distributed = pytest.importorskip("distributed")

# Fields that legitimately differ between two runs.
RUN_SPECIFIC = {"activity", "integrity", "runtime"}


def _records(out):
    return {p.parent.name: json.loads(p.read_text()) for p in out.rglob("*.icam.json")}


def _close(a, b, path=""):
    """Deep equality with float tolerance."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-5), path
    else:
        assert a == b, path


def test_local_cluster_and_processes_match_local_run(tmp_path):
    cfg = write_config(tmp_path)
    scans = write_scans(tmp_path / "scans", 4, seed=11)
    local = run_batch([tmp_path / "scans"], cfg, tmp_path / "local", progress=False)
    assert local.exit_code == 0 and len(local.done) == 4

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None, silence_logs=50) as cluster:
        # By address, as `icam-med audit --cluster tcp://...` does.
        remote = run_batch([tmp_path / "scans"], cfg, tmp_path / "dask",
                           cluster=cluster.scheduler_address, progress=False)
    assert remote.exit_code == 0 and sorted(remote.done) == sorted(local.done)
    # Each worker process loaded the model exactly once and kept it for its scans.
    assert 1 <= len(remote.prepare_counts) <= 2
    assert set(remote.prepare_counts.values()) == {1}

    # The same work on two local processes (--workers 2).
    pool = run_batch([tmp_path / "scans"], cfg, tmp_path / "pool", workers=2, progress=False)
    assert pool.exit_code == 0 and sorted(pool.done) == sorted(local.done)
    assert set(pool.prepare_counts.values()) == {1}

    rec_local = _records(tmp_path / "local")
    for other in ("dask", "pool"):
        assert verify_folder(tmp_path / other).ok
        for scan in scans:
            sid = scan.name.removesuffix(".nii.gz")
            a = nib.load(tmp_path / "local" / "scans" / sid / "cam.nii.gz")
            b = nib.load(tmp_path / other / "scans" / sid / "cam.nii.gz")
            np.testing.assert_allclose(b.get_fdata(), a.get_fdata(), atol=1e-5)
            np.testing.assert_array_equal(b.affine, a.affine)
        rec_other = _records(tmp_path / other)
        assert set(rec_local) == set(rec_other)
        for sid, a in rec_local.items():
            b = rec_other[sid]
            _close({k: v for k, v in a.items() if k not in RUN_SPECIFIC | {"outputs"}},
                   {k: v for k, v in b.items() if k not in RUN_SPECIFIC | {"outputs"}}, sid)
            assert [o["path"] for o in a["outputs"]] == [o["path"] for o in b["outputs"]]
            assert a["runtime"]["versions"] == b["runtime"]["versions"]
            assert b["activity"]["command"] == "audit"


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def test_dask_workers_use_their_share_of_the_host_cores(tmp_path):
    """A Dask nanny starts its worker with OMP_NUM_THREADS=1, so torch would run one thread
    however many cores the host has; a batch gives each worker its share of its host's cores
    (all of them for the one worker here), as --workers does."""
    import os

    cfg = write_config(tmp_path)
    write_scans(tmp_path / "scans", 1, seed=5)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=None, silence_logs=50) as cluster, \
            distributed.Client(cluster) as client:
        before = set(client.run(_torch_threads).values())
        result = run_batch([tmp_path / "scans"], cfg, tmp_path / "dask", cluster=client,
                           progress=False)
        after = set(client.run(_torch_threads).values())
    assert result.exit_code == 0
    assert after == {os.cpu_count() or 1}
    if (os.cpu_count() or 1) > 1:
        assert before == {1}  # Dask's own setting, which the batch replaced

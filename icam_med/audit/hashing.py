"""Hashes used by audit records and the ledger.

* :func:`canonical_json` gives the one byte form a JSON value is hashed in (sorted keys,
  no whitespace, UTF-8, no NaN), so a hash does not depend on how a file was indented.
* :func:`voxel_sha256` hashes what a scan *is* (dtype, shape and decoded voxels), not how
  it was stored: the same image in two DICOM transfer syntaxes, or re-saved NIfTI, hashes
  the same, and a changed voxel always changes the hash.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ZERO_HASH", "canonical_json", "sha256_bytes", "sha256_file", "sha256_json",
           "voxel_sha256"]

#: The "previous entry" hash of the first ledger entry.
ZERO_HASH = "0" * 64


def canonical_json(value: Any) -> bytes:
    """The canonical UTF-8 bytes of a JSON value (sorted keys, compact, finite numbers only).

    Raises:
        ValueError: the value holds NaN or infinity, which JSON cannot carry faithfully.
    """
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def sha256_bytes(data: bytes) -> str:
    """SHA-256 hex digest of some bytes."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(value: Any) -> str:
    """SHA-256 hex digest of a JSON value's canonical form."""
    return sha256_bytes(canonical_json(value))


def voxel_sha256(data: Any) -> str:
    """SHA-256 over a volume's dtype, shape and voxel values (C order, little-endian).

    Args:
        data: a numpy array, a torch tensor (MONAI ``MetaTensor`` included) or anything
            ``numpy.asarray`` accepts.

    The digest covers the text ``"<dtype>|<shape>|"`` (e.g. ``"<i2|(1, 64, 64, 20)|"``)
    followed by the raw little-endian bytes of the array in C order.
    """
    if hasattr(data, "detach"):  # torch tensors, MetaTensor
        data = data.detach().cpu()
        data = data.as_tensor() if hasattr(data, "as_tensor") else data
        data = data.numpy()
    arr = np.asarray(data)
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and not np.little_endian):
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    arr = np.ascontiguousarray(arr)
    h = hashlib.sha256()
    h.update(f"{arr.dtype.str}|{tuple(int(s) for s in arr.shape)}|".encode("ascii"))
    h.update(memoryview(arr).cast("B") if arr.size else b"")
    return h.hexdigest()

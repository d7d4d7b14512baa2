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

__all__ = ["EXACT_IN_FLOAT32", "ZERO_HASH", "canonical_json", "sha256_bytes", "sha256_file",
           "sha256_json", "voxel_sha256"]

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


#: Voxel types every value of which float32 holds exactly: a volume of one of these is
#: hashed as its float32 values (see :func:`voxel_sha256`).
EXACT_IN_FLOAT32 = frozenset(np.dtype(t) for t in (np.bool_, np.int8, np.uint8, np.int16,
                                                   np.uint16, np.float16))

_HASH_BLOCK = 1 << 20  # voxels converted and hashed at a time (4 MB as float32)


def _c_order_blocks(arr: np.ndarray, max_items: int = _HASH_BLOCK) -> Any:
    """Consecutive pieces of ``arr`` whose C-order bytes, concatenated, are the whole
    array's; none larger than ``max_items`` unless one innermost row is."""
    if arr.ndim <= 1 or arr.size <= max_items:
        yield arr
        return
    per = arr[0].size
    if per > max_items:
        for sub in arr:
            yield from _c_order_blocks(sub, max_items)
        return
    step = max(1, max_items // max(1, per))
    for i in range(0, arr.shape[0], step):
        yield arr[i: i + step]


def voxel_sha256(data: Any) -> str:
    """SHA-256 over a volume's dtype, shape and voxel values (C order, little-endian).

    Args:
        data: a numpy array, a torch tensor (MONAI ``MetaTensor`` included) or anything
            ``numpy.asarray`` accepts.

    The digest covers the text ``"<dtype>|<shape>|"`` (e.g. ``"<f4|(1, 64, 64, 20)|"``)
    followed by the raw little-endian bytes of the array in C order. A volume whose type
    float32 represents exactly (:data:`EXACT_IN_FLOAT32`: bool, 8- and 16-bit integers,
    float16) is hashed as its float32 values: ``voxel_sha256(a) ==
    voxel_sha256(a.astype(np.float32))``. A scan therefore hashes the same whether it is
    held in its stored type (how :func:`icam_med.io.load_volume` returns 16-bit scans) or
    as float32 (how every earlier version loaded it), so old records and resumed audits
    still match. Any other type is hashed as it is. The bytes are converted and hashed a
    block at a time: no full-size copy is made, whatever the array's memory layout.
    """
    if hasattr(data, "detach"):  # torch tensors, MetaTensor
        data = data.detach().cpu()
        data = data.as_tensor() if hasattr(data, "as_tensor") else data
        data = data.numpy()
    arr = np.asarray(data)
    if arr.ndim == 0:
        arr = arr.reshape(1)  # as numpy.ascontiguousarray, which earlier versions hashed
    exact = arr.dtype.newbyteorder("=") in EXACT_IN_FLOAT32
    target = np.dtype(np.float32) if exact else arr.dtype
    target = target.newbyteorder("<") if target.byteorder in ("=", ">") else target
    h = hashlib.sha256()
    h.update(f"{target.str}|{tuple(int(s) for s in arr.shape)}|".encode("ascii"))
    for block in _c_order_blocks(arr):
        piece = np.ascontiguousarray(block, dtype=target)
        h.update(memoryview(piece).cast("B") if piece.size else b"")
        del piece  # before the next block is made
    return h.hexdigest()

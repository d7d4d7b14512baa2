"""Output encodings measured: NIfTI gzip level and DICOM Parametric Map pixel encodings.

Prints, for a smooth class-activation map of a realistic size (default 256x256x150, a
trilinear upsampling of a ReLU'd 12x12x8 layer map, as the engine produces):

* the gzip level of ``cam.nii.gz`` vs seconds to compress vs bytes (levels 0-9), and
* the Parametric Map pixel bytes: float32, uint16 + RWVM, uint16 JPEG-LS lossless.

Usage::

    python scripts/bench_outputs.py [--shape 256 256 150] [--repeat 3]
"""

from __future__ import annotations

import argparse
import gzip
import time

import numpy as np
import torch


def smooth_map(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    layer = torch.relu(torch.randn(1, 1, 12, 12, 8, generator=g))
    up = torch.nn.functional.interpolate(layer, size=shape, mode="trilinear",
                                         align_corners=False)[0, 0]
    return (up / up.max()).numpy().astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[256, 256, 150])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    import nibabel as nib

    data = smooth_map(tuple(args.shape))
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_data_dtype(np.float32)
    raw = img.to_bytes()
    print(f"map {tuple(args.shape)} float32: NIfTI {len(raw) / 1e6:.1f} MB uncompressed")
    print(f"gzip level | seconds (best of {args.repeat}) | MB     | ratio")
    for level in range(0, 10):
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            out = gzip.compress(raw, compresslevel=level, mtime=0)
            best = min(best, time.perf_counter() - t0)
        print(f"{level:10d} | {best:19.3f} | {len(out) / 1e6:6.2f} | {len(out) / len(raw):.3f}")

    from pydicom.pixels.encoders import JPEGLSLosslessEncoder

    from icam_med.io.writers import quantise_uint16

    frames = np.ascontiguousarray(np.transpose(data, (2, 1, 0)))
    t0 = time.perf_counter()
    stored, slope, _ = quantise_uint16(frames)
    tq = time.perf_counter() - t0
    t0 = time.perf_counter()
    packed = sum(len(JPEGLSLosslessEncoder.encode(
        f, rows=f.shape[0], columns=f.shape[1], samples_per_pixel=1, bits_allocated=16,
        bits_stored=16, pixel_representation=0, photometric_interpretation="MONOCHROME2",
        number_of_frames=1)) for f in stored)
    tj = time.perf_counter() - t0
    err = float(np.abs(stored * slope - frames).max())
    print("Parametric Map pixel data:")
    print(f"  float32            {frames.nbytes / 1e6:8.1f} MB")
    print(f"  uint16 + RWVM      {stored.nbytes / 1e6:8.1f} MB  (quantise {tq:.2f} s, "
          f"max error {err:.2e}, stated 1/65535 = {1 / 65535:.2e})")
    print(f"  uint16 JPEG-LS     {packed / 1e6:8.1f} MB  (encode {tj:.2f} s)")


if __name__ == "__main__":
    main()

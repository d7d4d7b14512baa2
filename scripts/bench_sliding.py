"""Benchmark: sliding-window explanation against sliding-window inference alone (issue 13
item 5), on a synthetic CT volume with a random-weight 3-D MONAI UNet.

Each measurement runs in a fresh process (so its peak RSS is its own): the same synthetic
volume (HU-like noise with a bright spherical lesion, float32, already on the model's grid)
and the same UNet, then either

* ``inference``: MONAI ``sliding_window_inference`` alone (gradient-free), or
* ``explain-mask``: :func:`icam_med.cam.sliding.explain_sliding` of the lesion label over
  the lesion mask (only the windows that intersect it are explained), or
* ``explain-predicted``: the same over the region the model predicts as the label (one
  gradient-free inference for the prediction, then the windows meeting that region).

Printed per mode: wall time and CPU time (user + system, all threads) of the call, peak RSS
of the process, the RSS before the call (imports + volume [+ mask] + model) and the 1-minute
load average when it ended; then the ratios to inference alone. On a shared machine the
wall time follows the load; the CPU time much less so. Targets of the issue:
explanation memory <= 1.5x, time <= 3x.

Usage::

    python scripts/bench_sliding.py                       # 512 x 512 x 300, roi 128^3
    python scripts/bench_sliding.py --size 256 256 150 --modes inference explain-mask
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time

MODES = ("inference", "explain-mask", "explain-predicted")


def _volume(size: tuple[int, int, int], lesion_radius: int,
            with_mask: bool) -> tuple[object, object | None]:
    """The synthetic CT and (when asked) its lesion mask. The lesion is drawn in its bounding
    box only, so building the volume leaves no volume-sized temporaries in the peak RSS."""
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn((1, 1, *size), generator=g).mul_(0.05)  # soft tissue, already scaled
    centre = [int(s * f) for s, f in zip(size, (0.6, 0.45, 0.5), strict=True)]
    box = tuple(slice(max(0, c - lesion_radius), min(s, c + lesion_radius + 1))
                for c, s in zip(centre, size, strict=True))
    grids = torch.meshgrid(*[torch.arange(b.start, b.stop, dtype=torch.float32) for b in box],
                           indexing="ij")
    dist2 = sum((gr - c) ** 2 for gr, c in zip(grids, centre, strict=True))
    ball = (dist2 <= lesion_radius ** 2).float()
    x[(0, 0, *box)] += ball * 0.8
    mask = None
    if with_mask:
        mask = torch.zeros(size)
        mask[box] = ball
    return x, mask


def _unet(seed: int = 0) -> object:
    import torch
    from monai.networks.nets import UNet

    torch.manual_seed(seed)
    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32, 64),
                strides=(2, 2, 2), num_res_units=1).eval()


def _child(args: argparse.Namespace) -> dict[str, object]:
    import torch

    from icam_med.cam import make_cam
    from icam_med.cam.sliding import SlidingWindow, explain_sliding, predict_sliding

    torch.set_num_threads(args.threads)
    x, mask = _volume(tuple(args.size), args.lesion_radius, args.mode == "explain-mask")
    model = _unet()
    window = SlidingWindow(tuple(args.roi), sw_batch_size=args.sw_batch_size,
                           overlap=args.overlap, mode=args.blend)
    cam = make_cam(args.method, model, target_layers=args.target_layers)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    before, cpu0 = usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime
    t0 = time.perf_counter()
    info: dict[str, object] = {}
    if args.mode == "inference":
        out = predict_sliding(model, x, window)
        info["output_shape"] = list(out.shape)
    else:
        res = explain_sliding(cam, x, window, class_index=1,
                              region=mask if args.mode == "explain-mask" else None)
        info.update(windows_total=res.windows_total, windows_explained=res.windows_explained,
                    region_voxels=int((res.region > 0).sum()))
    seconds = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak, cpu = usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime - cpu0
    load = os.getloadavg()[0]
    return {"mode": args.mode, "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
            "peak_rss_mb": round(peak, 1), "rss_before_mb": round(before, 1),
            "load_avg_1min_at_end": round(load, 2), **info}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, nargs=3, default=[512, 512, 300])
    parser.add_argument("--roi", type=int, nargs=3, default=[128, 128, 128])
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--blend", choices=["constant", "gaussian"], default="gaussian")
    parser.add_argument("--sw-batch-size", type=int, default=1)
    parser.add_argument("--method", default="gradcam")
    parser.add_argument("--target-layers", default="last")
    parser.add_argument("--lesion-radius", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["inference", "explain-mask"])
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # the child's
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.mode:
        logging.basicConfig(level=logging.WARNING)
        sys.stdout.write(json.dumps(_child(args)) + "\n")
        return 0
    rows = []
    base = [a for a in (argv if argv is not None else sys.argv[1:])]
    for mode in args.modes:
        cmd = [sys.executable, __file__, *base, "--mode", mode]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.stderr.write(done.stderr)
            return done.returncode
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        sys.stdout.write(json.dumps(row) + "\n")
        sys.stdout.flush()
    ref = next((r for r in rows if r["mode"] == "inference"), None)
    sys.stdout.write(f"\nvolume {args.size}, roi {args.roi}, overlap {args.overlap}, "
                     f"{args.blend} blending, sw_batch_size {args.sw_batch_size}, method "
                     f"{args.method} ({args.target_layers}), UNet(8,16,32,64) random weights, "
                     f"{args.threads} threads\n")
    sys.stdout.write(f"{'mode':<18} {'time s':>8} {'CPU s':>8} {'peak RSS MB':>12} "
                     f"{'time x':>7} {'CPU x':>6} {'memory x':>9} {'load':>5}  windows\n")
    for r in rows:
        tx = r["seconds"] / ref["seconds"] if ref else float("nan")
        cx = r["cpu_seconds"] / ref["cpu_seconds"] if ref else float("nan")
        mx = r["peak_rss_mb"] / ref["peak_rss_mb"] if ref else float("nan")
        win = (f"{r['windows_explained']}/{r['windows_total']}" if "windows_total" in r
               else "all")
        sys.stdout.write(f"{r['mode']:<18} {r['seconds']:>8.1f} {r['cpu_seconds']:>8.1f} "
                         f"{r['peak_rss_mb']:>12.0f} {tx:>7.2f} {cx:>6.2f} {mx:>9.2f} "
                         f"{r['load_avg_1min_at_end']:>5.1f}  {win}\n")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

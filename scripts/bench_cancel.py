"""Measure how soon a cancel request stops the napari widget's run (no display needed).

Runs the widget's worker job (napari_plugin._widget._explain_job, the code the dock's
worker thread runs) on the demo model and the sample lesion brain in a thread, asks it to
cancel after a delay, and prints how long the job took to stop after the request, with
the step it was in. A run without cancel is timed first, for reference:

    .venv/bin/python scripts/bench_cancel.py [--layers all] [--at 0.1 0.5 0.9]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _drive(job) -> object:
    """Run a generator job to its end; return its return value."""
    try:
        while True:
            next(job)
    except StopIteration as stop:
        return stop.value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    parser.add_argument("--at", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9],
                        help="when to cancel, as fractions of the run time without cancel")
    parser.add_argument("--layers", default="all",
                        help="target layers (a preset of icam_med.cam.LAYER_PRESETS)")
    parser.add_argument("--no-layer-maps", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("ICAM_MED_SAMPLE_DIR", str(REPO / "sample_data" / "scans"))

    from icam_med.io import load_volume
    from napari_plugin._sample_data import sample_scan_path
    from napari_plugin._widget import RunMonitor, _explain_job

    scan = sample_scan_path("mni152_t1_2mm_lesion.nii.gz")
    image, info = load_volume(scan)
    cache: dict = {}
    common = {"method": "integrative", "options": {"target_layers": args.layers}, "target": None,
              "contrast": None, "layer_maps": not args.no_layer_maps}

    def run(delay: float | None) -> tuple[float, float | None, str, bool]:
        monitor = RunMonitor()
        out: dict = {}

        def work() -> None:
            out["result"] = _drive(_explain_job(args.config, cache, image, info,
                                                monitor=monitor, **common))
            out["end"] = time.perf_counter()

        start = time.perf_counter()
        thread = threading.Thread(target=work)
        thread.start()
        asked = None
        step = ""
        if delay is not None:
            time.sleep(delay)
            step = monitor.text
            asked = time.perf_counter()
            monitor.cancel_event.set()
        thread.join()
        result = out["result"]
        stop = out["end"] - asked if asked is not None else None
        return out["end"] - start, stop, step, bool(getattr(result, "cancelled", False))

    _drive(_explain_job(args.config, cache, image, info, **common))  # warm: model loaded
    total, _, _, _ = run(None)
    print(f"machine: {os.cpu_count()} CPUs; {args.config.name}, sample brain, target layers "
          f"{args.layers!r}, layer maps {'off' if args.no_layer_maps else 'on'}")
    print(f"full run without cancel: {total:.2f} s")
    delays = []
    for d in (f * total for f in args.at):
        _, stop, step, cancelled = run(d)
        if stop is None:
            continue
        print(f"cancel at {d:.1f} s ({step!r}): stopped {stop * 1000:.0f} ms later"
              f"{'' if cancelled else ' (the run had finished)'}")
        if cancelled:
            delays.append(stop)
    if delays:
        print(f"cancel delay: median {statistics.median(delays) * 1000:.0f} ms, "
              f"max {max(delays) * 1000:.0f} ms over {len(delays)} cancels")
    return 0


if __name__ == "__main__":
    sys.exit(main())

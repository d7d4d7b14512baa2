"""Benchmark of the CAM engine against a plain forward+backward and MONAI's Grad-CAM.

Run as ``icam-med bench``. In one process it times, for a 3D MONAI ``DenseNet121`` at
96^3 and a 2D ``DenseNet121`` at 224^2:

* ``fwd+bwd``: a plain training-style forward and backward (parameter gradients);
* ``floor``: forward plus ``autograd.grad`` to the shallowest hooked activation (no
  parameter gradients), the cost floor of any gradient CAM;
* ``monai-gradcam``: MONAI's ``GradCAM.compute_map`` on the last stage;
* every icam-med method with ``target_layers="stages"`` and ``"all"``.

Times are medians over ``repeats`` interleaved rounds after a warm-up (each round runs\nevery case once), so drift on a shared machine hits every case alike; ratios are to\n``fwd+bwd``.
Peak memory is measured per case in a fresh subprocess, on the second call (the first one
runs the one-off layer probe): on CPU the peak resident set above the loaded model and
input (kernel VmHWM, reset before the call, with glibc returning large blocks at once); on
CUDA ``torch.cuda.max_memory_allocated``. Cases do not pollute each other.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from icam_med.cam import METHODS, make_cam

log = logging.getLogger(__name__)

CASES = ["fwd+bwd", "floor", "monai-gradcam"] + [
    f"{m}/{p}" for m in METHODS for p in ("stages", "all")
]
MONAI_LAST_STAGE = "class_layers.relu"


@dataclass
class BenchRow:
    network: str
    case: str
    median_s: float
    ratio: float
    peak_mb: float | None
    mem_ratio: float | None


def build(network: str, device: torch.device, batch: int) -> tuple[nn.Module, torch.Tensor]:
    """The benchmark model and a seeded input batch."""
    from monai.networks.nets import DenseNet121

    torch.manual_seed(0)
    if network == "densenet121-3d":
        model = DenseNet121(spatial_dims=3, in_channels=1, out_channels=2)
        x = torch.randn(batch, 1, 96, 96, 96)
    elif network == "densenet121-2d":
        model = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2)
        x = torch.randn(batch, 1, 224, 224)
    else:
        raise ValueError(f"unknown benchmark network '{network}'; use densenet121-3d or densenet121-2d.")
    return model.eval().to(device), x.to(device)


def make_case(case: str, model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """A zero-argument callable running one benchmark case once."""
    if case == "fwd+bwd":
        def run():
            model.zero_grad(set_to_none=True)
            out = model(x)
            out[:, 0].sum().backward()
        run.reset = lambda: model.zero_grad(set_to_none=True)  # type: ignore[attr-defined]
        return run
    if case == "floor":
        cam = make_cam("gradcam", model, target_layers="all")
        first = cam.layer_names(tuple(x.shape[2:]))[0]
        module = dict(model.named_modules())[first]

        def run():
            store = {}
            h = module.register_forward_hook(lambda _m, _i, o: store.__setitem__("a", o))
            try:
                out = model(x)
            finally:
                h.remove()
            torch.autograd.grad(out[:, 0].sum(), store["a"])
        return run
    if case == "monai-gradcam":
        from monai.visualize import GradCAM as MonaiGradCAM

        # MONAI flips in-place flags and leaves hooks behind: give it its own copy.
        monai_model = copy.deepcopy(model)
        monai_cam = MonaiGradCAM(nn_module=monai_model, target_layers=MONAI_LAST_STAGE)

        def run():
            monai_cam.compute_map(x, class_idx=0)
        run.reset = lambda: monai_model.zero_grad(set_to_none=True)  # type: ignore[attr-defined]
        return run
    method, _, preset = case.partition("/")
    cam = make_cam(method, model, target_layers=preset)

    def run():
        cam(x, targets=0)
    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_mb(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS, VmHWM), in MB."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")


def measure_memory(network: str, case: str, device: str, batch: int) -> float:
    """Peak memory (MB) of one case above the loaded model and input. Call in a fresh process."""
    dev = torch.device(device)
    model, x = build(network, dev, batch)
    fn = make_case(case, model, x)
    if dev.type == "cuda":
        fn()  # warm-up, as on the CPU
        getattr(fn, "reset", lambda: None)()
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        torch.cuda.synchronize(dev)
        return (torch.cuda.max_memory_allocated(dev) - base) / 2**20
    import gc

    fn()  # first call: one-off layer probe and allocator warm-up, not measured
    # Parameter gradients left by the warm-up would be counted in the base and hide part
    # of a training-style backward's own peak: free them first.
    getattr(fn, "reset", lambda: None)()
    gc.collect()
    _reset_peak_rss()
    base = _status_mb("VmRSS")
    fn()
    return _status_mb("VmHWM") - base


def _memory_in_subprocess(network: str, case: str, device: str, batch: int) -> float | None:
    cmd = [sys.executable, "-m", "icam_med.evaluation.bench", "--memory", network, case, device, str(batch)]
    # A fixed mmap threshold makes glibc return every large block on free, so the resident
    # set follows the live tensors and its peak is the peak of the case itself.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        log.warning("memory measurement of %s/%s failed: %s", network, case, proc.stderr[-500:])
        return None
    return float(proc.stdout.strip().splitlines()[-1])


def run_benchmark(networks: list[str], device: str = "cpu", repeats: int = 5,
                  batch: int = 1, memory: bool = True, cases: list[str] | None = None,
                  progress: Callable[[str], None] | None = None) -> list[BenchRow]:
    """Time (and optionally measure memory of) every case on every network.

    Timings are interleaved: each round runs every case once, in turn, so a slow spell of
    a shared machine hits all cases alike instead of the few that ran during it.
    """
    dev = torch.device(device)
    cases = cases or CASES
    rows: list[BenchRow] = []
    for network in networks:
        model, x = build(network, dev, batch)
        fns = {case: make_case(case, model, x) for case in cases}
        for case, fn in fns.items():  # warm-up (and the one-off layer probe of presets)
            if progress:
                progress(f"{network}: warm-up {case}")
            fn()
        _sync(dev)
        times: dict[str, list[float]] = {case: [] for case in cases}
        for r in range(repeats):
            if progress:
                progress(f"{network}: round {r + 1}/{repeats}")
            for case, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                _sync(dev)
                times[case].append(time.perf_counter() - t0)
        mem = {}
        if memory:
            for case in cases:
                if progress:
                    progress(f"{network}: memory {case}")
                mem[case] = _memory_in_subprocess(network, case, device, batch)
        base_t = statistics.median(times["fwd+bwd"]) if "fwd+bwd" in times else None
        base_m = mem.get("fwd+bwd")
        for case in cases:
            t = statistics.median(times[case])
            m = mem.get(case)
            rows.append(BenchRow(
                network=network, case=case, median_s=t,
                ratio=t / base_t if base_t else float("nan"),
                peak_mb=m,
                mem_ratio=(m / base_m) if (m is not None and base_m) else None,
            ))
    return rows


def machine_description(device: str) -> str:
    desc = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU threads"
    if device.startswith("cuda") and torch.cuda.is_available():
        desc = torch.cuda.get_device_name(torch.device(device))
    return f"{desc}; torch {torch.__version__}; {torch.get_num_threads()} torch threads"


def format_table(rows: list[BenchRow]) -> str:
    lines = ["| network | case | median (s) | x fwd+bwd | peak mem (MB) | mem x fwd+bwd |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        mem = f"{r.peak_mb:.0f}" if r.peak_mb is not None else "-"
        mr = f"{r.mem_ratio:.2f}" if r.mem_ratio is not None else "-"
        lines.append(f"| {r.network} | {r.case} | {r.median_s:.3f} | {r.ratio:.2f} | {mem} | {mr} |")
    return "\n".join(lines)


def rows_to_json(rows: list[BenchRow]) -> str:
    return json.dumps([asdict(r) for r in rows], indent=2)


if __name__ == "__main__":  # worker entry for one memory measurement
    if len(sys.argv) == 6 and sys.argv[1] == "--memory":
        torch.set_num_threads(max(1, torch.get_num_threads()))
        value = measure_memory(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
        sys.stdout.write(f"{value:.3f}\n")
    else:
        sys.stderr.write("usage: python -m icam_med.evaluation.bench --memory NETWORK CASE DEVICE BATCH\n")
        sys.exit(2)

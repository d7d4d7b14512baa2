"""Benchmark of the CAM engine against a plain forward+backward, MONAI's Grad-CAM and
TorchCAM's fused LayerCAM.

Run as ``icam-med bench``. In one process per network it times, on the networks of
:data:`NETWORKS` (MONAI ``DenseNet121`` 3D at 96^3 and 2D at 224^2, ``resnet18`` and
``SEResNet50`` 3D at 96^3, a 3D ``UNet`` at 96^3 explained for a segmentation target):

* ``fwd+bwd``: a plain training-style forward and backward of the explained score
  (parameter gradients);
* ``floor``: forward plus ``autograd.grad`` to the shallowest ``stages`` layer (no
  parameter gradients), the cost floor of any gradient CAM;
* ``monai-gradcam``: MONAI's ``GradCAM.compute_map`` on the last stage (classifiers);
* ``torchcam-layercam/stages``: TorchCAM's ``LayerCAM`` on the same ``stages`` layers,
  its maps fused by ``fuse_cams`` (an external peer);
* every icam-med method with ``target_layers="stages"`` and ``"all"``;
* option variants that cost extra passes (:data:`VARIANTS`): ``integrative+counterfactual``
  (one more batched gradient-free forward of ``L + 1`` samples), ``integrative+complete``
  (the backward runs to the input), ``integrative+softmax`` (one backward per logit), and
  the multiplicative fusion of LayerCAM maps (``layercam+multiplicative``);
* the rest of the toolbox (:data:`TOOLBOX`, issue 16): vanilla gradient, guided backprop,
  Guided Grad-CAM on the last block, SmoothGrad of the gradient with 8 copies in one pass
  and LRP (when registered). Cases whose cost grows with a count, Score-CAM (one forward per
  channel of the layer: 1024 on DenseNet121's last block), SmoothGrad with one copy per pass
  (the ``n`` separate calls it replaces) and SmoothGrad around Integrative CAM, are in
  :data:`CASES` but run only when named (``--case``): :data:`DEFAULT_CASES` leaves them out.

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

#: option variants timed besides the plain methods: case prefix -> (method, options)
VARIANTS: dict[str, tuple[str, dict[str, object]]] = {
    "integrative+counterfactual": ("integrative", {"layer_weighting": "counterfactual"}),
    "integrative+complete": ("integrative", {"bias_mode": "complete"}),
    "integrative+softmax": ("integrative", {"alpha_fn": "softmax"}),
    "layercam+multiplicative": ("layercam", {"fusion": "multiplicative"}),
}
#: the engine's gradient CAMs, timed on the ``stages`` and ``all`` presets
_LAYER_METHODS = ("integrative", "gradcam", "gradcam++", "hirescam", "layercam")
#: the other methods (issue 16), one case each: case -> (method, options)
TOOLBOX: dict[str, tuple[str, dict[str, object]]] = {
    "gradient": ("gradient", {}),
    "guided-backprop": ("guided-backprop", {}),
    "guided-gradcam/last": ("guided-gradcam", {"target_layers": "last"}),
    "smoothgrad-gradient/n8": ("smoothgrad", {"base": "gradient", "n_samples": 8, "chunk": 8}),
    "smoothgrad-gradient/n8-chunk1": ("smoothgrad", {"base": "gradient", "n_samples": 8,
                                                     "chunk": 1}),
    "smoothgrad-integrative/n8": ("smoothgrad", {"base": "integrative", "n_samples": 8,
                                                 "chunk": 8, "target_layers": "stages"}),
    "scorecam/last": ("scorecam", {"target_layers": "last", "chunk": 32}),
    "lrp": ("lrp", {}),
}
# toolbox cases timed only when named: their cost is a count times a pass
_OPT_IN = ("smoothgrad-gradient/n8-chunk1", "smoothgrad-integrative/n8", "scorecam/last")
CASES = ["fwd+bwd", "floor", "monai-gradcam", "torchcam-layercam/stages"] + [
    f"{m}/{p}" for m in METHODS if m in _LAYER_METHODS for p in ("stages", "all")
] + [f"{v}/stages" for v in VARIANTS] + [c for c, (m, _) in TOOLBOX.items() if m in METHODS]
#: what ``icam-med bench`` runs when no ``--case`` is named
DEFAULT_CASES = [c for c in CASES if c not in _OPT_IN]
#: network name -> spatial dims, default input size, segmentation output
NETWORKS: dict[str, tuple[int, int, bool]] = {
    "densenet121-3d": (3, 96, False),
    "densenet121-2d": (2, 224, False),
    "resnet18-3d": (3, 96, False),
    "seresnet50-3d": (3, 96, False),
    "unet-3d": (3, 96, True),
}
# cases that need a classifier output (MONAI's GradCAM scores logits[:, class]; the
# softmax alpha needs class probabilities)
_CLASSIFIER_ONLY = ("monai-gradcam", "integrative+softmax/stages")
# guided backprop needs nn.ReLU modules: the benchmark UNet uses PReLU
_NEEDS_RELU = ("guided-backprop", "guided-gradcam/last")
_NO_RELU = ("unet-3d",)
# LRP has rules for conv/BatchNorm/ReLU/pooling nets only: not the SE gates' sigmoid, not
# the UNet's InstanceNorm/PReLU
_LRP_NETWORKS = ("densenet121-3d", "densenet121-2d", "resnet18-3d")


@dataclass
class BenchRow:
    network: str
    case: str
    median_s: float
    best_s: float
    ratio: float
    peak_mb: float | None
    mem_ratio: float | None


def build(network: str, device: torch.device, batch: int,
          size: int | None = None) -> tuple[nn.Module, torch.Tensor]:
    """The benchmark model and a seeded input batch (``size``: the input's edge length,
    default per network)."""
    from monai.networks import nets

    if network not in NETWORKS:
        raise ValueError(f"unknown benchmark network '{network}'; use one of {list(NETWORKS)}.")
    dims, default, _seg = NETWORKS[network]
    edge = size or default
    torch.manual_seed(0)
    if network.startswith("densenet121"):
        model: nn.Module = nets.DenseNet121(spatial_dims=dims, in_channels=1, out_channels=2)
    elif network == "resnet18-3d":
        model = nets.resnet18(spatial_dims=3, n_input_channels=1, num_classes=2)
    elif network == "seresnet50-3d":
        model = nets.SEResNet50(spatial_dims=3, in_channels=1, num_classes=2)
    else:
        model = nets.UNet(spatial_dims=3, in_channels=1, out_channels=2,
                          channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2)
    x = torch.randn(batch, 1, *(edge,) * dims)
    return model.eval().to(device), x.to(device)


def bench_target(network: str, x: torch.Tensor) -> object:
    """What a case explains: class 0 of a classifier, or channel 1 of a segmentation output
    inside a central box (a fixed mask, so every case explains the same score)."""
    if not NETWORKS[network][2]:
        return 0
    from icam_med.cam import SegmentationTarget

    mask = torch.zeros(x.shape[0], *x.shape[2:], device=x.device)
    box = tuple(slice(s // 4, s - s // 4) for s in x.shape[2:])
    mask[(slice(None), *box)] = 1
    return SegmentationTarget(1, mask)


def _score(output: torch.Tensor, target: object) -> torch.Tensor:
    return output[:, 0].sum() if isinstance(target, int) else target(output).sum()  # type: ignore[operator]


def applicable(network: str, case: str) -> bool:
    """Whether a case runs on a network (classifier-only cases skip segmentation nets,
    guided backprop networks without ReLU, LRP networks it has no rules for)."""
    if network in _NO_RELU and case in _NEEDS_RELU:
        return False
    if case == "lrp" and network not in _LRP_NETWORKS:
        return False
    return not (NETWORKS[network][2] and case in _CLASSIFIER_ONLY)


def make_case(case: str, model: nn.Module, x: torch.Tensor,
              target: object = 0) -> Callable[[], object]:
    """A zero-argument callable running one benchmark case once."""
    shape = tuple(x.shape[2:])
    if case == "fwd+bwd":
        def run():
            model.zero_grad(set_to_none=True)
            _score(model(x), target).backward()
        run.reset = lambda: model.zero_grad(set_to_none=True)  # type: ignore[attr-defined]
        return run
    if case == "floor":
        first = make_cam("gradcam", model, target_layers="stages").layer_names(shape)[0]
        module = dict(model.named_modules())[first]

        def run():
            store = {}
            h = module.register_forward_hook(lambda _m, _i, o: store.__setitem__("a", o))
            try:
                out = model(x)
            finally:
                h.remove()
            torch.autograd.grad(_score(out, target), store["a"])
        return run
    if case == "monai-gradcam":
        from monai.visualize import GradCAM as MonaiGradCAM

        last = make_cam("gradcam", model, target_layers="last").layer_names(shape)[0]
        # MONAI flips in-place flags and leaves hooks behind: give it its own copy.
        monai_model = copy.deepcopy(model)
        monai_cam = MonaiGradCAM(nn_module=monai_model, target_layers=last)

        def run():
            monai_cam.compute_map(x, class_idx=0)
        run.reset = lambda: monai_model.zero_grad(set_to_none=True)  # type: ignore[attr-defined]
        return run
    if case == "torchcam-layercam/stages":
        from torchcam.methods import LayerCAM as TorchCAMLayerCAM

        layers = make_cam("layercam", model, target_layers="stages").layer_names(shape)

        def run():
            # built per call and its hooks removed after it, so it does not tax other cases
            extractor = TorchCAMLayerCAM(model, target_layer=layers, input_shape=tuple(x.shape[1:]))
            try:
                out = model(x)
                if isinstance(target, int):
                    cams = extractor(class_idx=target, scores=out)
                else:  # TorchCAM applies a target to each sample's output (no batch axis)
                    cams = extractor(scores=out, targets=lambda o: target(o[None])[0])
                return extractor.fuse_cams(cams)
            finally:
                extractor.remove_hooks()
        return run
    if case in TOOLBOX:
        method, options = TOOLBOX[case]
        cam = make_cam(method, model, **options)
    else:
        name, _, preset = case.partition("/")
        method, options = VARIANTS.get(name, (name, {}))
        cam = make_cam(method, model, target_layers=preset, **options)

    def run():
        cam(x, targets=target)
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


def measure_memory(network: str, case: str, device: str, batch: int,
                   size: int | None = None) -> float:
    """Peak memory (MB) of one case above the loaded model and input. Call in a fresh process."""
    dev = torch.device(device)
    model, x = build(network, dev, batch, size)
    fn = make_case(case, model, x, bench_target(network, x))
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


def _memory_in_subprocess(network: str, case: str, device: str, batch: int,
                          size: int | None = None) -> float | None:
    cmd = [sys.executable, "-m", "icam_med.evaluation.bench", "--memory", network, case, device,
           str(batch), str(size or 0)]
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
                  progress: Callable[[str], None] | None = None,
                  size: int | None = None) -> list[BenchRow]:
    """Time (and optionally measure memory of) every case on every network.

    Timings are interleaved: each round runs every case once, in turn, so a slow spell of
    a shared machine hits all cases alike instead of the few that ran during it. Cases that
    do not apply to a network (MONAI's Grad-CAM on a segmentation output) are skipped.
    """
    dev = torch.device(device)
    wanted = cases or DEFAULT_CASES
    rows: list[BenchRow] = []
    for network in networks:
        cases = [c for c in wanted if applicable(network, c)]
        model, x = build(network, dev, batch, size)
        target = bench_target(network, x)
        fns = {case: make_case(case, model, x, target) for case in cases}
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
                mem[case] = _memory_in_subprocess(network, case, device, batch, size)
        base_t = statistics.median(times["fwd+bwd"]) if "fwd+bwd" in times else None
        base_m = mem.get("fwd+bwd")
        for case in cases:
            t = statistics.median(times[case])
            m = mem.get(case)
            rows.append(BenchRow(
                network=network, case=case, median_s=t, best_s=min(times[case]),
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
    lines = ["| network | case | median (s) | best (s) | x fwd+bwd | best x fwd+bwd | x torchcam "
             "| peak mem (MB) | mem x fwd+bwd |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    peer = {(r.network): r for r in rows if r.case == "torchcam-layercam/stages"}
    base = {(r.network): r for r in rows if r.case == "fwd+bwd"}
    for r in rows:
        mem = f"{r.peak_mb:.0f}" if r.peak_mb is not None else "-"
        mr = f"{r.mem_ratio:.2f}" if r.mem_ratio is not None else "-"
        tc = peer.get(r.network)
        vs_peer = f"{r.median_s / tc.median_s:.2f}" if tc else "-"
        b = base.get(r.network)
        best = f"{r.best_s / b.best_s:.2f}" if b else "-"
        lines.append(f"| {r.network} | {r.case} | {r.median_s:.3f} | {r.best_s:.3f} | {r.ratio:.2f} "
                     f"| {best} | {vs_peer} | {mem} | {mr} |")
    return "\n".join(lines)


def rows_to_json(rows: list[BenchRow]) -> str:
    return json.dumps([asdict(r) for r in rows], indent=2)


if __name__ == "__main__":  # worker entry for one memory measurement
    if len(sys.argv) == 7 and sys.argv[1] == "--memory":
        torch.set_num_threads(max(1, torch.get_num_threads()))
        value = measure_memory(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]),
                               int(sys.argv[6]) or None)
        sys.stdout.write(f"{value:.3f}\n")
    else:
        sys.stderr.write("usage: python -m icam_med.evaluation.bench --memory NETWORK CASE DEVICE "
                         "BATCH SIZE\n")
        sys.exit(2)

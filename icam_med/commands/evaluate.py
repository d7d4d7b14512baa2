"""``icam-med evaluate``: score CAM methods against ground-truth lesions (see icam_med.evaluation.evaluate)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from icam_med.commands import _args
from icam_med.commands._output import echo

HELP = ("compare Integrative CAM, its ablations and single-layer CAMs on held-out synthetic "
        "lesions: localisation, deletion/insertion, confidence, randomisation, runtime")

log = logging.getLogger(__name__)

OUTPUTS = ("summary.csv", "summary.md", "per_volume.csv", "settings.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"),
                        help="run configuration with the model and its preprocessing "
                             "(default: configs/demo.yaml)")
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder for summary.csv, summary.md, per_volume.csv, settings.json")
    parser.add_argument("--n-volumes", type=_args.positive_int, default=100,
                        help="held-out volumes with a lesion to evaluate (default 100)")
    parser.add_argument("--split", default="test",
                        help="synthetic split to draw from (default 'test', never used in training)")
    parser.add_argument("--seed", type=_args.non_negative_int, default=0,
                        help="synthesizer seed; must match the training seed for the 'test' "
                             "split to be held out (default 0)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated subset of rows (default: all; see docs/evaluation.md)")
    parser.add_argument("--no-control", action="store_true",
                        help="leave out the model-free input-edges control row")
    parser.add_argument("--baseline", choices=("blur", "constant"), default="blur",
                        help="what removed voxels become (default: a blurred copy of the input)")
    parser.add_argument("--blur-sigma-mm", type=_args.positive_float, default=16.0)
    parser.add_argument("--baseline-value", type=float, default=0.0)
    parser.add_argument("--steps", type=_args.positive_int, default=None,
                        help="evenly spaced perturbation steps instead of the default "
                             "start-dense schedule")
    parser.add_argument("--tolerance-mm", type=_args.positive_float, default=4.0,
                        help="pointing-game tolerance (default 4 mm, one model voxel)")
    parser.add_argument("--no-randomisation", action="store_true",
                        help="skip the model-parameter randomisation check")
    parser.add_argument("--n-boot", type=_args.positive_int, default=2000, help="bootstrap resamples")
    parser.add_argument("--device", default="cpu", type=_args.device, help="torch device (default cpu)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from icam_med.config import load_config
    from icam_med.evaluation.evaluate import EvalVolume, default_methods, evaluate
    from icam_med.evaluation.metrics import DEFAULT_FRACTIONS
    from icam_med.evaluation.synthetic import input_space_synthesizer, normalise
    from icam_med.io.atomic import atomic_write_text, check_writable
    from icam_med.models import load_model

    if args.n_volumes < 1:
        raise ValueError(f"--n-volumes must be at least 1, got {args.n_volumes}.")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}.")
    out = Path(args.out)
    targets = [out / name for name in OUTPUTS]
    for path in targets:  # refuse before any work
        check_writable(path, overwrite=args.overwrite)
    cfg = load_config(args.config)
    methods = default_methods(include_control=not args.no_control)
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        known = {m.label: m for m in default_methods()}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise ValueError(f"--methods: unknown row(s) {unknown}; choose from {sorted(known)}.")
        methods = [known[w] for w in wanted]
    fractions = (tuple(np.linspace(0.0, 1.0, args.steps + 1)) if args.steps
                 else DEFAULT_FRACTIONS)

    model, info = load_model(cfg.model, device=args.device)
    synth, intensity = input_space_synthesizer(cfg.preprocessing, seed=args.seed)
    if info.spatial_size and tuple(info.spatial_size) != synth.shape:
        raise ValueError(
            f"{args.config}: the preprocessing yields {synth.shape} but the model expects "
            f"{tuple(info.spatial_size)}."
        )
    target = info.labels.index("present") if "present" in info.labels else 1
    spacing = tuple(float(s) for s in synth.spacing)

    def volumes():
        for i in range(args.n_volumes):
            vol = synth(i, split=args.split, label=1)
            x = torch.from_numpy(normalise(vol.image, intensity))
            yield EvalVolume(x=x, mask=torch.from_numpy(vol.mask), target=target, spacing=spacing,
                             domain=torch.from_numpy(vol.image != 0),
                             name=f"{args.split}-{i:04d}")

    def progress(i: int, name: str) -> None:
        echo(f"[{i + 1}/{args.n_volumes}] {name}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    result = evaluate(model, volumes(), methods, fractions=fractions, baseline=args.baseline,
                      blur_sigma_mm=args.blur_sigma_mm, baseline_value=args.baseline_value,
                      tolerance_mm=args.tolerance_mm, randomisation=not args.no_randomisation,
                      n_boot=args.n_boot, seed=args.seed, progress=progress)
    elapsed = time.perf_counter() - t0
    n_correct = sum(1 for r in result.rows if r["method"] == methods[0].label
                    and r["predicted"] == r["target"])
    result.settings.update({
        "config": str(args.config),
        "model": info.to_dict(),
        "data": {"generator": "icam_med.evaluation.synthetic.LesionSynthesizer on the MNI152 2009 template",
                 "split": args.split, "seed": args.seed, "label": "present",
                 "input_spacing_mm": list(spacing), "input_shape": list(synth.shape),
                 "domain": "non-zero (brain) voxels of each volume"},
        "model_correct_on_evaluated": n_correct,
        "elapsed_seconds": round(elapsed, 1),
        "command": "icam-med evaluate " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else None,
    })
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(targets[0], result.summary_csv(), overwrite=args.overwrite)
    atomic_write_text(targets[1], result.summary_markdown(), overwrite=args.overwrite)
    atomic_write_text(targets[2], result.rows_csv(), overwrite=args.overwrite)
    atomic_write_text(targets[3], json.dumps(result.settings, indent=2, default=str) + "\n",
                      overwrite=args.overwrite)
    echo(result.summary_markdown())
    echo(f"model correct on {n_correct}/{result.settings['n_volumes']} evaluated volumes; "
          f"{elapsed:.0f} s")
    echo(f"wrote {', '.join(str(p) for p in targets)}")
    return 0

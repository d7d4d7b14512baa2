#!/usr/bin/env python
"""Train an evaluation model (LesionNet or a MONAI ResNet) on the harder benchmark.

The benchmark (:class:`icam_med.evaluation.synthetic.EvalSynthesizer`) has dark and
bright lesions, one or two per volume, and bright distractors outside the brain. The
model is described by its config (``configs/eval_lesionnet.yaml``,
``configs/eval_resnet.yaml``): architecture, arguments and preprocessing; training is
deterministic (see :mod:`icam_med.evaluation.training`).

Usage::

    python scripts/train_eval_models.py --config configs/eval_lesionnet.yaml --update-config
    python scripts/train_eval_models.py --config configs/eval_resnet.yaml --update-config
    python scripts/train_eval_models.py --config configs/eval_lesionnet.yaml --steps 2 \\
        --out /tmp/smoke --n-validation 2 --n-test 2          # a smoke run

Outputs (in ``--out``, default ``sample_data/eval``): ``<name>.safetensors`` and
``<name>.training.json`` (settings, timing, held-out accuracy with sensitivity per lesion
polarity), ``<name>`` being the config's ``model.name``. ``--update-config`` pins the new
weights' SHA-256 in the config.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "sample_data" / "eval"

log = logging.getLogger("train_eval_models")


def output_paths(config: Path, out: Path) -> tuple[Path, Path]:
    """The weights file and training report for ``config`` in ``out``."""
    from icam_med.config import load_config

    name = load_config(config).model.name
    return out / f"{name}.safetensors", out / f"{name}.training.json"


def train(config: Path, out: Path = DEFAULT_OUT, *, steps: int = 600, batch_size: int = 16,
          lr: float = 2e-3, seed: int = 0, n_validation: int = 200, n_test: int = 400,
          threads: int = 1, log_every: int = 0, aux_weight: float = 1.0,
          recalibration_batches: int = 16, overwrite: bool = False) -> dict[str, Any]:
    """Train the model of ``config`` and write its weights and training report to ``out``.

    Returns:
        The training report (also written as JSON).
    """
    from icam_med.audit.hashing import sha256_file
    from icam_med.evaluation import training
    from icam_med.evaluation.synthetic import EvalSynthesizer

    out = Path(out)
    weights_path, report_path = output_paths(config, out)
    for p in (weights_path, report_path):
        if p.exists() and not overwrite:
            raise FileExistsError(f"{p} exists; pass --overwrite to replace it.")
    cfg, synth, intensity, model = training.prepare_run(config, seed=seed, threads=threads,
                                                        synthesizer=EvalSynthesizer)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("%s: %d parameters, %d steps of %d volumes", cfg.model.name, n_params, steps,
             batch_size)
    history = training.train_model(model, synth, intensity, steps=steps, batch_size=batch_size,
                                   lr=lr, aux_weight=aux_weight, log_every=log_every)
    training.recalibrate_batchnorm(model, synth, intensity, batches=recalibration_batches,
                                   batch_size=batch_size)
    validation = training.evaluate_split(model, synth, intensity, "validation", n_validation)
    test = training.evaluate_split(model, synth, intensity, "test", n_test)
    log.info("validation %s", validation)
    log.info("test %s", test)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    info = {"architecture": cfg.model.architecture, "args": cfg.model.args, "seed": seed,
            "steps": steps, "trainer": "scripts/train_eval_models.py"}
    training.atomic_write(weights_path, training.weights_bytes(state, info))
    report = {
        "name": cfg.model.name,
        **training.run_settings(cfg.model, cfg.preprocessing, synth, n_params, seed=seed,
                                steps=steps, batch_size=batch_size, lr=lr,
                                aux_weight=aux_weight,
                                recalibration_batches=recalibration_batches, history=history),
        "validation_probes": history["probes"],
        "threads": threads,
        "train_seconds": history["train_seconds"],
        "torch": torch.__version__,
        "synthesizer": {"class": "EvalSynthesizer", "radius_mm": synth.radius_mm,
                        "contrast_sd": synth.contrast, "p_hyper": synth.p_hyper,
                        "p_two": synth.p_two, "distractors": synth.distractors,
                        "distractor_radius_mm": synth.distractor_radius_mm,
                        "distractor_contrast_sd": synth.distractor_contrast,
                        "noise_sd": synth.noise, "bias_field": synth.bias_field,
                        "blur_vox": synth.blur_vox},
        "validation": validation,
        "test": test,
        "weights_file": weights_path.name,
        "weights_sha256": sha256_file(weights_path),
    }
    training.atomic_write(report_path, (json.dumps(report, indent=2) + "\n").encode())
    return report


def main(argv: list[str] | None = None) -> int:
    from icam_med.evaluation.training import add_training_arguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    add_training_arguments(parser, out=DEFAULT_OUT, steps=600, threads=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        report = train(args.config, args.out, steps=args.steps, batch_size=args.batch_size,
                       lr=args.lr, seed=args.seed, n_validation=args.n_validation,
                       n_test=args.n_test, threads=args.threads, log_every=args.log_every,
                       aux_weight=args.aux_weight, overwrite=args.overwrite)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"train_eval_models: error: {exc}", file=sys.stderr)
        return 2
    if args.update_config:
        from icam_med.evaluation.training import update_config_sha

        update_config_sha(args.config, report["weights_sha256"])
    print(json.dumps({"train_seconds": report["train_seconds"],
                      "weights_sha256": report["weights_sha256"],
                      "validation": report["validation"], "test": report["test"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

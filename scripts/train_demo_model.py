#!/usr/bin/env python
"""Train the demo lesion classifier (LesionNet) and write its weights and model card.

Deterministic on a CPU: fixed seeds, ``torch.use_deterministic_algorithms(True)``, a
fixed thread count and a fixed data order (training step ``s`` sees volumes
``s * batch_size ... (s + 1) * batch_size - 1`` of the synthetic ``"train"`` split, with
alternating labels). Every volume is generated on the fly by
:class:`icam_med.evaluation.synthetic.LesionSynthesizer` on the model's input grid (the MNI152 brain
after the spatial steps of the config's preprocessing), then normalised by the config's
intensity steps, exactly as a scan on disk would be.

Usage::

    python scripts/train_demo_model.py                   # writes sample_data/demo_lesion_net.*
    python scripts/train_demo_model.py --steps 2 --out /tmp/smoke   # a smoke run

Outputs (in ``--out``): ``demo_lesion_net.safetensors``, ``demo_lesion_net.training.json``
(the run's settings, timing and held-out metrics, from which ``sample_data/MODEL_CARD.md``
quotes its figures).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "demo.yaml"
DEFAULT_OUT = REPO / "sample_data"
WEIGHTS_NAME = "demo_lesion_net.safetensors"
REPORT_NAME = "demo_lesion_net.training.json"

log = logging.getLogger("train_demo_model")


def weights_bytes(state: dict[str, torch.Tensor], architecture: str, args: dict[str, Any], *,
                  seed: int, steps: int) -> bytes:
    """The safetensors file, byte-for-byte reproducible.

    The metadata is one key holding sorted JSON: safetensors writes a metadata map in an
    arbitrary key order, so several keys would make equal weights hash differently.
    """
    from icam_med.evaluation.training import weights_bytes as _weights_bytes

    return _weights_bytes(state, {"architecture": architecture, "args": args, "seed": seed,
                                  "steps": steps, "trainer": "scripts/train_demo_model.py"})


def make_batch(synth: Any, intensity_steps: list, split: str, indices: range | list[int]
               ) -> tuple[torch.Tensor, torch.Tensor, list[np.ndarray]]:
    """Volumes ``indices`` of ``split`` (label = index parity), normalised, as a batch."""
    from icam_med.evaluation.synthetic import normalise

    images, labels, masks = [], [], []
    for i in indices:
        vol = synth(i, split=split, label=i % 2)
        images.append(normalise(vol.image, intensity_steps))
        labels.append(vol.label)
        masks.append(vol.mask)
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.long), masks


@torch.no_grad()
def evaluate_split(model: nn.Module, synth: Any, intensity_steps: list, split: str, n: int,
                   batch_size: int = 16) -> dict[str, Any]:
    """Accuracy, sensitivity and specificity on the first ``n`` volumes of ``split``."""
    model.eval()
    preds, labels, sizes = [], [], []
    for start in range(0, n, batch_size):
        x, y, masks = make_batch(synth, intensity_steps, split, range(start, min(n, start + batch_size)))
        preds.append(model(x).argmax(1))
        labels.append(y)
        sizes.extend(int(m.sum()) for m in masks)
    p, y = torch.cat(preds), torch.cat(labels)
    pos, neg = y == 1, y == 0
    sizes_arr = np.asarray(sizes)
    missed = sizes_arr[(pos & (p == 0)).numpy()]
    return {
        "split": split,
        "n": int(y.numel()),
        "n_present": int(pos.sum()),
        "accuracy": float((p == y).float().mean()),
        "sensitivity": float((p[pos] == 1).float().mean()) if pos.any() else None,
        "specificity": float((p[neg] == 0).float().mean()) if neg.any() else None,
        "missed_lesion_sizes_voxels": sorted(int(s) for s in missed),
    }


def _accuracy_probe(model: nn.Module, synth: Any, intensity_steps: list, n: int
                    ) -> dict[str, Any]:
    """The validation check made every ``--log-every`` steps: accuracy on ``n`` volumes."""
    probe = evaluate_split(model, synth, intensity_steps, "validation", n)
    log.info("accuracy on %d validation volumes %.3f", n, probe["accuracy"])
    return probe


def train(config: Path = DEFAULT_CONFIG, out: Path = DEFAULT_OUT, *, steps: int = 300,
          batch_size: int = 16, lr: float = 2e-3, seed: int = 0, n_validation: int = 200,
          n_test: int = 400, threads: int = 2, log_every: int = 0, aux_weight: float = 1.0,
          recalibration_batches: int = 16,
          overwrite: bool = False) -> dict[str, Any]:
    """Train LesionNet as configured and write the weights and a training report to ``out``.

    Returns:
        The training report (also written as JSON).
    """
    from icam_med.audit.hashing import sha256_file
    from icam_med.evaluation import training

    out = Path(out)
    weights_path, report_path = out / WEIGHTS_NAME, out / REPORT_NAME
    for p in (weights_path, report_path):
        if p.exists() and not overwrite:
            raise FileExistsError(f"{p} exists; pass --overwrite to replace it.")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}.")

    t0 = time.perf_counter()
    cfg, synth, intensity, model = training.prepare_run(config, seed=seed, threads=threads)
    n_params = sum(p.numel() for p in model.parameters())
    # Deep supervision (training only, see icam_med.evaluation.training): without it the
    # classifier barely leaves chance level within a CPU budget: a small bright blob is a
    # rare signal among the brain's own edges.
    history = training.train_model(model, synth, intensity, steps=steps, batch_size=batch_size,
                                   lr=lr, aux_weight=aux_weight, log_every=log_every,
                                   batch_fn=make_batch, probe_fn=_accuracy_probe)
    train_seconds = time.perf_counter() - t0
    training.recalibrate_batchnorm(model, synth, intensity, batches=recalibration_batches,
                                   batch_size=batch_size, batch_fn=make_batch)
    validation = evaluate_split(model, synth, intensity, "validation", n_validation)
    test = evaluate_split(model, synth, intensity, "test", n_test)
    log.info("validation accuracy %.4f, held-out test accuracy %.4f", validation["accuracy"],
             test["accuracy"])

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    training.atomic_write(weights_path, weights_bytes(state, cfg.model.architecture,
                                                       cfg.model.args, seed=seed, steps=steps))
    report = {
        **training.run_settings(cfg.model, cfg.preprocessing, synth, n_params, seed=seed,
                                steps=steps, batch_size=batch_size, lr=lr,
                                aux_weight=aux_weight,
                                recalibration_batches=recalibration_batches, history=history),
        "threads": threads,
        "train_seconds": round(train_seconds, 1),
        "torch": torch.__version__,
        "synthesizer": {"radius_mm": synth.radius_mm, "contrast_sd": synth.contrast,
                        "noise_sd": synth.noise, "bias_field": synth.bias_field,
                        "blur_vox": synth.blur_vox, "max_shift_mm": synth.max_shift_mm},
        "validation": validation,
        "test": test,
        "weights_file": WEIGHTS_NAME,
        "weights_sha256": sha256_file(weights_path),
    }
    training.atomic_write(report_path, (json.dumps(report, indent=2) + "\n").encode())
    return report


def update_config_sha(config: Path, sha: str) -> None:
    """Replace the ``weights_sha256`` line of ``config`` (a targeted, atomic edit)."""
    from icam_med.evaluation.training import update_config_sha as _update

    _update(config, sha)


def main(argv: list[str] | None = None) -> int:
    from icam_med.evaluation.training import add_training_arguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    add_training_arguments(parser, out=DEFAULT_OUT, steps=300, threads=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        report = train(args.config, args.out, steps=args.steps, batch_size=args.batch_size,
                       lr=args.lr, seed=args.seed, n_validation=args.n_validation,
                       n_test=args.n_test, threads=args.threads,
                       log_every=args.log_every, aux_weight=args.aux_weight,
                       overwrite=args.overwrite)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"train_demo_model: error: {exc}", file=sys.stderr)
        return 2
    if args.update_config:
        update_config_sha(args.config, report["weights_sha256"])
    print(json.dumps({k: report[k] for k in ("train_seconds", "weights_sha256")}
                     | {"test_accuracy": report["test"]["accuracy"],
                        "validation_accuracy": report["validation"]["accuracy"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Train the 2-D demo classifier (LesionNet, 2-D) on synthetic radiographs and write it.

Deterministic on a CPU (fixed seed, one thread, batches drawn from
``numpy.random.default_rng([seed, step])`` by
:func:`icam_med.evaluation.radiographs.train_finding_classifier`); the images are drawn
by :func:`icam_med.evaluation.radiographs.synthetic_radiograph` at the model's input size
and z-scored, as ``configs/demo2d.yaml``'s preprocessing does to a radiograph on disk.

Usage::

    python scripts/train_demo2d_model.py            # writes sample_data/demo2d/demo2d_finding_net.*
    python scripts/train_demo2d_model.py --steps 2 --out /tmp/smoke --no-config-update
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "demo2d.yaml"
DEFAULT_OUT = REPO / "sample_data" / "demo2d"  # its own folder: its own MODEL_CARD.md
WEIGHTS_NAME = "demo2d_finding_net.safetensors"
REPORT_NAME = "demo2d_finding_net.training.json"


def main(argv: list[str] | None = None) -> int:
    from icam_med.audit.hashing import sha256_bytes
    from icam_med.config import load_config
    from icam_med.evaluation.radiographs import train_finding_classifier, training_batch
    from icam_med.evaluation.training import atomic_write, update_config_sha, weights_bytes
    from icam_med.models import build_architecture

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-config-update", action="store_true",
                        help="do not write the new weights' SHA-256 into the config")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    cfg = load_config(args.config)
    size = int(cfg.model.spatial_size[0])
    torch.manual_seed(args.seed)
    model = build_architecture(cfg.model.architecture, cfg.model.args)
    t0 = time.perf_counter()
    losses = train_finding_classifier(model, steps=args.steps, batch_size=args.batch_size,
                                      size=size, seed=args.seed)
    seconds = time.perf_counter() - t0
    images, labels, _ = training_batch(np.random.default_rng([args.seed, 10**6]), 256, size)
    mean = images.mean(axis=(1, 2, 3), keepdims=True)
    std = images.std(axis=(1, 2, 3), keepdims=True) + 1e-8
    with torch.no_grad():
        pred = model(torch.from_numpy((images - mean) / std)).argmax(1).numpy()
    accuracy = float((pred == labels).mean())
    info = {"model": cfg.model.name, "steps": args.steps, "batch_size": args.batch_size,
            "seed": args.seed, "input_size": size}
    data = weights_bytes({k: v.contiguous() for k, v in model.state_dict().items()}, info)
    sha = sha256_bytes(data)
    atomic_write(args.out / WEIGHTS_NAME, data)
    report = {**info, "weights_sha256": sha, "train_seconds": round(seconds, 1),
              "final_loss": round(float(np.mean(losses[-10:])), 4),
              "held_out_accuracy_256": accuracy,
              "machine": "CPU, 1 thread"}
    atomic_write(args.out / REPORT_NAME, (json.dumps(report, indent=2) + "\n").encode())
    if not args.no_config_update:
        update_config_sha(args.config, sha)
    logging.info("trained %d steps in %.1f s: held-out accuracy %.3f, weights %s", args.steps,
                 seconds, accuracy, sha)
    return 0


if __name__ == "__main__":
    sys.exit(main())

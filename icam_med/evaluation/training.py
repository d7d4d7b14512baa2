"""Training of the evaluation models on the harder benchmark (:class:`EvalSynthesizer`).

Used by ``scripts/train_eval_models.py``; ``scripts/train_demo_model.py`` runs the same
training loop, BatchNorm recalibration and file writing on its own (easier) generator
through ``batch_fn``. Deterministic on a CPU: fixed seeds,
``torch.use_deterministic_algorithms(True)``, a fixed thread count and a fixed data order.
Training step ``s`` sees volumes ``s * batch_size ... (s + 1) * batch_size - 1`` of the
``"train"`` split; volume ``i`` has label ``i % 2`` and, when it holds lesions, polarity
``POLARITIES[(i // 2) % 2]``, so both classes and both polarities are exactly balanced.
The validation and test splits follow the same rule on their own streams.

Deep supervision (training only, as for the demo model): a 1x1 convolution on the last
stage's features predicts the lesion mask max-pooled to that grid (distractors are
negatives). It is discarded after training; the saved model is the plain classifier.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from icam_med.evaluation.synthetic import POLARITIES, EvalSynthesizer, normalise

__all__ = [
    "add_training_arguments",
    "atomic_write",
    "evaluate_split",
    "fast_normalise",
    "feature_module",
    "make_batch",
    "prepare_run",
    "recalibrate_batchnorm",
    "run_settings",
    "train_model",
    "update_config_sha",
    "volume_plan",
    "weights_bytes",
]

log = logging.getLogger(__name__)

#: Weight of the lesion voxels in the training-only mask loss.
AUX_POS_WEIGHT = 10.0

#: ``batch_fn(synth, intensity_steps, split, indices)``: a batch whose first three items are
#: ``(x, labels, masks)`` (:func:`make_batch`; the demo trainer passes its own).
BatchFn = Callable[[Any, Sequence[Any], str, range], tuple[Any, ...]]
#: ``probe_fn(model, synth, intensity_steps, n)``: a validation check made during training.
ProbeFn = Callable[[nn.Module, Any, Sequence[Any], int], dict[str, Any]]


def add_training_arguments(parser: argparse.ArgumentParser, *, out: Path, steps: int,
                           threads: int) -> None:
    """The command-line options shared by the training scripts (all but ``--config``)."""
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-validation", type=int, default=200)
    parser.add_argument("--n-test", type=int, default=400)
    parser.add_argument("--threads", type=int, default=threads)
    parser.add_argument("--aux-weight", type=float, default=1.0,
                        help="weight of the training-only lesion-mask loss (0 disables it)")
    parser.add_argument("--log-every", type=int, default=0,
                        help="check validation accuracy every N steps (0: only at the end)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--update-config", action="store_true",
                        help="write the new weights' SHA-256 into the config")


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; shipped files are world-readable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def prepare_run(config: Path, *, seed: int, threads: int, synthesizer: type | None = None
                ) -> tuple[Any, Any, list[dict[str, Any]], nn.Module]:
    """Load ``config``, make torch deterministic and build the generator and the model.

    Seeds torch with ``seed``, turns on deterministic algorithms, fixes the thread count,
    then builds the generator on the model's input grid (``synthesizer``, default
    :class:`LesionSynthesizer`) and the untrained model, in the order the training scripts
    have always used (the weights depend on it).

    Returns:
        ``(config, synth, intensity_steps, model)``.

    Raises:
        ValueError: the config's preprocessing does not yield the model's input size.
    """
    from icam_med.config import load_config
    from icam_med.evaluation.synthetic import input_space_synthesizer
    from icam_med.models import build_architecture

    cfg = load_config(config)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)
    synth, intensity = input_space_synthesizer(cfg.preprocessing, seed=seed,
                                               synthesizer=synthesizer)
    if cfg.model.spatial_size and tuple(cfg.model.spatial_size) != synth.shape:
        raise ValueError(
            f"the preprocessing of {config} yields {synth.shape}, but the model input is "
            f"{cfg.model.spatial_size}; fix the config so they agree."
        )
    return cfg, synth, intensity, build_architecture(cfg.model.architecture, cfg.model.args)


def run_settings(model_cfg: Any, preprocessing: Sequence[Any], synth: Any, n_params: int, *,
                 seed: int, steps: int, batch_size: int, lr: float, aux_weight: float,
                 recalibration_batches: int, history: dict[str, Any]) -> dict[str, Any]:
    """The settings and losses of a training run, as the training reports list them.

    ``history`` is :func:`train_model`'s return value; the keys come in the reports' order.
    """
    return {
        "architecture": model_cfg.architecture,
        "args": model_cfg.args,
        "n_parameters": n_params,
        "input_spatial_size": list(synth.shape),
        "input_spacing_mm": [float(s) for s in synth.spacing],
        "preprocessing": [dict(s) for s in preprocessing],
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "training_volumes": steps * batch_size,
        "optimizer": {"name": "AdamW", "max_lr": lr, "weight_decay": 1e-4,
                      "schedule": "OneCycleLR(pct_start=0.15)"},
        "auxiliary_mask_loss_weight": aux_weight,
        "auxiliary_mask_loss_pos_weight": AUX_POS_WEIGHT,
        "batchnorm_recalibration_batches": recalibration_batches,
        "loss_first_25": history["loss_first_25"],
        "loss_last_25": history["loss_last_25"],
    }


def update_config_sha(config: Path, sha: str) -> None:
    """Replace the ``weights_sha256`` line of ``config`` (a targeted, atomic edit)."""
    lines = config.read_text(encoding="utf-8").splitlines(keepends=True)
    hits = [i for i, line in enumerate(lines) if line.lstrip().startswith("weights_sha256:")]
    if len(hits) != 1:
        raise ValueError(f"{config}: expected exactly one 'weights_sha256:' line, found {len(hits)}.")
    i = hits[0]
    indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
    lines[i] = f'{indent}weights_sha256: "{sha}"\n'
    atomic_write(config, "".join(lines).encode())


def weights_bytes(state: dict[str, torch.Tensor], info: dict[str, Any]) -> bytes:
    """A safetensors file whose bytes depend only on the tensors and ``info``.

    The metadata is one key holding sorted JSON (safetensors writes a metadata map in an
    arbitrary key order, so several keys would make equal weights hash differently).
    """
    from safetensors.torch import save

    return save(state, metadata={"icam_med": json.dumps(info, sort_keys=True)})


def fast_normalise(image: np.ndarray, intensity_steps: Sequence[Any]) -> np.ndarray:
    """:func:`normalise`, with a numpy shortcut for the evaluation configs' only step.

    MONAI's ``NormalizeIntensityd(nonzero=True)`` costs about 80 ms per 40x48x48 volume
    here (MetaTensor dispatch), more than the generator; training draws thousands of
    volumes. The shortcut computes the same z-score over the non-zero voxels
    (``tests/test_training.py`` checks it against MONAI); any other steps go through MONAI.
    """
    steps = [dict(s) for s in intensity_steps]
    if steps != [{"name": "NormalizeIntensityd", "nonzero": True}]:
        return normalise(image, intensity_steps)
    out = np.asarray(image, dtype=np.float32).copy()
    nz = out != 0
    if nz.any():
        vals = out[nz]
        sd = float(vals.std())
        out[nz] = (vals - vals.mean()) / (sd if sd > 0 else 1.0)
    return out[None]


def volume_plan(index: int) -> tuple[int, str | None]:
    """Label and lesion polarity of volume ``index`` in training and in the accuracy checks."""
    label = index % 2
    return label, (POLARITIES[(index // 2) % 2] if label else None)


def make_batch(synth: EvalSynthesizer, intensity_steps: Sequence[Any], split: str,
               indices: Sequence[int] | range
               ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, list[str | None]]:
    """Volumes ``indices`` of ``split`` as a normalised batch.

    Returns:
        ``(x, labels, masks, polarities)``; masks is a bool ``(N, *spatial)`` array.
    """
    images, labels, masks, polarities = [], [], [], []
    for i in indices:
        label, polarity = volume_plan(int(i))
        vol = synth(int(i), split=split, label=label, polarity=polarity, with_twin=False)
        images.append(fast_normalise(vol.image, intensity_steps))
        labels.append(vol.label)
        masks.append(vol.mask)
        polarities.append(vol.polarity)
    return (torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.long),
            np.stack(masks), polarities)


def feature_module(model: nn.Module) -> nn.Module:
    """The last feature stage of a LesionNet (``stages[-1]``) or a MONAI ResNet (``layer4``)."""
    if hasattr(model, "stages"):
        return model.stages[-1]
    if hasattr(model, "layer4"):
        return model.layer4
    raise ValueError(f"{type(model).__name__}: no 'stages' or 'layer4' to supervise; the "
                     "evaluation trainer supports LesionNet and MONAI ResNets.")


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, synth: Any, intensity_steps: Sequence[Any],
                          *, batches: int = 16, batch_size: int = 16,
                          batch_fn: BatchFn = make_batch) -> None:
    """Re-estimate BatchNorm running statistics with the final weights ("precise BN").

    The running averages collected during training lag behind weights that were still
    changing; averaged afresh (``momentum=None``: a plain cumulative mean) over ``batches``
    batches of the ``"train"`` split drawn far past the training volumes (by ``batch_fn``),
    eval-mode outputs match what the network learned.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or batches < 1:
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    start = 10_000_000
    for b in range(batches):
        x = batch_fn(synth, intensity_steps, "train",
                     range(start + b * batch_size, start + (b + 1) * batch_size))[0]
        model(x)
    for m, mom in zip(norms, saved, strict=True):
        m.momentum = mom
    model.eval()


@torch.no_grad()
def evaluate_split(model: nn.Module, synth: EvalSynthesizer, intensity_steps: Sequence[Any],
                   split: str, n: int, batch_size: int = 16) -> dict[str, Any]:
    """Accuracy, specificity, and sensitivity overall and per polarity on ``n`` volumes."""
    model.eval()
    preds, labels, pols = [], [], []
    for start in range(0, n, batch_size):
        x, y, _, p = make_batch(synth, intensity_steps, split,
                                range(start, min(n, start + batch_size)))
        preds.append(model(x).argmax(1))
        labels.append(y)
        pols.extend(p)
    pred, y = torch.cat(preds).numpy(), torch.cat(labels).numpy()
    pol = np.asarray([p or "" for p in pols])

    def rate(sel: np.ndarray, want: int) -> float | None:
        return float((pred[sel] == want).mean()) if sel.any() else None

    return {
        "split": split,
        "n": int(y.size),
        "n_present": int((y == 1).sum()),
        "accuracy": float((pred == y).mean()),
        "sensitivity": rate(y == 1, 1),
        "sensitivity_hypo": rate(pol == "hypo", 1),
        "sensitivity_hyper": rate(pol == "hyper", 1),
        "n_hypo": int((pol == "hypo").sum()),
        "n_hyper": int((pol == "hyper").sum()),
        "specificity": rate(y == 0, 0),
    }


def _validation_probe(model: nn.Module, synth: Any, intensity_steps: Sequence[Any],
                      n: int) -> dict[str, Any]:
    """:func:`evaluate_split` on ``n`` validation volumes, logged (the default probe)."""
    probe = evaluate_split(model, synth, intensity_steps, "validation", n)
    shown = {k: "n/a" if v is None else f"{v:.3f}" for k, v in probe.items()
             if k in ("accuracy", "sensitivity_hypo", "sensitivity_hyper", "specificity")}
    log.info("validation (%d volumes) accuracy %s, sensitivity hypo %s hyper %s, "
             "specificity %s", n, shown["accuracy"], shown["sensitivity_hypo"],
             shown["sensitivity_hyper"], shown["specificity"])
    return probe


def train_model(model: nn.Module, synth: Any, intensity_steps: Sequence[Any], *,
                steps: int, batch_size: int = 16, lr: float = 2e-3, aux_weight: float = 1.0,
                log_every: int = 0, n_probe: int = 64, batch_fn: BatchFn = make_batch,
                probe_fn: ProbeFn = _validation_probe) -> dict[str, Any]:
    """Train ``model`` in place (seed and determinism are the caller's) and return a history.

    Batches come from ``batch_fn`` (default :func:`make_batch`, the evaluation benchmark);
    every ``log_every`` steps ``probe_fn`` checks ``n_probe`` validation volumes.

    Returns:
        ``{"loss_first_25", "loss_last_25", "train_seconds", "probes"}``; ``probes`` lists
        the validation checks made every ``log_every`` steps on ``n_probe`` volumes.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}.")
    feats: dict[str, torch.Tensor] = {}
    aux_head = hook = None
    if aux_weight > 0:
        stage = feature_module(model)
        hook = stage.register_forward_hook(lambda _m, _i, out: feats.__setitem__("last", out))
        x0 = torch.zeros(1, 1, *synth.shape)
        model.eval()
        with torch.no_grad():
            model(x0)
        width, ndim = feats["last"].shape[1], feats["last"].ndim
        feats.clear()
        aux_head = (nn.Conv3d if ndim == 5 else nn.Conv2d)(width, 1, kernel_size=1)
    params = list(model.parameters()) + (list(aux_head.parameters()) if aux_head else [])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    loss_fn = nn.CrossEntropyLoss()
    history: list[float] = []
    probes: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        x, y, masks = batch_fn(synth, intensity_steps, "train",
                               range(step * batch_size, (step + 1) * batch_size))[:3]
        loss = loss_fn(model(x), y)
        if aux_head is not None:
            f = feats.pop("last")
            target = torch.from_numpy(np.asarray(masks)[:, None].astype(np.float32))
            pool = nn.functional.adaptive_max_pool3d if f.ndim == 5 else \
                nn.functional.adaptive_max_pool2d
            loss = loss + aux_weight * nn.functional.binary_cross_entropy_with_logits(
                aux_head(f), pool(target, f.shape[2:]), pos_weight=torch.tensor(AUX_POS_WEIGHT))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history.append(loss.item())
        if (step + 1) % 25 == 0 or step + 1 == steps:
            log.info("step %d/%d  loss %.4f (mean of last 25: %.4f)  %.0f s", step + 1, steps,
                     history[-1], float(np.mean(history[-25:])), time.perf_counter() - t0)
        if log_every and (step + 1) % log_every == 0 and step + 1 < steps:
            log.info("step %d: validation check", step + 1)
            probe = probe_fn(model, synth, intensity_steps, n_probe)
            model.train()
            probe["step"] = step + 1
            probes.append(probe)
    if hook is not None:
        hook.remove()
    return {"loss_first_25": float(np.mean(history[:25])),
            "loss_last_25": float(np.mean(history[-25:])),
            "train_seconds": round(time.perf_counter() - t0, 1), "probes": probes}

"""Targets: what score a CAM explains. Small callables, one score per sample."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["ClassTarget", "SegmentationTarget", "Target", "resolve_targets"]

Target = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ClassTarget:
    """The logit of one class per sample of a classification output ``(N, K)``.

    Args:
        classes: one class index for every sample, or a single index for all.
    """

    classes: tuple[int, ...] | int

    def indices(self, n: int, device: torch.device) -> torch.Tensor:
        if isinstance(self.classes, int):
            return torch.full((n,), self.classes, dtype=torch.long, device=device)
        return torch.as_tensor(self.classes, dtype=torch.long, device=device)

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        idx = self.indices(output.shape[0], output.device)
        return output.gather(1, idx.view(-1, 1)).squeeze(1)


@dataclass(frozen=True)
class SegmentationTarget:
    """Masked sum of one class channel of a segmentation output ``(N, K, *spatial)``.

    Args:
        class_index: the output channel to explain.
        mask: ``(N or 1, *spatial)`` weights; ``None`` uses the voxels predicted as
            ``class_index`` (argmax over channels).
    """

    class_index: int
    mask: torch.Tensor | None = None

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        if output.ndim < 3:
            raise ValueError(
                f"SegmentationTarget needs a segmentation output (N, K, *spatial); the model "
                f"returned shape {tuple(output.shape)}. Use a class index for classifiers."
            )
        if not 0 <= self.class_index < output.shape[1]:
            raise ValueError(
                f"SegmentationTarget class_index={self.class_index} is out of range for an "
                f"output with {output.shape[1]} channels (valid: 0..{output.shape[1] - 1})."
            )
        channel = output[:, self.class_index]
        if self.mask is None:
            mask = (output.detach().argmax(1) == self.class_index).to(channel.dtype)
        else:
            mask = self.mask.to(device=channel.device, dtype=channel.dtype)
            if mask.ndim == channel.ndim - 1:
                mask = mask.unsqueeze(0)
            if mask.shape[1:] != channel.shape[1:]:
                raise ValueError(
                    f"SegmentationTarget mask has spatial shape {tuple(mask.shape[1:])}, but the "
                    f"output's is {tuple(channel.shape[1:])}; give a mask on the output's grid."
                )
        return (channel * mask).flatten(1).sum(1)


def resolve_targets(targets: object, n: int) -> Target | None:
    """Normalise the ``targets`` argument of a CAM call.

    Returns ``None`` for "the predicted class", else a callable ``output -> (N,)``.

    Raises:
        ValueError: a list of the wrong length or of values that are not class indices.
    """
    if targets is None:
        return None
    if isinstance(targets, bool):
        raise ValueError(f"targets={targets!r}: expected a class index, a list of them, or a callable.")
    if isinstance(targets, int):
        return ClassTarget(int(targets))
    if isinstance(targets, torch.Tensor):
        if targets.ndim == 0:
            return ClassTarget(int(targets))
        targets = targets.tolist()
    if callable(targets):
        return targets  # type: ignore[return-value]
    if isinstance(targets, Sequence) and not isinstance(targets, str):
        items = list(targets)
        if len(items) != n:
            raise ValueError(
                f"targets has {len(items)} entries but the batch has {n} samples; give one "
                "class index per sample, a single index for all, or None for the prediction."
            )
        if all(isinstance(t, int) and not isinstance(t, bool) for t in items):
            return ClassTarget(tuple(int(t) for t in items))
        if all(callable(t) for t in items):
            def per_sample(output: torch.Tensor) -> torch.Tensor:
                return torch.stack([t(output[i : i + 1]).reshape(()) for i, t in enumerate(items)])

            return per_sample
    raise ValueError(
        f"targets={targets!r}: expected None (the predicted class), a class index, a list of "
        "class indices (one per sample), a callable output -> (N,) scores, or a SegmentationTarget."
    )

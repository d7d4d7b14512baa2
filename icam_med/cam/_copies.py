"""Running one explanation's many derived inputs (noisy copies, masked inputs) as batches.

SmoothGrad and Score-CAM both feed the model ``g`` derived inputs per sample. They are laid
out *group-major*: a batch of ``g * N`` rows where rows ``j*N .. j*N + N - 1`` are the
``j``-th derived input of samples ``0 .. N-1``. Every group of ``N`` rows lines up with the
original batch, so any target of the original call (a class index per sample, a
:class:`~icam_med.cam.targets.SegmentationTarget` with one mask per sample, a callable
``output -> (N,)``, a list of per-sample callables) scores a group unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from icam_med.cam.targets import ClassTarget, SegmentationTarget

__all__ = ["clean_forward", "freeze_target", "grouped_scores", "grouped_target", "restore_state"]


def freeze_target(target_fn: Any, output: torch.Tensor) -> Any:
    """The target of the *clean* input, fixed so that derived inputs explain the same thing.

    ``None`` (the predicted class) becomes the clean prediction, a
    :class:`SegmentationTarget` without a mask the clean predicted region of its class
    (a noisy or masked copy would otherwise explain its own, different, prediction).
    Anything else is returned as is.
    """
    if target_fn is None and output.ndim == 2:
        return ClassTarget(tuple(int(c) for c in output.detach().argmax(1).tolist()))
    if isinstance(target_fn, SegmentationTarget) and target_fn.mask is None and output.ndim >= 3 \
            and 0 <= target_fn.class_index < output.shape[1]:
        mask = (output.detach().argmax(1) == target_fn.class_index).to(output.dtype)
        return SegmentationTarget(target_fn.class_index, mask)
    return target_fn


def grouped_target(target_fn: Any, n: int, groups: int) -> Any:
    """``target_fn`` for a group-major batch of ``groups * n`` rows.

    A class target is repeated (the engine still checks its range); any other callable is
    applied to each group of ``n`` rows and the scores concatenated.
    """
    if groups == 1 or target_fn is None:
        return target_fn
    if isinstance(target_fn, ClassTarget):
        classes = target_fn.classes
        return classes if isinstance(classes, int) else ClassTarget(tuple(classes) * groups)

    def per_group(output: torch.Tensor) -> torch.Tensor:
        return torch.cat([target_fn(output[j * n:(j + 1) * n]).reshape(n)
                          for j in range(output.shape[0] // n)])

    return per_group


def grouped_scores(output: torch.Tensor, target_fn: Any, n: int) -> torch.Tensor:
    """``(groups, n)`` target scores of a group-major batch's output."""
    groups = output.shape[0] // n
    if isinstance(target_fn, ClassTarget):
        idx = target_fn.indices(n, output.device).repeat(groups).view(-1, 1)
        return output.gather(1, idx).view(groups, n)
    return torch.stack([target_fn(output[j * n:(j + 1) * n]).reshape(n) for j in range(groups)])


def restore_state(model: nn.Module) -> Callable[[], None]:
    """Remember every module's training flag; the returned callable puts them back."""
    flags = {m: m.training for m in model.modules()}

    def restore() -> None:
        for m, flag in flags.items():
            m.training = flag

    return restore


def clean_forward(model: nn.Module, x: torch.Tensor, amp_dtype: torch.dtype | None
                  ) -> torch.Tensor:
    """One gradient-free forward of the clean batch (for its logits, prediction and score)."""
    with torch.no_grad():
        if amp_dtype is not None:
            with torch.autocast(device_type=x.device.type, dtype=amp_dtype):
                return model(x)
        return model(x)

"""Argument types shared by the commands: checked by argparse, so a bad value is a usage
error (exit 2, one line) before any work starts."""

from __future__ import annotations

import argparse
import math
import re

__all__ = ["device", "device_name", "non_negative_int", "positive_float", "positive_int", "sha256_hex"]

_DEVICE = re.compile(r"^(cpu|mps|meta|(cuda|xpu)(:\d+)?)$")


def _int_at_least(text: str, minimum: int) -> int:
    """``text`` as an integer >= ``minimum``, else an argparse usage error naming the value."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a whole number >= {minimum}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return _int_at_least(text, 0)


def positive_float(text: str) -> float:
    """A finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def sha256_hex(text: str) -> str:
    """A 64-character hexadecimal SHA-256."""
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
        raise argparse.ArgumentTypeError(
            f"expected a SHA-256 of 64 hexadecimal characters, got {text!r}")
    return text.lower()


def device_name(text: str) -> str:
    """A torch device string by its form only (for devices on other machines)."""
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a torch device; use cpu, cuda, cuda:N or mps")
    return text


def device(text: str) -> str:
    """A torch device string (``cpu``, ``cuda``, ``cuda:1``, ``mps``...), available here."""
    device_name(text)
    if text.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device on this machine; use cpu")
        index = int(text.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if text == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError("'mps': not available on this machine; use cpu")
    return text

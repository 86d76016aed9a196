"""Guidance losses: functions of the decoded predicted image that steer sampling.

A loss takes images (N, 3, H, W) in [0, 1] (as decoded, not clamped, so gradients flow)
and the task's ``target`` numbers, and returns one loss per image (N,). Per-image losses
keep each image's gradient independent of the others in its batch. A job names ``color``
or any importable ``module:function`` with this signature.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

import torch

LossFunction = Callable[[torch.Tensor, Sequence[float | None]], torch.Tensor]


def color_loss(images: torch.Tensor, target: Sequence[float | None]) -> torch.Tensor:
    """Mean absolute distance of each channel from its target; the notebook's blue loss is [None, None, 0.9]."""
    # Channel by channel, the targets as Python numbers: a list index or a tensor of targets would
    # be copied to the GPU at every guided step, waiting for it each time (a host sync).
    distances = [(images[:, c] - value).abs() for c, value in enumerate(target) if value is not None]
    return torch.stack(distances, dim=1).mean(dim=(1, 2, 3))


def brightness_loss(images: torch.Tensor, target: Sequence[float | None]) -> torch.Tensor:
    """Distance of each image's mean brightness from ``target[0]`` (0.5 when none): an example custom loss."""
    wanted = target[0] if target and target[0] is not None else 0.5
    return (images.mean(dim=(1, 2, 3)) - wanted).abs()


BUILTIN: dict[str, LossFunction] = {"color": color_loss}


def load_loss(name: str) -> LossFunction:
    """``color``, or ``module:function`` imported on the actor; a ValueError says what went wrong."""
    if name in BUILTIN:
        return BUILTIN[name]
    module_name, _, function_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's module, reported as one line
        raise ValueError(f"guidance_loss.name: cannot import {module_name} ({type(exc).__name__}: {exc})") from exc
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"guidance_loss.name: {module_name} has no function {function_name}")
    return function


def per_image(loss: torch.Tensor, count: int) -> torch.Tensor:
    """Check a custom loss's result: one value per image (a scalar is accepted for a single image)."""
    if loss.dim() == 0 and count == 1:
        return loss.reshape(1)
    if loss.shape != (count,):
        raise ValueError(f"guidance_loss: expected one loss per image, shape ({count},); got {tuple(loss.shape)}")
    return loss

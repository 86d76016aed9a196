"""The compiled render path (``farm render --compile``): the UNet and the VAE in channels_last, the
UNet's forward and the VAE's decoder compiled with ``torch.compile``.

It changes the bytes (fused kernels and channels_last convolutions sum in another order), so the
mode is recorded (``Components.compile_mode``, the manifest's ``compile_mode`` column, a compiled
PNG's ``render_path``) and ``farm reproduce`` loads the model the same way. ``models.load_components``
calls in here; torch is imported inside functions, so importing this module stays light.

Nothing compiles at load time: the first UNet call and the first decode of each shape (batch size,
image size, guidance on or off) compile it, the warm-up, and later calls of that shape run the
compiled code.
"""

from __future__ import annotations

import os
from typing import Any

from farm.errors import FarmError

# torch.compile's mode per device, with inductor. Both "default": inductor's generated kernels, without
# CUDA graphs or autotuning.
# - Not "reduce-overhead" (CUDA graphs) on a GPU: a graph's outputs are overwritten by its next replay,
#   and PNDM keeps the raw UNet outputs of earlier steps when guidance is 1; and farm's batch sizes vary
#   (the last partial batch, the halves of an out-of-memory retry, VAE chunks), each new size recording
#   another graph into the memory pool, an out-of-memory retry's halves just when memory ran short.
# - Not "max-autotune(-no-cudagraphs)": it picks kernels by timing them on the device, so two runs could
#   pick differently and draw other bytes; inductor's deterministic mode (COMPILE_OPTIONS) skips that
#   benchmarking, which leaves it nothing to gain.
# - On a CPU, inductor writes and compiles C++: the actor's machine needs a C++ compiler (gcc), and
#   the warm-up takes minutes a shape on a small CPU (docs/reproducibility.md).
CUDA_COMPILE_MODE = "default"
CPU_COMPILE_MODE = "default"
# The modes a recorded compile_mode may name for inductor, and the other backends it may name instead:
# "aot_eager" traces the graphs (dynamo, AOTAutograd) and runs them with eager kernels, generating no
# code, so it compiles in seconds where inductor takes minutes on a small CPU (farm's own tests).
INDUCTOR_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
OTHER_BACKENDS = ("aot_eager", "eager")
# Set to one of OTHER_BACKENDS, --compile compiles with that backend instead of inductor (rows record it).
COMPILE_BACKEND_ENV = "FARM_COMPILE_BACKEND"
# Inductor options on top of the mode's: deterministic skips on-device benchmarking that would choose
# kernels, and so numerics, by timing (an option from torch 2.8 on; left out where torch lacks it).
COMPILE_OPTIONS = {"deterministic": True}
# Every shape compiles a graph of its own (dynamic=False): a graph then depends on its shape alone, not
# on the shapes met before it, so a batch renders the same bytes in a run and in farm reproduce. A job
# meets a few shapes; past this many graphs per function torch would run it eager, so farm raises the
# limit, and makes reaching it an error rather than eager bytes recorded as compiled.
RECOMPILE_LIMIT = 64
TRITON_DISTRIBUTIONS = ("triton", "pytorch-triton")


class CompileError(FarmError):
    """A compile mode farm does not know; the message is one line for the user."""


def compile_mode(device: str, requested: bool | str | None) -> str | None:
    """The compile_mode of a load: None for eager; True: the device's mode (or the backend that
    $FARM_COMPILE_BACKEND names); a string: that recorded mode, checked."""
    if not requested:
        return None
    known = INDUCTOR_MODES + OTHER_BACKENDS
    if requested is True:
        backend = os.environ.get(COMPILE_BACKEND_ENV, "").strip()
        if backend and backend != "inductor":
            if backend not in OTHER_BACKENDS:
                raise CompileError(
                    f"{COMPILE_BACKEND_ENV}={backend!r}: expected inductor or {', '.join(OTHER_BACKENDS)}"
                )
            return backend
        return CUDA_COMPILE_MODE if device == "cuda" else CPU_COMPILE_MODE
    if requested not in known:
        raise CompileError(f"compile mode {requested!r} is not one farm knows ({', '.join(known)})")
    return str(requested)


def compile_model(unet: Any, vae: Any, mode: str) -> None:
    """The compiled render path, in place: the UNet and the VAE in channels_last, the UNet's forward
    and the VAE's decoder compiled (``nn.Module.compile``: the modules stay themselves, so their
    config, LoRA adapters, ``vae.decode`` and ``vae.encode`` work as before, and a guidance loss's
    gradient flows through the compiled decoder). A ControlNet stays eager: its residuals are inputs
    of the UNet's graph. A new LoRA set changes the UNet's layers, so its first batch compiles again."""
    import torch
    import torch._dynamo
    import torch._inductor

    dynamo = torch._dynamo.config
    dynamo.cache_size_limit = max(dynamo.cache_size_limit, RECOMPILE_LIMIT)
    if hasattr(dynamo, "fail_on_recompile_limit_hit"):
        dynamo.fail_on_recompile_limit_hit = True
    if mode in OTHER_BACKENDS:
        kwargs: dict[str, Any] = {"backend": mode}
    else:
        options = {k: v for k, v in COMPILE_OPTIONS.items() if hasattr(torch._inductor.config, k)}
        kwargs = {"backend": "inductor", "options": torch._inductor.list_mode_options(mode) | options}
    for module in (unet, vae):
        module.to(memory_format=torch.channels_last)
    unet.compile(dynamic=False, **kwargs)
    vae.decoder.compile(dynamic=False, **kwargs)


def triton_version() -> str | None:
    """The installed Triton's version (its distribution is "triton", or "pytorch-triton" in nightly
    builds); None when there is none."""
    from importlib.metadata import PackageNotFoundError, version

    for name in TRITON_DISTRIBUTIONS:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None

"""GPU end to end: ``farm render`` per model, batch size, step count and render path, and where a batch's time goes.

What it measures. Two passes per model, both on the same generated job: 4 prompts in turn, seeds
1..N, a negative prompt, euler, guidance 7.5 (classifier-free guidance on, so the UNet sees 2N
latents per step). The job holds every step count, in order (20 then 50 by default): the first
step count gets ``--warmup`` batches (3) then ``--timed`` batches (2), each later one ``--timed``
batches, so one actor start (and one compile) serves them all.

1. **End to end**: the real ``farm render JOB --out DIR --actors 1 --batch-size B --no-progress``
   (Ray, one actor on the GPU, the PNGs and the Parquet manifest written), once per batch size and
   render path: eager, and ``--compile`` (channels_last + torch.compile) when ``farm render --help``
   offers it (else skipped, with a note). A manifest row's ``created_at`` is stamped in the actor as
   its batch finishes rendering, so per step count **images/s** is the ok images of its last
   ``--timed`` batches over the time from the ``created_at`` of the batch before them to that of the
   last one: the steady state, warm-up and compile left out, PNG writing counted wherever it holds
   the next batch back. Three warm-up batches keep one-off delays of the first batches out (in some
   runs on 2 cores the actor's first reply reached the driver 2-3.5 s late, and the actor idled
   after its second batch); every batch's interval is printed, so such a stall shows. Beside it,
   from the run's summary.json: start-up (Ray, actor, model load) and Ray's share of it, the first
   batch (start-up to the first image's row: the compile is there) and the whole run; the PNGs on
   disk and ok rows; and **peak GPU memory**: nvidia-smi's ``memory.used`` polled every 200 ms during
   the run, less its reading before (the actor's CUDA context and the allocator's reserve included).
2. **Profile** (in this process, no Ray): ``farm.actor.BatchRenderer``, built as an actor builds it
   (float16 on a GPU, its PNG thread pool), renders the same job's batches (one warm-up batch), called
   from as many threads as an actor runs calls (``farm.pool.IN_FLIGHT_PER_ACTOR``), so a batch's PNGs
   are written while the next one denoises, as in an actor. The UNet and the VAE decode are timed with
   CUDA events around each call (wrappers on ``components`` that forward everything else), the text
   encoders from their embeddings to their last layer (forward hooks; encoded prompts are kept per
   model, so only the first batch encodes), each batch's end with an event after
   ``farm.render.render_batch`` returns (its images on the host), and PNG encode+write with a wrapper
   on ``farm.outputs.write_png``. Per step count, over the timed batches: s/batch, the shares of the
   wall time spent in the UNet, the VAE decode, the text encoders and the rest of a batch's GPU span
   (scheduler steps, latents, copies, launch gaps), and the **GPU idle share between batches**: the
   GPU time from a batch's end to the next batch's first text-encoder or UNet call, over the wall
   time (the GPU's own clock throughout); PNG ms per image (on the PNG threads, beside the next
   batch, or inline on a CPU); torch's peak allocated memory.

Goals, printed beside the figures, for ``sd15-shaped`` at 512x512 on an H100/H200-class GPU:
>= 10 images/s at 20 steps, >= 4.5 images/s at 50 steps, GPU idle between batches < 5%.

Models:

- ``sd15-shaped``: SD 1.5's architecture with RANDOM weights, built by benchmarks/gpu_render.py's
  ``build_sd15_shaped``; 512x512, 20 and 50 steps, batches of 8 and 16, eager and compiled.
- ``sdxl-shaped``: SDXL base's UNet (2.6 B parameters), its VAE (run in float32 for the decode, as
  diffusers' SDXL pipelines run it) and its two text encoders (CLIP ViT-L, OpenCLIP bigG with its
  projection) with RANDOM weights, farm's tokenizer and SDXL base's scheduler config; 1024x1024,
  20 steps, batch 8, eager. Last, and only when the time budget allows.
- ``tiny`` and ``tiny-xl``: farm's presets, for smoke tests on a CPU.

The shaped models are built in float16 (on the GPU, where initialising the weights takes seconds)
into ``--cache`` (default ``$FARM_HOME/bench-models``, else ``~/.cache/farm/bench-models``), reused
when present, and their files hashed into farm's hash cache before the first run, so no run pays
the hashing. Their images are noise; their compute is a real checkpoint's. ``FARM_HOME`` is pointed
at a temporary folder (removed at exit) when unset; the outputs go to a temporary folder (removed
at exit) unless ``--out`` names one.

Time: before each step (a build, a run, a profile) the script prints its estimate (from the plans'
H100-class figures at first, then from what the runs before it measured); with ``--budget S``
(default 420 s on a GPU, none on a CPU, counted from the script's start) a step whose estimate would
end past S is skipped with a note, and a run still going at S is stopped (its rows kept), so the
default run ends within 8 minutes including the model build. In that time the default run does
sd15-shaped batch 8 in full and as much of batch 16 as fits (its compiled run needs a compile of its
own, a minute or two); sdxl-shaped only fits alone (``--models sdxl-shaped``, about 5 minutes).
``--quick``: batch 8 only, sd15-shaped only (4-6 minutes, most of it the compile). A CPU can try the
compiled path in seconds with ``FARM_COMPILE_BACKEND=aot_eager`` (farm.models: dynamo, no codegen).

Run (on a GPU machine, from the repo root, in farm's environment with a CUDA torch)::

    python benchmarks/gpu_farm.py --json gpu-farm.json          # cuda, float16, < 8 min
    python benchmarks/gpu_farm.py --quick --json gpu-farm.json  # batch 8 only, 4-6 min
    python benchmarks/gpu_farm.py --models sdxl-shaped          # SDXL alone, about 5 min

On a CPU, for a smoke test of both passes and both paths (about 2 minutes on 2 cores)::

    FARM_COMPILE_BACKEND=aot_eager python benchmarks/gpu_farm.py --device cpu --models tiny --size 64 --steps 4
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# SD 1.5's shaped builder and its text encoder's config, and the grid benchmark's prompts, negative
# prompt and guidance (this script's folder is on sys.path).
from gpu_render import SD15_TEXT, SD15_VAE, build_sd15_shaped, int_list
from grid_throughput import GUIDANCE, NEGATIVE_PROMPT, PROMPTS

START = time.perf_counter()  # the budget counts from here: imports and the model build included
REPO = Path(__file__).resolve().parents[1]
SCHEDULER = "euler"
GIB = 1024**3
MODES = ("eager", "compile")
# Goals for sd15-shaped at 512x512 on an H100/H200-class GPU: images/s per step count, idle share.
GOAL_IMAGES_PER_S = {20: 10.0, 50: 4.5}
GOAL_IDLE_SHARE = 0.05
GOAL_MODEL, GOAL_SIZE = "sd15-shaped", 512
# Bumped whenever a shaped model's build changes, so an old cache folder is never reused for it.
BUILD_VERSION = "v1"


@dataclass(frozen=True)
class ModelPlan:
    """A model's default settings, and what the time estimates start from before anything is measured."""

    size: int
    steps: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    modes: tuple[str, ...]
    rate: float  # step-images/s (images x steps per second), eager, at ``size``, on an H100-class GPU
    startup_s: float  # farm render's start-up: Ray, the actor's imports, the model load
    compile_s: float  # the compile warm-up of a fresh process
    build_s: float  # building and saving the shaped model (0: a preset, built in seconds)


PLANS = {
    # 6.4 images/s at 20 steps, batch 8, eager on an H100 (docs/benchmarks.md, benchmarks/gpu_render.py).
    "sd15-shaped": ModelPlan(512, (20, 50), (8, 16), MODES, 128.0, 25.0, 120.0, 40.0),
    "sdxl-shaped": ModelPlan(1024, (20,), (8,), ("eager",), 14.0, 40.0, 200.0, 90.0),
    "tiny": ModelPlan(64, (20,), (8,), MODES, 400.0, 20.0, 60.0, 0.0),
    "tiny-xl": ModelPlan(128, (20,), (8,), ("eager",), 200.0, 20.0, 60.0, 0.0),
}
DEFAULT_MODELS = ("sd15-shaped", "sdxl-shaped")
PRESET_MODELS = ("tiny", "tiny-xl")
COMPILE_SPEEDUP = 1.3  # what the estimates assume a compiled render gains, until one is measured
# Untimed batches before the profile's first step count: no Ray in the profile, only the first batch
# of a shape (cuDNN's and cuBLAS's first calls, a compile) to leave out.
PROFILE_WARMUP = 1

# SDXL base's unet/config.json (stabilityai/stable-diffusion-xl-base-1.0): 2.6 B parameters.
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # the pooled text embedding (1280) + 6 time ids x 256
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
}
# sdxl-vae's config.json: SD's VAE with its own latent scale; force_upcast: decoded in float32.
SDXL_VAE = {**SD15_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
# SDXL base's text_encoder_2/config.json: OpenCLIP ViT-bigG's text tower with its projection.
SDXL_TEXT_2 = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "projection_dim": 1280,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="where farm renders (default cuda)")
    parser.add_argument("--dtype", default=None, help="float16 on cuda, float32 on cpu unless given")
    parser.add_argument(
        "--models",
        default=None,
        help=f"comma-separated, of {', '.join(PLANS)} (default {','.join(DEFAULT_MODELS)}; --quick: sd15-shaped)",
    )
    parser.add_argument("--size", type=int, default=None, help="width and height for every model (default: its own)")
    parser.add_argument(
        "--steps", type=int_list, default=None, help="step counts, comma-separated (default: per model)"
    )
    parser.add_argument("--batch-sizes", type=int_list, default=None, help="comma-separated (default: per model)")
    parser.add_argument("--modes", default=None, help="eager,compile (default: per model; compile needs the flag)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches before the first step count's (3)")
    parser.add_argument("--timed", type=int, default=2, help="timed batches per step count (default 2)")
    parser.add_argument("--quick", action="store_true", help="batch 8 only, sd15-shaped only (unless --models)")
    parser.add_argument("--no-profile", action="store_true", help="skip the in-process profile pass")
    parser.add_argument("--no-e2e", action="store_true", help="skip the farm render runs")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for the whole run; steps past it are skipped (default 420 on cuda; 0: none)",
    )
    parser.add_argument("--cache", default=None, help="where the shaped models are built and kept")
    parser.add_argument("--out", default=None, help="output root to keep (default: a temporary folder, removed)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    names = args.models or ("sd15-shaped" if args.quick else ",".join(DEFAULT_MODELS))
    args.models = [m.strip() for m in names.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in PLANS]
    if unknown or not args.models:
        parser.error(f"--models: expected some of {', '.join(PLANS)}, got {args.models}")
    if args.modes is not None:
        args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        if not args.modes or any(m not in MODES for m in args.modes):
            parser.error(f"--modes: expected some of {', '.join(MODES)}")
    if args.size is not None and (args.size < 8 or args.size % 8):
        parser.error("--size: expected a multiple of 8")
    if args.warmup < 1 or args.timed < 1:
        parser.error("--warmup and --timed: expected at least 1")
    if args.dtype is None:
        args.dtype = "float16" if args.device == "cuda" else "float32"
    if args.budget is None:
        args.budget = 420.0 if args.device == "cuda" else 0.0
    return args


@dataclass(frozen=True)
class Setting:
    """One model's settings in this run (its plan, with the command line's overrides)."""

    model: str
    size: int
    steps: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    modes: tuple[str, ...]

    def groups(self, warmup: int, timed: int) -> list[tuple[int, int]]:
        """(steps, batches) in job order: the first step count carries the warm-up batches."""
        return [(s, timed + (warmup if i == 0 else 0)) for i, s in enumerate(self.steps)]


def settings_for(args: argparse.Namespace) -> list[Setting]:
    out = []
    for name in args.models:
        plan = PLANS[name]
        batch_sizes = args.batch_sizes or ([plan.batch_sizes[0]] if args.quick else plan.batch_sizes)
        out.append(
            Setting(
                name,
                args.size or plan.size,
                tuple(args.steps or plan.steps),
                tuple(batch_sizes),
                tuple(args.modes or plan.modes),
            )
        )
    return out


# ---------------------------------------------------------------------------------------
# Time: the budget and the estimates


class Budget:
    """The run's time: estimates from the plans, replaced by what each step measured."""

    def __init__(self, seconds: float, notes: list[str], start: float) -> None:
        self.start = start  # the process's start (perf_counter), imports included
        self.seconds = seconds
        self.notes = notes
        self.rate: dict[tuple[str, str], float] = {}  # (model, mode) -> measured step-images/s
        self.startup: dict[str, float] = {}  # model -> measured start-up
        self.compile: dict[str, float] = {}  # model -> measured compile warm-up

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, what: str, estimate: float) -> bool:
        """Print the step's estimate; False (and a note) when it would end past the budget."""
        left = self.seconds - self.elapsed() if self.seconds else None
        print(
            f"\n== {what}: estimate ~{estimate:.0f} s"
            + (f" ({left:.0f} s of the {self.seconds:.0f} s budget left)" if left is not None else ""),
            flush=True,
        )
        if left is not None and estimate > left:
            note = f"skipped {what}: its estimate ({estimate:.0f} s) is past the budget ({left:.0f} s left)"
            print(f"   {note}")
            self.notes.append(note)
            return False
        return True

    def step_rate(self, setting: Setting, mode: str) -> float:
        """Step-images/s expected of a model on a path: measured, or the plan's scaled to the size."""
        if (setting.model, mode) in self.rate:
            return self.rate[(setting.model, mode)]
        if (setting.model, "eager") in self.rate:
            return self.rate[(setting.model, "eager")] * COMPILE_SPEEDUP
        plan = PLANS[setting.model]
        return plan.rate * (plan.size / setting.size) ** 2 * (COMPILE_SPEEDUP if mode == "compile" else 1.0)

    def render_s(self, setting: Setting, mode: str, batch: int, groups: list[tuple[int, int]]) -> float:
        return sum(batch * steps * count for steps, count in groups) / self.step_rate(setting, mode)

    def compile_s(self, model: str) -> float:
        return self.compile.get(model, PLANS[model].compile_s)

    def startup_s(self, model: str) -> float:
        return self.startup.get(model, PLANS[model].startup_s)


# ---------------------------------------------------------------------------------------
# Models


def build_sd15_shaped_on(folder: Path, device: str) -> Path:
    """gpu_render's sd15-shaped, its weights initialised on ``device`` (seconds on a GPU)."""
    import torch

    with torch.device(device):  # the tiny pipeline it takes its tokenizer from builds there too
        return build_sd15_shaped(folder)


def build_sdxl_shaped(folder: Path, device: str = "cpu") -> Path:
    """Save an SDXL base-architecture pipeline with random weights, in float16, into ``folder``;
    the weights are initialised on ``device``."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from farm.presets import build_tiny_xl_pipeline

    # farm's tokenizer and SDXL base's own scheduler config (on the CPU: Euler's init reads its
    # tensors back through numpy, which a GPU default device breaks).
    tiny = build_tiny_xl_pipeline()
    tokenizer = tiny.tokenizer
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**SDXL_UNET)
        vae = AutoencoderKL(**SDXL_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT, **ids))  # SDXL's first encoder is SD 1.5's
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2, **ids))
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=tiny.scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.to(dtype=torch.float16)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


# name -> builder(folder, device): the weights initialised on device, saved in float16 into folder.
BUILDERS: dict[str, Callable[[Path, str], Path]] = {
    "sd15-shaped": build_sd15_shaped_on,
    "sdxl-shaped": build_sdxl_shaped,
}


def cache_root(args: argparse.Namespace, own_home: bool) -> Path:
    if args.cache:
        return Path(args.cache)
    if not own_home:
        return Path(os.environ["FARM_HOME"]) / "bench-models"
    return Path.home() / ".cache" / "farm" / "bench-models"


def shaped_folder(cache: Path, name: str) -> Path:
    return cache / f"{name}-{BUILD_VERSION}"


def ensure_model(name: str, cache: Path, device: str) -> dict[str, Any]:
    """The model's reference for a job: a preset built into the farm cache, or a shaped model built
    once into ``cache`` (on ``device``: a GPU initialises the weights in seconds), its files hashed."""
    import torch

    from farm.models import model_hash
    from farm.presets import ensure_preset

    start = time.perf_counter()
    if name in PRESET_MODELS:
        ensure_preset(name)
        return {"ref": name, "built": True, "build_s": time.perf_counter() - start, "hash_s": 0.0}
    folder = shaped_folder(cache, name)
    built = False
    if not (folder / "model_index.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cache, prefix=f".{name}-"))
        try:
            try:
                BUILDERS[name](staging, device)  # weights initialised where they are made: seconds on a GPU
            except Exception as exc:  # noqa: BLE001 - built on the CPU instead, only slower
                if device == "cpu":
                    raise
                print(f"   building on {device} failed ({type(exc).__name__}: {exc}); building on the CPU")
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir()
                BUILDERS[name](staging, "cpu")
            staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        built = True
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    model_hash(folder)  # into $FARM_HOME/hashes.json: no run below hashes the files again
    hash_s = time.perf_counter() - start
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / GIB
    print(
        f"   {name}: {'built' if built else 'reused'} {folder} ({size:.2f} GiB) in {build_s:.1f} s, "
        f"hashed in {hash_s:.1f} s"
    )
    return {"ref": str(folder), "built": built, "build_s": build_s, "hash_s": hash_s, "gib": size}


# ---------------------------------------------------------------------------------------
# The job


def job_text(name: str, ref: str, size: int, batch: int, groups: list[tuple[int, int]]) -> str:
    """A job of ``batches`` x ``batch`` tasks per step count, in ``groups`` order (a zip keeps it)."""
    import yaml

    steps: list[int] = []
    for count_steps, batches in groups:
        steps += [count_steps] * (batches * batch)
    count = len(steps)
    return yaml.safe_dump(
        {
            "name": name,
            "model": ref,
            "scheduler": SCHEDULER,
            "defaults": {"width": size, "height": size, "guidance": GUIDANCE, "negative_prompt": NEGATIVE_PROMPT},
            "zip": {
                "steps": steps,
                "prompt": [PROMPTS[i % len(PROMPTS)] for i in range(count)],
                "seed": list(range(1, count + 1)),
            },
        },
        sort_keys=False,
    )


def planned_batches(text: str, batch: int) -> list[Any]:
    """The job's batches as farm render cuts them."""
    from farm.driver import cut_batches
    from farm.spec import parse_job

    return list(cut_batches(parse_job(text).tasks(), batch))


def timed_ids(batches: list[Any], steps: int, timed: int) -> list[str]:
    """The ids of a step count's timed batches: its last ``timed`` ones."""
    return [b.batch_id for b in batches if b.tasks[0].steps == steps][-timed:]


def goal_of(setting: Setting, device: str, steps: int) -> float | None:
    if device != "cuda" or setting.model != GOAL_MODEL or setting.size != GOAL_SIZE:
        return None
    return GOAL_IMAGES_PER_S.get(steps)


def verdict(value: float | None, goal: float | None, below: bool = False) -> str:
    if goal is None or value is None:
        return "-"
    met = value < goal if below else value >= goal
    return ("met" if met else "MISSED") + f" ({'<' if below else '>='} {goal:g})"


# ---------------------------------------------------------------------------------------
# End to end: farm render


def farm_command() -> list[str]:
    """The ``farm`` command beside this interpreter, else the same CLI through it."""
    exe = Path(sys.executable).with_name("farm")
    if exe.is_file():
        return [str(exe)]
    return [sys.executable, "-c", "import sys; from farm.cli import main; sys.exit(main())"]


def render_has_compile() -> bool:
    """Whether this farm's ``farm render`` takes ``--compile``."""
    result = subprocess.run([*farm_command(), "render", "--help"], capture_output=True, text=True, cwd=REPO)
    return "--compile" in result.stdout


class GpuMemory:
    """nvidia-smi's memory.used of GPU 0, polled every 200 ms while inside; peak less the reading before."""

    def __init__(self) -> None:
        self.command = shutil.which("nvidia-smi")
        self.peak_mib: float | None = None
        self.before_mib: float | None = None
        self.process: subprocess.Popen[str] | None = None
        self.thread: threading.Thread | None = None

    def query(self, *extra: str) -> list[str]:
        return [
            self.command or "nvidia-smi",
            "--id=0",
            "--query-gpu=memory.used",
            "--format=csv,noheader,nounits",
            *extra,
        ]

    def __enter__(self) -> GpuMemory:
        if not self.command:
            return self
        try:
            self.before_mib = float(subprocess.run(self.query(), capture_output=True, text=True).stdout.split()[0])
        except (OSError, ValueError, IndexError):
            self.command = None
            return self
        self.process = subprocess.Popen(
            self.query("--loop-ms=200"), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )

        def read() -> None:
            assert self.process is not None and self.process.stdout is not None
            for line in self.process.stdout:
                with contextlib.suppress(ValueError):
                    value = float(line.strip())
                    self.peak_mib = value if self.peak_mib is None else max(self.peak_mib, value)

        self.thread = threading.Thread(target=read, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(5)
        if self.thread is not None:
            self.thread.join(5)

    def peak_gib(self) -> float | None:
        if self.peak_mib is None or self.before_mib is None:
            return None
        return (self.peak_mib - self.before_mib) / 1024


def run_farm(command: list[str], log: Path, timeout: float | None) -> tuple[int, float, bool]:
    """Run ``farm render`` in its own process group, output to ``log``; SIGTERM (then SIGKILL) at ``timeout``."""
    start = time.perf_counter()
    # The repo on the path too, for the actors: they import farm wherever Ray starts them.
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = os.environ | {"PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
    with log.open("w") as fh:
        process = subprocess.Popen(
            command, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True
        )
        timed_out = False
        try:
            rc = process.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            print(f"   timed out after {timeout:.0f} s: stopping it (its finished batches are kept)")
            os.killpg(process.pid, signal.SIGTERM)  # farm render saves its rows and shuts Ray down
            try:
                rc = process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                rc = process.wait()
    return rc, time.perf_counter() - start, timed_out


def batch_ends(job_root: str) -> list[dict[str, Any]]:
    """Each rendered batch's steps, ok images and last created_at (seconds), in created_at order."""
    from farm import manifest

    table = manifest.read_manifest(job_root, columns=["batch_id", "steps", "status", "created_at"])
    batches: dict[str, dict[str, Any]] = {}
    for row in table.to_pylist():
        b = batches.setdefault(row["batch_id"], {"batch_id": row["batch_id"], "steps": row["steps"], "ok": 0, "end": 0})
        b["ok"] += row["status"] == "ok"
        if row["created_at"] is not None:
            b["end"] = max(b["end"], row["created_at"].timestamp())
    return sorted(batches.values(), key=lambda b: b["end"])


def e2e(
    setting: Setting,
    mode: str,
    batch: int,
    ref: str,
    out: Path,
    args: argparse.Namespace,
    budget: Budget,
    estimate: float,
) -> list[dict[str, Any]]:
    """One farm render run of the job at ``batch``, on ``mode``: a result row per step count."""
    from farm.layout import SUMMARY_FILE, read_json

    groups = setting.groups(args.warmup, args.timed)
    name = f"{setting.model}-{mode}-b{batch}"
    job_file = out / f"{name}.yaml"
    text = job_text(name, ref, setting.size, batch, groups)
    job_file.write_text(text)
    batches = planned_batches(text, batch)
    command = [
        *farm_command(),
        "render",
        str(job_file),
        "--out",
        str(out),
        "--actors",
        "1",
        "--batch-size",
        str(batch),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--no-progress",
    ] + (["--compile"] if mode == "compile" else [])
    print("   $ farm " + " ".join(command[len(farm_command()) :]), flush=True)
    # A run that hangs (Ray sees no GPU for the actor, say) is stopped past 3x its estimate (or the budget).
    timeout = max(3 * estimate, 180.0)
    if budget.seconds:
        timeout = min(timeout, max(budget.seconds - budget.elapsed(), 60.0))
    with GpuMemory() as memory:
        rc, wall, timed_out = run_farm(command, out / f"{name}.log", timeout)
    job_root = str(out / name)
    summary = read_json(job_root, SUMMARY_FILE) or {}
    pngs = len(list((out / name / "images").glob("*.png")))
    common = {
        "model": setting.model,
        "mode": mode,
        "batch": batch,
        "size": setting.size,
        "rc": rc,
        "timed_out": timed_out,
        "wall_s": wall,
        "tasks": sum(len(b.tasks) for b in batches),
        "pngs": pngs,
        "peak_gpu_gib": memory.peak_gib(),
        **{k: summary.get(k) for k in ("rendered", "failed", "startup_s", "ray_start_s", "first_image_s", "elapsed_s")},
        "run_images_per_s": summary.get("rendering_images_per_s"),
    }
    first = summary.get("first_image_s")
    startup = summary.get("startup_s")
    common["first_batch_s"] = first - startup if first is not None and startup is not None else None
    if rc != 0:
        tail = (out / f"{name}.log").read_text(errors="replace").splitlines()[-15:]
        print(f"   farm render exited {rc}; its last lines:\n     " + "\n     ".join(tail))
        common["error"] = tail[-1] if tail else f"exit {rc}"
    try:
        ends = batch_ends(job_root)
    except Exception as exc:  # noqa: BLE001 - no manifest: the run failed before any row
        ends = []
        common.setdefault("error", f"manifest: {exc}")
    compile_mode = None
    if mode == "compile" and ends:
        from farm import manifest

        modes = manifest.read_manifest(job_root, columns=["compile_mode"]).column("compile_mode").to_pylist()
        compile_mode = next((m for m in modes if m), None)
        if compile_mode is None:
            print("   note: the rows of this --compile run say compile_mode null: the eager path rendered them")
    common["compile_mode"] = compile_mode
    # Every batch's time after the one before it (the first: none), in render order: stalls show here.
    common["intervals_s"] = [round(b["end"] - a["end"], 4) for a, b in zip(ends[:-1], ends[1:], strict=True)]
    print(
        "   batch intervals, s (created_at after the batch before): "
        + " ".join(f"{v:.2f}" for v in common["intervals_s"])
    )
    results = []
    order = [b["batch_id"] for b in ends]
    for steps, _ in groups:
        row = dict(common, steps=steps)
        ids = timed_ids(batches, steps, args.timed)
        try:
            first_i, last_i = order.index(ids[0]), order.index(ids[-1])
        except ValueError:
            first_i = last_i = -1
        if first_i >= 1 and last_i - first_i + 1 == len(ids):
            seconds = ends[last_i]["end"] - ends[first_i - 1]["end"]
            images = sum(b["ok"] for b in ends[first_i : last_i + 1])
            row.update(
                images_per_s=images / seconds if seconds > 0 else None,
                batch_s=seconds / len(ids),
                timed_images=images,
            )
            if seconds > 0:
                budget.rate[(setting.model, mode)] = images * steps / seconds
        else:
            row.update(images_per_s=None, batch_s=None, timed_images=0)
        row["goal"] = goal_of(setting, args.device, steps)
        results.append(row)
    if startup is not None:
        budget.startup[setting.model] = startup
    steady = results[0].get("batch_s")
    if mode == "compile" and common["first_batch_s"] is not None and steady:
        budget.compile[setting.model] = max(common["first_batch_s"] - steady, 0.0)
    print_e2e(results)
    return results


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def print_e2e(rows: list[dict[str, Any]]) -> None:
    run = rows[0]
    print(
        f"   start-up {fmt(run.get('startup_s'), '.1f')} s (Ray {fmt(run.get('ray_start_s'), '.1f')} s), "
        f"first batch {fmt(run.get('first_batch_s'), '.1f')} s, run {fmt(run.get('elapsed_s'), '.1f')} s "
        f"({fmt(run.get('run_images_per_s'))} images/s after start-up), "
        f"peak GPU {fmt(run.get('peak_gpu_gib'))} GiB over its idle reading, "
        f"{run['pngs']} PNGs, {run.get('rendered')} rendered of {run['tasks']}"
        + (f", compile_mode {run['compile_mode']}" if run.get("compile_mode") else ""),
        flush=True,
    )
    for row in rows:
        print(
            f"   {row['steps']:>3} steps: {fmt(row.get('images_per_s'))} images/s "
            f"({fmt(row.get('batch_s'), '.3f')} s a batch over the timed batches), "
            f"goal {verdict(row.get('images_per_s'), row['goal'])}",
            flush=True,
        )


# ---------------------------------------------------------------------------------------
# Profile: BatchRenderer in this process


class Clock:
    """Marks on the GPU's clock (CUDA events on the current stream) or, on a CPU, perf_counter."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1000.0

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()


class Probe:
    """What the profile records: each render_batch (its end mark) and each component call in it."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.batch = -1  # the render_batch running now (one at a time: BatchRenderer.lock)
        self.batches: list[dict[str, Any]] = []
        self.calls: list[tuple[int, str, Any, Any]] = []  # (batch, kind, start, end)
        self.pngs: list[tuple[str | None, float]] = []  # (batch_id, seconds)
        self.lock = threading.Lock()

    def reset(self) -> None:
        self.batches, self.calls, self.pngs = [], [], []

    def timed(self, kind: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            start = self.clock.mark()
            try:
                return function(*args, **kwargs)
            finally:
                self.calls.append((self.batch, kind, start, self.clock.mark()))

        return call

    def span(self, kind: str, first: Any, last: Any) -> None:
        """Time a module's run from ``first``'s forward to ``last``'s end (forward hooks: farm runs a
        text encoder's submodules itself, never the whole module)."""
        begun: list[Any] = []
        first.register_forward_pre_hook(lambda module, args: begun.append(self.clock.mark()))
        last.register_forward_hook(
            lambda module, args, output: self.calls.append((self.batch, kind, begun.pop(), self.clock.mark()))
        )

    def render_batch(self, function: Callable[..., Any]) -> Callable[..., Any]:
        def call(components: Any, tasks: Any, *args: Any, **kwargs: Any) -> Any:
            self.batch = len(self.batches)
            record = {"steps": tasks[0].steps, "images": len(tasks), "t0": time.perf_counter()}
            try:
                return function(components, tasks, *args, **kwargs)
            finally:
                record["end"] = self.clock.mark()
                record["wall_s"] = time.perf_counter() - record["t0"]
                self.batches.append(record)

        return call

    def write_png(self, function: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                meta = kwargs.get("meta", args[4] if len(args) > 4 else {})
                with self.lock:
                    self.pngs.append((meta.get("batch_id"), time.perf_counter() - start))

        return call


class Timed:
    """A model component that times its calls (and those of its ``methods``) into a probe, and
    forwards everything else to the module, so the render core uses it as it is."""

    def __init__(self, module: Any, kind: str, probe: Probe, methods: tuple[str, ...] = ()) -> None:
        object.__setattr__(self, "_timed", (module, kind, probe, methods))

    def __getattr__(self, name: str) -> Any:
        module, kind, probe, methods = object.__getattribute__(self, "_timed")
        value = getattr(module, name)
        return probe.timed(kind, value) if name in methods else value

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._timed[0], name, value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module, kind, probe, _ = self._timed
        return probe.timed(kind, module)(*args, **kwargs)


@contextlib.contextmanager
def patched(module: Any, name: str, wrap: Callable[[Any], Any]) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, wrap(original))
    try:
        yield
    finally:
        setattr(module, name, original)


def make_renderer(setting: Setting, mode: str, ref: str, out: Path, args: argparse.Namespace, probe: Probe) -> Any:
    """A BatchRenderer as an actor builds it (its components wrapped for the probe), or None when this
    farm's render path has no compile yet."""
    import torch

    from farm.actor import BatchRenderer

    accepted = inspect.signature(BatchRenderer).parameters
    if mode == "compile" and "compile" not in accepted:
        return None
    kwargs: dict[str, Any] = {"dtype": args.dtype, "threads": 1 if args.device == "cpu" else None}
    if "compile" in accepted:
        kwargs["compile"] = mode == "compile"
    name = f"profile-{setting.model}-{mode}"
    if args.device == "cuda":
        torch.cuda.empty_cache()
    # The model as the job's tasks name it (resolved by the spec): a batch for another name would reload it.
    task_ref = planned_batches(job_text(name, ref, setting.size, 1, [(setting.steps[0], 1)]), 1)[0].tasks[0].model
    renderer = BatchRenderer(name, str(out / name), task_ref, **kwargs)
    c = renderer.components
    if mode == "compile" and not (getattr(c, "compile_mode", None) or getattr(c, "channels_last", False)):
        return None
    c.unet = Timed(c.unet, "unet", probe)
    c.vae = Timed(c.vae, "vae", probe, ("decode",))
    for encoder in (c.text_encoder, c.text_encoder_2):
        if encoder is not None:  # the embeddings to the last transformer layer (farm.text runs them)
            text_model = getattr(encoder, "text_model", encoder)
            probe.span("text", text_model.embeddings, text_model.encoder.layers[-1])
    return renderer


def profile(
    setting: Setting,
    mode: str,
    batch: int,
    renderer: Any,
    probe: Probe,
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """Render the job's batches on ``renderer`` as an actor does; the split per step count."""
    import torch

    from farm import outputs, render
    from farm.pool import IN_FLIGHT_PER_ACTOR

    cuda = args.device == "cuda"
    groups = setting.groups(PROFILE_WARMUP, args.timed)
    batches = planned_batches(job_text("profile", renderer.model_ref, setting.size, batch, groups), batch)
    probe.reset()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with (
        patched(render, "render_batch", probe.render_batch),
        patched(outputs, "write_png", probe.write_png),
        ThreadPoolExecutor(IN_FLIGHT_PER_ACTOR, thread_name_prefix="bench-actor-call") as calls,
    ):
        for future in [calls.submit(renderer.render, b) for b in batches]:
            future.result()
    probe.clock.sync()
    wall = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / GIB if cuda else None
    records = probe.batches
    first_gpu: dict[int, Any] = {}
    for index, kind, begin, _ in probe.calls:
        if kind in ("text", "unet"):
            first_gpu.setdefault(index, begin)
    png_threads = renderer.png_pool._max_workers if getattr(renderer, "png_pool", None) else 0
    results = []
    for steps, _ in groups:
        row: dict[str, Any] = {"model": setting.model, "mode": mode, "batch": batch, "size": setting.size}
        row |= {"steps": steps, "peak_alloc_gib": peak, "png_threads": png_threads, "run_s": wall}
        indices = [i for i, r in enumerate(records) if r["steps"] == steps][-args.timed :]
        if len(records) != len(batches):
            row["note"] = f"{len(records)} renders for {len(batches)} batches (an out-of-memory split?)"
        if not indices or indices[0] < 1:
            results.append(row)
            continue
        clock = probe.clock
        wall_ms = clock.ms(records[indices[0] - 1]["end"], records[indices[-1]]["end"])
        idle = sum(clock.ms(records[i - 1]["end"], first_gpu.get(i, records[i]["end"])) for i in indices)
        span = sum(clock.ms(first_gpu.get(i, records[i]["end"]), records[i]["end"]) for i in indices)
        kinds = {
            k: sum(clock.ms(b, e) for i, kind, b, e in probe.calls if i in indices and kind == k)
            for k in ("unet", "vae", "text")
        }
        images = sum(records[i]["images"] for i in indices)
        ids = set(timed_ids(batches, steps, args.timed))
        pngs = [s for batch_id, s in probe.pngs if batch_id in ids]
        row.update(
            batch_s=wall_ms / 1000 / len(indices),
            images_per_s=images / (wall_ms / 1000) if wall_ms > 0 else None,
            unet_share=kinds["unet"] / wall_ms,
            vae_share=kinds["vae"] / wall_ms,
            text_share=kinds["text"] / wall_ms,
            other_share=(span - sum(kinds.values())) / wall_ms,
            idle_share=idle / wall_ms,
            unet_ms_per_step=kinds["unet"] / (steps * len(indices)),
            png_ms_per_image=1000 * sum(pngs) / len(pngs) if pngs else None,
            # PNG seconds over the wall time per PNG thread: past 1, the PNGs cannot keep up with the GPU.
            png_load=sum(pngs) * 1000 / wall_ms / max(png_threads, 1),
            first_batch_s=records[0]["wall_s"],
            goal=goal_of(setting, args.device, steps),
        )
        results.append(row)
        print_profile(row)
    return results


def print_profile(row: dict[str, Any]) -> None:
    pct = lambda v: fmt(None if v is None else 100 * v, ".1f") + "%"  # noqa: E731
    png_where = f"on {row['png_threads']} PNG threads" if row["png_threads"] else "inline"
    print(
        f"   {row['steps']:>3} steps: {fmt(row.get('batch_s'), '.3f')} s a batch, "
        f"{fmt(row.get('images_per_s'))} images/s; "
        f"UNet {pct(row.get('unet_share'))} ({fmt(row.get('unet_ms_per_step'), '.1f')} ms a step), "
        f"VAE decode {pct(row.get('vae_share'))}, text {pct(row.get('text_share'))}, "
        f"other {pct(row.get('other_share'))}, GPU idle between batches {pct(row.get('idle_share'))} "
        f"(goal {verdict(row.get('idle_share'), GOAL_IDLE_SHARE if row.get('goal') else None, below=True)}); "
        f"PNG {fmt(row.get('png_ms_per_image'), '.1f')} ms an image ({png_where}), "
        f"peak allocated {fmt(row.get('peak_alloc_gib'))} GiB, first batch {fmt(row.get('first_batch_s'), '.1f')} s",
        flush=True,
    )


# ---------------------------------------------------------------------------------------
# The run


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, Callable[[dict[str, Any]], str]]]) -> None:
    cells = [[title for title, _, _ in columns]] + [[cell(r) for _, _, cell in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for row in cells:
        print(
            "  ".join(
                c.rjust(w) if align == ">" else c.ljust(w)
                for c, w, (_, align, _) in zip(row, widths, columns, strict=True)
            )
        )


def print_tables(e2e_rows: list[dict[str, Any]], profile_rows: list[dict[str, Any]]) -> None:
    head: list[tuple[str, str, Callable[[dict[str, Any]], str]]] = [
        ("model", "<", lambda r: r["model"]),
        ("path", "<", lambda r: r["mode"]),
        ("size", ">", lambda r: str(r["size"])),
        ("batch", ">", lambda r: str(r["batch"])),
        ("steps", ">", lambda r: str(r["steps"])),
    ]
    if e2e_rows:
        print("\nfarm render, end to end (images/s over the timed batches, from the rows' created_at):")
        table(
            e2e_rows,
            head
            + [
                ("images/s", ">", lambda r: fmt(r.get("images_per_s"))),
                ("s/batch", ">", lambda r: fmt(r.get("batch_s"), ".3f")),
                ("goal", "<", lambda r: verdict(r.get("images_per_s"), r.get("goal"))),
                ("start-up s", ">", lambda r: fmt(r.get("startup_s"), ".1f")),
                ("first batch s", ">", lambda r: fmt(r.get("first_batch_s"), ".1f")),
                ("run s", ">", lambda r: fmt(r.get("elapsed_s"), ".1f")),
                ("peak GPU GiB", ">", lambda r: fmt(r.get("peak_gpu_gib"))),
                ("PNGs", ">", lambda r: f"{r['pngs']}/{r['tasks']}"),
            ],
        )
    rows = [r for r in profile_rows if "batch_s" in r]
    if rows:
        pct = lambda v: fmt(None if v is None else 100 * v, ".1f")  # noqa: E731
        print("\nprofile, in process (shares of the wall time over the timed batches, %):")
        table(
            rows,
            head
            + [
                ("s/batch", ">", lambda r: fmt(r.get("batch_s"), ".3f")),
                ("images/s", ">", lambda r: fmt(r.get("images_per_s"))),
                ("UNet", ">", lambda r: pct(r.get("unet_share"))),
                ("VAE dec", ">", lambda r: pct(r.get("vae_share"))),
                ("text", ">", lambda r: pct(r.get("text_share"))),
                ("other", ">", lambda r: pct(r.get("other_share"))),
                ("GPU idle", ">", lambda r: pct(r.get("idle_share"))),
                (
                    "idle goal",
                    "<",
                    lambda r: verdict(r.get("idle_share"), GOAL_IDLE_SHARE if r.get("goal") else None, True),
                ),
                ("PNG ms/img", ">", lambda r: fmt(r.get("png_ms_per_image"), ".1f")),
                ("peak alloc GiB", ">", lambda r: fmt(r.get("peak_alloc_gib"))),
            ],
        )


def benchmark(args: argparse.Namespace, out: Path, cache: Path, report: dict[str, Any]) -> int:
    import diffusers
    import torch
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device (on a CPU: --device cpu)", file=sys.stderr)
        return 2
    device_name = torch.cuda.get_device_name() if cuda else (platform.processor() or platform.machine())
    has_compile = render_has_compile()
    notes: list[str] = report["notes"]
    settings = settings_for(args)
    report.update(device=device_name, torch=torch.__version__, diffusers=diffusers.__version__)
    print(
        f"device {args.device} ({device_name}), torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"{args.dtype}, {SCHEDULER}, guidance {GUIDANCE}; {args.warmup} warm-up + {args.timed} timed batches "
        f"per step count; farm render --compile: {'yes' if has_compile else 'not in this farm'}; "
        f"budget {f'{args.budget:.0f} s' if args.budget else 'none'}; outputs in {out}"
    )
    for s in settings:
        print(
            f"  {s.model}: {s.size}x{s.size}, steps {','.join(map(str, s.steps))}, "
            f"batches {','.join(map(str, s.batch_sizes))}, {','.join(s.modes)}"
        )
    if not has_compile and any("compile" in s.modes for s in settings):
        note = "farm render has no --compile flag (yet): the compiled settings are skipped"
        print(f"note: {note}")
        notes.append(note)
    budget = Budget(args.budget, notes, report["start"])
    probe = Probe(Clock(cuda))
    stalled = ""  # a run that rendered nothing before its timeout: the others would hang alike
    for setting in settings:
        modes = [m for m in setting.modes if m != "compile" or has_compile]
        plan = PLANS[setting.model]
        cached = setting.model in PRESET_MODELS or (shaped_folder(cache, setting.model) / "model_index.json").is_file()
        if not budget.allows(f"{setting.model}: build", 5.0 if cached else plan.build_s):
            continue
        model = ensure_model(setting.model, cache, args.device)
        report["models"][setting.model] = model
        groups = setting.groups(args.warmup, args.timed)
        renderers: dict[str, Any] = {}
        for batch in setting.batch_sizes:
            for mode in modes if not args.no_e2e else ():
                estimate = budget.startup_s(setting.model) + budget.render_s(setting, mode, batch, groups)
                estimate += budget.compile_s(setting.model) if mode == "compile" else 0.0
                if stalled:
                    continue
                if budget.allows(f"farm render {setting.model} {mode} batch {batch}", estimate):
                    rows = e2e(setting, mode, batch, model["ref"], out, args, budget, estimate)
                    report["e2e"] += rows
                    if rows and rows[0]["timed_out"] and not rows[0]["rendered"]:
                        stalled = (
                            f"farm render {setting.model} {mode} batch {batch} rendered nothing before its timeout"
                        )
                        notes.append(stalled + ": the other farm render runs are skipped")
                        print(f"   {notes[-1]}")
            for mode in modes if not args.no_profile else ():
                estimate = budget.render_s(setting, mode, batch, setting.groups(PROFILE_WARMUP, args.timed))
                estimate += 0.0 if mode in renderers else budget.startup_s(setting.model) / 2
                estimate += budget.compile_s(setting.model) / 2 if mode == "compile" else 0.0
                if not budget.allows(f"profile {setting.model} {mode} batch {batch}", estimate):
                    continue
                if mode not in renderers:
                    start = time.perf_counter()
                    renderers[mode] = make_renderer(setting, mode, model["ref"], out, args, probe)
                    print(f"   BatchRenderer loaded in {time.perf_counter() - start:.1f} s")
                if renderers[mode] is None:
                    note = f"profile {setting.model} {mode}: this farm's render path does not compile yet; skipped"
                    print(f"   {note}")
                    notes.append(note)
                    continue
                report["profile"] += profile(setting, mode, batch, renderers[mode], probe, args)
        for renderer in renderers.values():
            if renderer is not None and getattr(renderer, "png_pool", None):
                renderer.png_pool.shutdown()
        renderers.clear()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    print_tables(report["e2e"], report["profile"])
    for note in notes:
        print(f"note: {note}")
    print(f"\ntotal {budget.elapsed():.0f} s")
    return 0 if all(r["rc"] == 0 for r in report["e2e"]) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # farm's actors and this process's renderer alike
    own_home = not os.environ.get("FARM_HOME")
    if own_home:
        os.environ["FARM_HOME"] = tempfile.mkdtemp(prefix="farm-gpu-farm-home-")
    cache = cache_root(args, own_home)
    own_out = args.out is None
    out = Path(tempfile.mkdtemp(prefix="farm-gpu-farm-")) if own_out else Path(args.out)
    out = out / time.strftime("gpu-farm-%Y%m%d-%H%M%S") if not own_out else out
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "start": START,
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "models": {},
        "e2e": [],
        "profile": [],
        "notes": [],
    }
    try:
        return benchmark(args, out.resolve(), cache, report)
    finally:
        report["total_s"] = time.perf_counter() - report.pop("start")
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1, default=str))
            print(f"figures written to {args.json}")
        if own_out:
            shutil.rmtree(out, ignore_errors=True)
        if own_home:
            shutil.rmtree(os.environ.pop("FARM_HOME"), ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

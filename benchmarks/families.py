"""Model families: the render core's cost on CPU for ``tiny`` (SD 1.x) and ``tiny-xl`` (SDXL), with and without a LoRA.

What it measures. For each preset, in a fresh Python process of its own (so each model's peak RSS
is its own), with ``--threads`` torch threads (default 1, as a CPU actor runs):

- **load**: ``farm.models.load_components`` (cpu, float32), timed twice: the first call in the
  process (it also hashes the model's files into the fresh farm cache) and a second one. The
  pipeline classes are imported before either, so neither includes diffusers' lazy imports.
  Peak RSS after it (``resource.getrusage``: torch and the libraries are most of it).
- **LoRA apply**: ``farm.loras.apply_loras`` with the preset's LoRA the first time (the file is
  read and hashed, its adapter injected), then switching it off and on again (the adapter stays
  loaded: a ``disable_lora`` / ``set_adapters``), and applying the same set again (what an actor does
  before every batch of a job with one LoRA); the median of ``--repeat`` of each.
- **render**: one batch of ``--batch`` tasks (4 prompts in turn, seeds 1..N, a negative prompt,
  euler, guidance 7.5, ``--steps`` steps, at each of ``--sizes``) as an actor renders it:
  ``apply_loras`` for the batch's set, then ``farm.render.render_batch``. Three rows: "no" on a
  copy of the model no adapter was ever loaded into, "yes" with the LoRA at weight 1 on a second
  copy, and "off (loaded)": the plain tasks on that second copy, which still holds the adapter
  (an actor's plain batch after a LoRA batch). One warm-up batch each, then ``--repeat`` rounds of
  the three in turn, so a slow spell of a shared CPU hits each alike: the median batch as images/s
  and ms per image, and the LoRA overhead as the median over rounds of the batch time against
  that round's "no" batch. Peak RSS is the process's maximum after each row's warm-up, so a row's
  figure includes what came before it (both copies of the model, a smaller size, the adapter).

The LoRAs, both rank 4 on the UNet's attention projections and every text encoder's self-attention:
``tiny`` gets the shipped ``jobs/loras/tiny-style.safetensors`` (scripts/make_tiny_lora.py);
``tiny-xl`` gets one built here the same way (peft's ``LoraConfig`` + ``inject_adapter_in_model`` on
a separately built ``tiny-xl``, fixed seeds, saved with ``StableDiffusionXLPipeline.save_lora_weights``
into a temporary folder), so the same bytes every run.

Run: ``python benchmarks/families.py [--sizes 64 [128 ...]] [--steps 10] [--batch 4] [--repeat 20] [--threads 1]``.
``FARM_HOME`` is pointed at a temporary folder (removed at exit) when unset; the presets are built
there first, outside every timed section.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# The grid benchmark's prompts, negative prompt, guidance and CPU check (this script's folder is on sys.path).
from grid_throughput import GUIDANCE, NEGATIVE_PROMPT, PROMPTS, busy_cpus, in_own_farm_home, warn_if_busy

MODELS = ("tiny", "tiny-xl")
SCHEDULER = "euler"
TINY_STYLE = Path(__file__).resolve().parents[1] / "jobs" / "loras" / "tiny-style.safetensors"
# tiny-xl's LoRA, as scripts/make_tiny_lora.py makes tiny-style: rank 4, alpha 4, both factors random
# from fixed seeds, lora_B scaled up so the change is plain to see.
XL_LORA_NAME = "tiny-xl-style.safetensors"
XL_LORA_SEED = 15
RANK = 4
LORA_B_SCALE = 4.0
UNET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]
MIB = 1024**2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64], help="widths = heights in pixels (default 64)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps (default 10)")
    parser.add_argument("--batch", type=int, default=4, help="tasks in a batch (default 4)")
    parser.add_argument("--repeat", type=int, default=20, help="timed batches (and switches); the median is shown")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as a CPU actor)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="presets (default both)")
    # Internal: run one model in this process and print its figures as one JSON line.
    parser.add_argument("--child", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--lora", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("steps", "batch", "repeat", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected at least 1")
    if any(size < 8 or size % 8 for size in args.sizes):
        parser.error("--sizes: expected multiples of 8")
    return args


# ---------------------------------------------------------------------------------------
# The parent: build the presets and tiny-xl's LoRA, run one child per model, print the tables


def make_xl_lora(folder: Path) -> Path:
    """A deterministic LoRA for tiny-xl in diffusers' layout: rank-RANK adapters on the UNet's attention
    and both text encoders' self-attention, injected by peft into a tiny-xl built for the purpose."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    from farm.presets import build_tiny_xl_pipeline

    pipe = build_tiny_xl_pipeline()
    parts = (("unet", UNET_MODULES), ("text_encoder", TEXT_ENCODER_MODULES), ("text_encoder_2", TEXT_ENCODER_MODULES))
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for offset, (part, modules) in enumerate(parts):
        torch.manual_seed(XL_LORA_SEED + offset)
        config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=modules, init_lora_weights=False)
        model = getattr(pipe, part)
        # peft's own injection (transformers' add_adapter insists on a newer peft than diffusers needs).
        inject_adapter_in_model(config, model)
        state = get_peft_model_state_dict(model)
        layers[part] = {k: (v * LORA_B_SCALE if ".lora_B." in k else v).detach().contiguous() for k, v in state.items()}
    StableDiffusionXLPipeline.save_lora_weights(
        folder,
        unet_lora_layers=layers["unet"],
        text_encoder_lora_layers=layers["text_encoder"],
        text_encoder_2_lora_layers=layers["text_encoder_2"],
        weight_name=XL_LORA_NAME,
    )
    return folder / XL_LORA_NAME


def run_child(model: str, lora: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One model's figures, measured in a fresh interpreter."""
    command = [sys.executable, __file__, "--child", model, "--lora", str(lora), "--sizes", *map(str, args.sizes)]
    for name in ("steps", "batch", "repeat", "threads"):
        command += [f"--{name}", str(getattr(args, name))]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{model}: the measuring process failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def benchmark(args: argparse.Namespace) -> int:
    from farm.models import file_sha256
    from farm.presets import ensure_preset

    busy_before = busy_cpus()
    start = time.perf_counter()
    for model in args.models:
        ensure_preset(model)  # built once (on a fresh FARM_HOME) outside every timed section
    build_s = time.perf_counter() - start
    folder = Path(tempfile.mkdtemp(prefix="farm-families-"))
    try:
        loras = {"tiny": TINY_STYLE}
        if "tiny-xl" in args.models:
            loras["tiny-xl"] = make_xl_lora(folder)
        files = {
            m: f"{loras[m].name} ({loras[m].stat().st_size / 1024:.0f} KiB, sha256 {file_sha256(loras[m])[:12]})"
            for m in args.models
        }
        results = {model: run_child(model, loras[model], args) for model in args.models}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    import torch

    print(
        f"model families: {SCHEDULER}, {args.steps} steps, guidance {GUIDANCE}, batch {args.batch}, cpu float32, "
        f"{args.threads} torch thread(s), median of {args.repeat}; torch {torch.__version__}, {os.cpu_count()} CPUs; "
        f"presets ready in {build_s:.1f} s"
    )
    for model in args.models:
        print(f"  {model} LoRA: {files[model]}")

    print()
    print(f"{'model':<8} {'parameters':>11} {'load, first (s)':>16} {'load, again (s)':>16} {'peak RSS (MiB)':>15}")
    for model, r in results.items():
        print(
            f"{model:<8} {r['parameters'] / 1e6:>10.2f}M {r['load_first']:>16.2f} {r['load_again']:>16.2f} "
            f"{r['rss_load'] / MIB:>15.0f}"
        )

    print()
    header = f"{'model':<8} {'first apply (ms)':>17} {'switch off (ms)':>16} {'switch on (ms)':>15}"
    print(f"{header} {'same set (ms)':>14}  LoRA layers")
    for model, r in results.items():
        layers = ", ".join(f"{part} {count}" for part, count in r["lora_layers"].items())
        print(
            f"{model:<8} {r['apply_first'] * 1e3:>17.1f} {r['switch_off'] * 1e3:>16.1f} {r['switch_on'] * 1e3:>15.1f} "
            f"{r['apply_same'] * 1e3:>14.1f}  {layers}"
        )

    print()
    header = f"{'model':<8} {'size':>7} {'LoRA':<12} {'images/s':>9} {'ms/image':>9} {'peak RSS (MiB)':>15}"
    print(f"{header} {'LoRA overhead':>14}")
    for model, r in results.items():
        for size in args.sizes:
            rows = r["render"][str(size)]
            for label in ("no", "yes", "off (loaded)"):
                row = rows[label]
                per_image = row["seconds"] / args.batch
                overhead = "-" if label == "no" else f"{row['overhead'] * 100:+.1f}%"
                print(
                    f"{model:<8} {size:>3}x{size:<3} {label:<12} {1 / per_image:>9.2f} {per_image * 1e3:>9.1f} "
                    f"{row['peak_rss'] / MIB:>15.0f} {overhead:>14}"
                )
    warn_if_busy(busy_before)
    return 0


# ---------------------------------------------------------------------------------------
# The child: one model, in its own process


def peak_rss() -> int:
    """The process's peak resident set size so far, in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def lora_layers(pipeline: Any, name: str) -> dict[str, int]:
    """How many layers of each pipeline component hold adapter ``name`` (as farm.loras.adapted_layers counts)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from farm.loras import LORA_COMPONENTS

    counts = {}
    for part in LORA_COMPONENTS:
        model = getattr(pipeline, part, None)
        if model is not None:
            counts[part] = sum(
                isinstance(layer, BaseTunerLayer) and name in getattr(layer, "lora_A", {}) for layer in model.modules()
            )
    return counts


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Load, LoRA apply and render figures of ``args.child`` (see the module docstring)."""
    import torch

    torch.set_num_threads(args.threads)
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline  # noqa: F401  (lazy imports, untimed)

    from farm.loras import adapter_name, apply_loras
    from farm.models import file_sha256, load_components, resolve_model
    from farm.render import render_batch
    from farm.spec import Lora, RenderTask

    model = resolve_model(args.child)
    start = time.perf_counter()
    plain = load_components(model, "cpu", "float32")
    load_first = time.perf_counter() - start
    del plain
    gc.collect()
    start = time.perf_counter()
    plain = load_components(model, "cpu", "float32")  # never gets an adapter: the "no" rows
    load_again = time.perf_counter() - start
    modules = (plain.unet, plain.vae, plain.text_encoder, plain.text_encoder_2)
    figures: dict[str, Any] = {
        "load_first": load_first,
        "load_again": load_again,
        "parameters": sum(p.numel() for m in modules if m is not None for p in m.parameters()),
        "rss_load": peak_rss(),
        "render": {str(size): {} for size in args.sizes},
    }
    adapted = load_components(model, "cpu", "float32")  # the copy the LoRA goes into: "yes" and "off (loaded)"
    lora = Lora(args.lora, file_sha256(args.lora), 1.0)

    def timed_apply(loras: tuple[Lora, ...]) -> float:
        start = time.perf_counter()
        apply_loras(adapted, loras)
        return time.perf_counter() - start

    def batch(size: int, loras: tuple[Lora, ...]) -> list[RenderTask]:
        return [
            RenderTask(
                args.child,
                SCHEDULER,
                PROMPTS[seed % len(PROMPTS)],
                NEGATIVE_PROMPT,
                seed,
                args.steps,
                GUIDANCE,
                size,
                size,
                loras=loras,
            )
            for seed in range(1, args.batch + 1)
        ]

    def render(components: Any, tasks: list[RenderTask]) -> float:
        start = time.perf_counter()
        apply_loras(components, tasks[0].loras)  # as an actor does before every batch
        render_batch(components, tasks)
        return time.perf_counter() - start

    for size in args.sizes:
        plain_tasks = batch(size, ())
        rows = {
            "no": (plain, plain_tasks),
            "yes": (adapted, batch(size, (lora,))),
            "off (loaded)": (adapted, plain_tasks),
        }
        times: dict[str, list[float]] = {label: [] for label in rows}
        peaks = {}
        for label, (components, tasks) in rows.items():
            if label == "yes" and "apply_first" not in figures:
                figures["apply_first"] = timed_apply((lora,))  # reads the file, injects the adapter
                figures["lora_layers"] = lora_layers(adapted.pipeline, adapter_name(lora.sha256))
                off, on, same = [], [], []
                for _ in range(args.repeat):
                    off.append(timed_apply(()))
                    on.append(timed_apply((lora,)))
                    same.append(timed_apply((lora,)))
                figures["switch_off"], figures["switch_on"] = statistics.median(off), statistics.median(on)
                figures["apply_same"] = statistics.median(same)
            render(components, tasks)  # the warm-up: caches (prompt encoders) and kernels
            peaks[label] = peak_rss()
        for _ in range(args.repeat):  # the rows in turn, so a slow spell of a shared CPU hits each alike
            for label, (components, tasks) in rows.items():
                times[label].append(render(components, tasks))
        for label in rows:
            # The overhead against the plain row of the same round: a slow spell of the CPU cancels out.
            ratios = [t / n for t, n in zip(times[label], times["no"], strict=True)]
            figures["render"][str(size)][label] = {
                "seconds": statistics.median(times[label]),
                "overhead": statistics.median(ratios) - 1,
                "peak_rss": peaks[label],
            }
    return figures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(args)))
        return 0
    return in_own_farm_home(lambda: benchmark(args))


if __name__ == "__main__":
    sys.exit(main())

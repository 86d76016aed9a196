"""GPU render throughput: farm's own render path, without Ray, per model and batch size.

What it measures. For each model and batch size, ``farm.render.render_batch`` renders one
batch of distinct tasks (4 prompts in turn, seeds 1..N, a negative prompt, guidance 7.5,
classifier-free guidance on, so the UNet sees 2N latents per step) on components loaded by
``farm.models.load_components(resolve_model(...), device, dtype)``, exactly as an actor does.
One warm-up batch is rendered first (CUDA kernels chosen, caches filled), then ``--repeat``
batches are timed (``torch.cuda.synchronize`` around them on CUDA). Reported per config:

- **images/s** and **s/image**: images rendered in the timed batches over their wall time
  (prompt encoding, denoising, VAE decode and the copy of the images to the host included);
- **peak GiB**: ``torch.cuda.max_memory_allocated`` over the warm-up and timed batches, reset
  before each config; it includes the model weights (shown once per model as ``weights GiB``).

Models:

- ``tiny``: farm's embedded preset (built on the fly into the farm cache);
- ``sd15-shaped``: Stable Diffusion 1.5's architecture with RANDOM weights (no weights are
  downloaded anywhere): SD 1.5's UNet2DConditionModel, its AutoencoderKL and a 12-layer
  CLIPTextModel (hidden 768, 77 positions, CLIP's 49408-token vocabulary), farm's tiny
  tokenizer and SD's scheduler config. It is saved with ``save_pretrained`` in float16 into a
  temporary folder and loaded through farm's folder loader, so its speed and memory are a real
  SD 1.5 checkpoint's (the images are noise). Building it takes a few GB of host memory.

Run (on a GPU machine): ``python benchmarks/gpu_render.py`` (defaults: cuda, float16, 512x512,
20 steps, batch sizes 1,4,8, both models, euler). On a CPU, for a smoke test:
``python benchmarks/gpu_render.py --device cpu --models tiny --size 64 --steps 4``.
``FARM_HOME`` is pointed at a temporary folder (removed at exit) when unset. ``--json PATH``
also writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# The grid benchmark's prompts, negative prompt and guidance (this script's folder is on sys.path).
from grid_throughput import GUIDANCE, NEGATIVE_PROMPT, PROMPTS

MODELS = ("tiny", "sd15-shaped")
GIB = 1024**3

# Stable Diffusion 1.5's unet/config.json and vae/config.json (runwayml/stable-diffusion-v1-5).
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
# openai/clip-vit-large-patch14's text tower, as SD 1.5's text_encoder/config.json has it.
SD15_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}


def int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("expected positive integers separated by commas")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from farm.spec import SCHEDULERS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="torch device (default cuda)")
    parser.add_argument("--dtype", default=None, help="float16 on cuda, float32 on cpu unless given")
    parser.add_argument("--size", type=int, default=512, help="width and height in pixels (default 512)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    parser.add_argument("--batch-sizes", type=int_list, default=[1, 4, 8], help="comma-separated (default 1,4,8)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--scheduler", default="euler", choices=SCHEDULERS, help="sampler (default euler)")
    parser.add_argument("--repeat", type=int, default=3, help="timed batches per config (default 3)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        parser.error(f"--models: expected some of {', '.join(MODELS)}, got {args.models}")
    if args.size < 8 or args.size % 8:
        parser.error("--size: expected a multiple of 8")
    if args.steps < 1 or args.repeat < 1:
        parser.error("--steps and --repeat: expected at least 1")
    if args.dtype is None:
        args.dtype = "float16" if args.device.startswith("cuda") else "float32"
    return args


def build_sd15_shaped(folder: Path) -> Path:
    """Save an SD 1.5-architecture pipeline with random weights, in float16, into ``folder``."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from farm.presets import build_tiny_pipeline

    tiny = build_tiny_pipeline()  # farm's tokenizer and SD's own scheduler config
    tokenizer = tiny.tokenizer
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET)
    vae = AutoencoderKL(**SD15_VAE)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            **SD15_TEXT,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=tiny.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(dtype=torch.float16)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def make_tasks(ref: str, args: argparse.Namespace, count: int, first_seed: int) -> list[Any]:
    from farm.spec import RenderTask

    return [
        RenderTask(
            model=ref,
            scheduler=args.scheduler,
            prompt=PROMPTS[i % len(PROMPTS)],
            negative_prompt=NEGATIVE_PROMPT,
            seed=first_seed + i,
            steps=args.steps,
            guidance=GUIDANCE,
            width=args.size,
            height=args.size,
        )
        for i in range(count)
    ]


def bench_model(name: str, ref: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Load one model through farm and time every batch size; one result dict per batch size."""
    import torch

    from farm.models import load_components, resolve_model
    from farm.render import render_batch

    cuda = args.device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    components = load_components(resolve_model(ref), args.device, args.dtype)
    sync()
    load_s = time.perf_counter() - start
    weights = torch.cuda.memory_allocated() / GIB if cuda else None
    params = sum(p.numel() for m in (components.unet, components.vae, components.text_encoder) for p in m.parameters())
    print(
        f"\n{name}: {params / 1e6:.0f}M parameters, loaded in {load_s:.1f} s"
        + (f", weights {weights:.2f} GiB on the GPU" if weights is not None else "")
    )
    print(f"{'batch':>5} {'images/s':>9} {'s/image':>8} {'batch s (median)':>17} {'peak GiB':>9}")
    results = []
    for batch in args.batch_sizes:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        images = render_batch(components, make_tasks(ref, args, batch, 1)).images  # warm-up
        sync()
        times = []
        for r in range(args.repeat):
            tasks = make_tasks(ref, args, batch, 1 + batch * (r + 1))
            start = time.perf_counter()
            images = render_batch(components, tasks).images
            sync()
            times.append(time.perf_counter() - start)
        assert images.shape == (batch, args.size, args.size, 3)
        total = sum(times)
        peak = torch.cuda.max_memory_allocated() / GIB if cuda else None
        row = {
            "model": name,
            "batch": batch,
            "images_per_s": batch * args.repeat / total,
            "s_per_image": total / (batch * args.repeat),
            "batch_s_median": statistics.median(times),
            "peak_gib": peak,
            "weights_gib": weights,
            "load_s": load_s,
            "params_m": params / 1e6,
            "mean_pixel": float(images.mean()),
        }
        results.append(row)
        print(
            f"{batch:>5} {row['images_per_s']:>9.3f} {row['s_per_image']:>8.3f} {row['batch_s_median']:>17.3f} "
            f"{(f'{peak:.2f}' if peak is not None else '-'):>9}",
            flush=True,
        )
    del components
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    own_home = not os.environ.get("FARM_HOME")
    if own_home:
        os.environ["FARM_HOME"] = tempfile.mkdtemp(prefix="farm-gpu-bench-")
    work = Path(tempfile.mkdtemp(prefix="farm-gpu-bench-models-"))
    try:
        import diffusers
        import torch
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        if args.device.startswith("cuda"):
            if not torch.cuda.is_available():
                print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
                return 2
            device_name = torch.cuda.get_device_name(args.device)
        else:
            device_name = platform.processor() or platform.machine()
        print(
            f"device {args.device} ({device_name}), torch {torch.__version__}, dtype {args.dtype}, "
            f"{args.size}x{args.size}, {args.steps} steps, {args.scheduler}, guidance {GUIDANCE}, "
            f"{args.repeat} timed batches per config after 1 warm-up"
        )
        results = []
        for name in args.models:
            if name == "tiny":
                ref = "tiny"
            else:
                start = time.perf_counter()
                ref = str(build_sd15_shaped(work / "sd15-shaped"))
                print(f"\nbuilt sd15-shaped (random weights, float16) in {time.perf_counter() - start:.1f} s: {ref}")
            results.extend(bench_model(name, ref, args))
        if args.json:
            meta = {k: v for k, v in vars(args).items() if k != "json"}
            Path(args.json).write_text(
                json.dumps(
                    {"device": device_name, "torch": torch.__version__, "args": meta, "results": results}, indent=1
                )
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if own_home:
            shutil.rmtree(os.environ.pop("FARM_HOME"), ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

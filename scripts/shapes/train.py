"""Train the `shapes` preset: the SD 1.x architecture shrunk like `tiny`, on scripts/shapes/dataset.py's images.

Two stages, then an export, each resumable (kill it at any time and run the same command again):

1. **VAE** (``AutoencoderKL`` with 4 latent channels as SD's, but three levels, so it downsamples by 4
   and a 64x64 image is a (4, 16, 16) latent: at SD's factor 8 a shape is 2-4 latent pixels across and
   the decoder drew blobs, the checker reading 34% of shapes right on its reconstructions): L1 + MSE
   reconstruction, the shape's pixels weighted up (``--vae-shape-weight``), plus a small KL term, on
   fresh images each step.
   Then its latent scale: ``scaling_factor`` = 1 / the std of its latents, as SD's 0.18215 was chosen.
2. **UNet + text encoder** on the frozen VAE's latents: epsilon prediction with SD's scaled-linear betas
   (a ``DDPMScheduler`` from ``tiny``'s scheduler config), min-SNR loss weighting, the caption dropped
   to "" for ``--cfg-drop`` of the samples (what classifier-free guidance needs), an EMA of the weights.
   By default the latents come from a pool of ``--pool`` images encoded once (each drawn with a new
   caption every time it is used); ``--pool 0`` encodes fresh images every step instead.
3. **Export**: a diffusers folder ``StableDiffusionPipeline.save_pretrained`` writes (unet, vae,
   text_encoder, tokenizer, scheduler: ``tiny``'s PNDM config, model_index.json), safetensors, EMA
   weights, plus ``train.json``: this script's config, seed, the steps each stage ran, losses, timings
   and versions.

The tokenizer is farm's (``farm.presets``' byte-level BPE over a small vocabulary), with the captions'
words (``dataset.WORDS``: background, circle, small, top ...) added as whole-word merges after
``TINY_WORDS``'s, so every caption word is one token; ``--tokenizer tiny`` takes tiny's unchanged.

Deterministic from ``--seed``: every model starts from its own seed, step ``s`` of a stage draws its images,
captions, noise and timesteps from generators seeded by (seed, stage, s), so a resumed run sees what an
unbroken one would; the same steps on the same torch and thread count give the same weights. A stage
ends at ``--*-steps`` or after ``--*-minutes`` of its own training time, whichever comes first
(train.json records which); the learning rate follows the planned steps, so set the steps to what the
minutes allow (see README.md) and keep the minutes as a guard.

    nice -n 10 .venv/bin/python scripts/shapes/train.py --out out/shapes --threads 2
    # smoke: .venv/bin/python scripts/shapes/train.py --out /tmp/shapes-smoke --vae-steps 20 --unet-steps 20 --pool 64
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: make `scripts.shapes` (and an uninstalled farm) importable
    sys.path.insert(0, str(ROOT))

from scripts.shapes import dataset  # noqa: E402
from scripts.shapes.components import (  # noqa: E402
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
    parameters,
    tiny_scheduler,
)
from scripts.shapes.loop import (  # noqa: E402
    STAGES,
    Images,
    learning_rate,
    on_sigterm,
    step_generators,
    to_tensor,
    train_loop,
)

DEFAULT_SEED = 20240917
SCALE_IMAGES = 512  # images whose latents set the VAE's scaling_factor
VAE_EVAL_IMAGES = 256


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="the diffusers folder to write (replaced when the run ends)")
    p.add_argument("--work", help="checkpoints and the trained VAE (default: <out>.work); keep it to resume")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--resolution", type=int, default=64, choices=dataset.RESOLUTIONS)
    p.add_argument(
        "--shapes", default=",".join(dataset.DEFAULT_SHAPES), help="comma-separated, of " + ",".join(dataset.SHAPES)
    )
    p.add_argument(
        "--tokenizer",
        choices=("shapes", "tiny"),
        default="shapes",
        help="farm's BPE with the caption words (default) or tiny's",
    )
    # Architecture (what the preset ships; recorded in train.json).
    p.add_argument(
        "--vae-channels",
        default="32,64,64",
        help="VAE block_out_channels: 3 levels = factor 4, 4 levels = factor 8 (tiny: 16,16,32,32)",
    )
    p.add_argument("--unet-channels", default="32,64,128", help="UNet block_out_channels (tiny: 32,64)")
    p.add_argument("--unet-attention", default="0,1,1", help="per UNet level, 1 = cross-attention block (tiny: 1,0)")
    p.add_argument("--unet-layers", type=int, default=1, help="UNet layers_per_block (tiny: 1)")
    p.add_argument(
        "--text-width", type=int, default=64, help="text encoder hidden size = UNet cross_attention_dim (tiny: 32)"
    )
    p.add_argument("--text-layers", type=int, default=2, help="text encoder layers (tiny: 2)")
    # Stage 1: the VAE.
    p.add_argument("--vae-steps", type=int, default=3000)
    p.add_argument("--vae-minutes", type=float, default=30.0)
    p.add_argument("--vae-batch", type=int, default=8)
    p.add_argument(
        "--vae-lr", type=float, default=1e-4, help="peak learning rate (1e-3 and 3e-4 learned slower in trials)"
    )
    p.add_argument("--vae-warmup", type=int, default=20, help="steps of linear learning-rate warm-up")
    p.add_argument("--kl-weight", type=float, default=1e-6, help="times the KL summed over the latent, as SD's VAE")
    p.add_argument(
        "--vae-shape-weight",
        type=float,
        default=10.0,
        help="extra weight of the shape's pixels (and 2 px around) in the reconstruction loss (0: plain)",
    )
    # Stage 2: the UNet (and text encoder).
    p.add_argument("--unet-steps", type=int, default=7000)
    p.add_argument("--unet-minutes", type=float, default=55.0)
    p.add_argument("--unet-batch", type=int, default=32)
    p.add_argument("--unet-lr", type=float, default=3e-4)
    p.add_argument("--unet-warmup", type=int, default=100, help="steps of linear learning-rate warm-up")
    p.add_argument("--freeze-text", action="store_true", help="keep the text encoder at its random init")
    p.add_argument(
        "--offset-noise",
        type=float,
        default=0.1,
        help="std of a per-image, per-channel constant added to the training noise (0: plain)",
    )
    p.add_argument("--offset-noise-from", type=int, default=4500, help="the UNet step the offset noise starts at")
    p.add_argument("--cfg-drop", type=float, default=0.1, help="fraction of captions replaced by '' (unconditional)")
    p.add_argument("--min-snr", type=float, default=5.0, help="min-SNR-gamma loss weighting; 0 for plain MSE")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the exported UNet and text encoder; 0: none")
    p.add_argument("--pool", type=int, default=16384, help="images encoded once for stage 2; 0: fresh images each step")
    # Running.
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--workers", type=int, default=0, help="processes drawing images ahead (0: drawn inline; a GPU run wants 8+)"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--save-dtype", choices=("float32", "float16"), default="float32", help="of the exported weights")
    p.add_argument("--checkpoint-minutes", type=float, default=3.0)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument(
        "--stage", choices=("all", "vae", "unet"), default="all", help="stop after this stage (all: export too)"
    )
    args = p.parse_args(argv)
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    if not args.shapes or any(s not in dataset.SHAPES for s in args.shapes):
        p.error(f"--shapes: expected some of {', '.join(dataset.SHAPES)}")
    args.vae_channels = [int(c) for c in args.vae_channels.split(",")]
    args.unet_channels = [int(c) for c in args.unet_channels.split(",")]
    args.unet_attention = [bool(int(c)) for c in args.unet_attention.split(",")]
    if len(args.vae_channels) not in (3, 4):
        p.error("--vae-channels: three levels (the latent is H/4 x W/4) or four (H/8 x W/8)")
    if len(args.unet_attention) != len(args.unet_channels):
        p.error("--unet-attention: one flag per UNet level")
    args.work = args.work or str(Path(args.out).with_name(Path(args.out).name + ".work"))
    return args


# The settings that fix the trained weights: a checkpoint made under others is not resumed.
ARCHITECTURE_KEYS = (
    "seed resolution shapes tokenizer vae_channels unet_channels unet_attention unet_layers text_width "
    "text_layers vae_batch vae_lr vae_warmup kl_weight vae_shape_weight unet_batch unet_lr unet_warmup freeze_text "
    "cfg_drop min_snr ema pool"
).split()


def recorded_config(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in ("out", "work", "log_every", "checkpoint_minutes")}


def load_state(checkpoint: Path, args: argparse.Namespace) -> dict[str, Any]:
    if not checkpoint.is_file():
        return {}
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    theirs = {k: state["config"].get(k) for k in ARCHITECTURE_KEYS}
    ours = {k: recorded_config(args).get(k) for k in ARCHITECTURE_KEYS}
    if theirs != ours:
        changed = {k: (theirs[k], ours[k]) for k in ARCHITECTURE_KEYS if theirs[k] != ours[k]}
        raise SystemExit(f"{checkpoint} was made with other settings {changed}; use another --work or delete it")
    return state


# ---------------------------------------------------------------------------------------
# Stage 1: the VAE


def shape_weights(pixels: np.ndarray, drawn: Sequence[dataset.Attributes], extra: float) -> torch.Tensor:
    """Per-pixel loss weights (N, 1, H, W): 1 + ``extra`` on the shape and 2 px around it, else 1.

    A shape covers 3-15% of its image, so a plain mean over pixels is mostly background: the decoder learns
    flat colour first and the shape's outline last. After 3000 plain steps it drew blobs, and the checker read
    34% of shapes right on its reconstructions (background 100%)."""
    background = np.array([a.background_rgb for a in drawn], dtype=np.int16)[:, None, None, :]
    differs = (np.abs(pixels.astype(np.int16) - background).max(axis=-1) > 8).astype(np.float32)
    mask = torch.nn.functional.max_pool2d(torch.from_numpy(differs)[:, None], 5, stride=1, padding=2)
    return 1.0 + extra * mask


def train_vae(args: argparse.Namespace, work: Path, images: Images) -> tuple[Any, dict[str, Any]]:
    from diffusers import AutoencoderKL

    folder = work / "vae"
    record_file = work / "vae.json"
    if (folder / "config.json").is_file() and record_file.is_file():
        done = json.loads(record_file.read_text())
        # Trained as far as asked (or as long as allowed): reuse it. Asked for more: go on from its checkpoint.
        if done["steps"] >= args.vae_steps or done["train_seconds"] >= args.vae_minutes * 60:
            print(f"[vae] trained already ({done['steps']} steps): {folder}", flush=True)
            return AutoencoderKL.from_pretrained(folder).to(args.device).eval(), done
    vae = build_vae(args).to(args.device).train()
    print(f"[vae] {parameters(vae) / 1e6:.2f}M parameters, channels {args.vae_channels}", flush=True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    checkpoint = work / "vae.pt"
    state = load_state(checkpoint, args)
    if state:
        vae.load_state_dict(state["vae"])
        optimizer.load_state_dict(state["optimizer"])
    data_seed = args.seed + STAGES["vae"]

    def step_fn(step: int) -> dict[str, float]:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args.vae_lr, step, args.vae_steps, args.vae_warmup)
        pixels, _, drawn = images.batch(
            lambda s: (data_seed, s * args.vae_batch, args.vae_batch, args.resolution, tuple(args.shapes)), step
        )
        _, generator = step_generators(args.seed, "vae", step)
        x = to_tensor(pixels, args.device)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(args.device)
        y = vae.decode(z).sample
        weight = shape_weights(pixels, drawn, args.vae_shape_weight).to(args.device)
        l1 = (weight * (y - x).abs()).mean()
        mse = (weight * (y - x).pow(2)).mean()
        kl = posterior.kl().mean()
        loss = l1 + mse + args.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        return {"loss": loss.item(), "l1": l1.item(), "kl": kl.item()}

    record = train_loop(
        "vae",
        args,
        args.vae_steps,
        args.vae_minutes,
        step_fn,
        state,
        checkpoint,
        lambda: {"vae": vae.state_dict(), "optimizer": optimizer.state_dict(), "config": recorded_config(args)},
    )
    vae.eval()
    record.update(vae_measures(vae, args, images))
    vae.register_to_config(scaling_factor=record["scaling_factor"])
    staging = work / "vae.staging"
    shutil.rmtree(staging, ignore_errors=True)
    vae.save_pretrained(staging, safe_serialization=True)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    record_file.write_text(json.dumps(record, indent=1))
    checked = ", ".join(f"{k} {100 * v:.1f}%" for k, v in record["checker_on_reconstructions"].items())
    print(
        f"[vae] done: {record['steps']} steps, reconstruction L1 {record['eval_l1']:.4f} "
        f"(PSNR {record['eval_psnr']:.1f} dB), latent std {record['latent_std']:.3f} -> "
        f"scaling_factor {record['scaling_factor']}; the checker on {VAE_EVAL_IMAGES} reconstructions: {checked}",
        flush=True,
    )
    return vae, record


@torch.no_grad()
def vae_measures(vae: Any, args: argparse.Namespace, images: Images) -> dict[str, Any]:
    """The latent scale (1 / std of sampled latents, SD's recipe), held-out reconstruction error, and the
    checker's pass rates on reconstructions: the most the UNet can reach through this VAE."""
    from scripts.shapes import checker

    seed = args.seed + STAGES["scale"]
    latents, l1s, mses, verdicts = [], [], [], []
    jobs = [(seed, start, 64, args.resolution, tuple(args.shapes)) for start in range(0, SCALE_IMAGES, 64)]
    for (_, start, *_), (pixels, _, drawn) in zip(jobs, images.each(jobs), strict=True):
        x = to_tensor(pixels, args.device)
        posterior = vae.encode(x).latent_dist
        _, generator = step_generators(args.seed, "scale", start)
        latents.append(
            posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(args.device)
        )
        if start < VAE_EVAL_IMAGES:
            y = vae.decode(posterior.mean).sample.clamp(-1, 1)
            l1s.append((y - x).abs().mean().item())
            mses.append(((y - x) / 2).pow(2).mean().item())
            pixels = ((y + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            for image, a in zip(pixels, drawn, strict=True):
                truth = {k: getattr(a, k) for k in checker.ATTRIBUTES}
                verdicts.append(checker.check(image, truth, args.shapes))
    std = torch.cat(latents).float().std().item()
    mse = float(np.mean(mses))
    return {
        "latent_std": std,
        "latent_mean": torch.cat(latents).float().mean().item(),
        "scaling_factor": float(f"{1.0 / std:.5g}"),
        "eval_l1": float(np.mean(l1s)),
        "eval_psnr": 10 * math.log10(1.0 / mse) if mse > 0 else float("inf"),
        "checker_on_reconstructions": {k: p / n for k, (p, n) in checker.pass_rates(verdicts).items()},
    }


# ---------------------------------------------------------------------------------------
# Stage 2: the UNet and text encoder


class Captions:
    """Token ids (77, padded as farm's text encoder pads) per caption, cached."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[str, torch.Tensor] = {}

    def ids(self, captions: Sequence[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            encoded = self.tokenizer(missing, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            for caption, row in zip(missing, encoded.input_ids, strict=True):
                self.cache[caption] = row
        return torch.stack([self.cache[c] for c in captions])


@torch.no_grad()
def encode_pool(
    vae: Any, args: argparse.Namespace, images: Images
) -> tuple[torch.Tensor, torch.Tensor, list[dataset.Attributes]]:
    """The latents' means and stds (on the CPU) and the attributes of the pool's images."""
    seed = args.seed + STAGES["unet"]
    means, stds, attributes = [], [], []
    start_time = time.perf_counter()
    jobs = [(seed, s, min(64, args.pool - s), args.resolution, tuple(args.shapes)) for s in range(0, args.pool, 64)]
    for pixels, _, drawn in images.each(jobs):
        posterior = vae.encode(to_tensor(pixels, args.device)).latent_dist
        means.append(posterior.mean.float().cpu())
        stds.append(posterior.std.float().cpu())
        attributes.extend(drawn)
    print(f"[unet] pool of {args.pool} images encoded in {time.perf_counter() - start_time:.0f} s", flush=True)
    return torch.cat(means), torch.cat(stds), attributes


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p, 1 - decay)


def train_unet(
    args: argparse.Namespace, work: Path, vae: Any, vae_record: dict[str, Any], images: Images
) -> tuple[Any, Any, Any, dict[str, Any]]:
    from diffusers import DDPMScheduler

    tokenizer = build_tokenizer(args.tokenizer)
    text_encoder = build_text_encoder(args, tokenizer).to(args.device)
    unet = build_unet(args).to(args.device)
    text_encoder.train(not args.freeze_text).requires_grad_(not args.freeze_text)
    unet.train()
    ema_unet = copy.deepcopy(unet).eval().requires_grad_(False) if args.ema else unet
    ema_text = (
        copy.deepcopy(text_encoder).eval().requires_grad_(False) if args.ema and not args.freeze_text else text_encoder
    )
    print(
        f"[unet] UNet {parameters(unet) / 1e6:.2f}M parameters, text encoder {parameters(text_encoder) / 1e6:.2f}M "
        f"({'frozen' if args.freeze_text else 'trained'}), vocabulary {len(tokenizer)}",
        flush=True,
    )
    trained = list(unet.parameters()) + ([] if args.freeze_text else list(text_encoder.parameters()))
    optimizer = torch.optim.AdamW(trained, lr=args.unet_lr, weight_decay=0.01)
    checkpoint = work / "unet.pt"
    state = load_state(checkpoint, args)
    # The offset noise starts at a step, so a checkpoint from before it resumes into it; one from after it must
    # have trained with the same offset.
    made = state.get("config", {})
    if state.get("step", 0) > args.offset_noise_from and (made.get("offset_noise"), made.get("offset_noise_from")) != (
        args.offset_noise,
        args.offset_noise_from,
    ):
        raise SystemExit(f"{checkpoint} was trained past step {args.offset_noise_from} with another offset noise")
    if state and state.get("vae_steps") != vae_record["steps"]:
        raise SystemExit(
            f"{checkpoint} was trained on the latents of a VAE of {state.get('vae_steps')} steps, not "
            f"{vae_record['steps']}: delete it to train the UNet again on this VAE"
        )
    if state:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        ema_unet.load_state_dict(state["ema_unet"])
        ema_text.load_state_dict(state["ema_text"])
        optimizer.load_state_dict(state["optimizer"])
    noise_scheduler = DDPMScheduler.from_config(tiny_scheduler().config)
    alphas = noise_scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    scale = vae.config.scaling_factor
    captions = Captions(tokenizer)
    vae.eval().requires_grad_(False)
    pool = encode_pool(vae, args, images) if args.pool and state.get("step", 0) < args.unet_steps else None
    data_seed = args.seed + STAGES["unet"]

    def step_fn(step: int) -> dict[str, float]:
        lr = learning_rate(args.unet_lr, step, args.unet_steps, args.unet_warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rng, generator = step_generators(args.seed, "unet", step)
        if pool is not None:
            means, stds, attributes = pool
            index = torch.from_numpy(rng.integers(len(attributes), size=args.unet_batch))
            eps = torch.randn(means[index].shape, generator=generator)
            latents = (means[index] + stds[index] * eps).to(args.device) * scale
            texts = [dataset.recaption(attributes[int(i)], rng) for i in index]
        else:
            pixels, texts, _ = images.batch(
                lambda s: (data_seed, s * args.unet_batch, args.unet_batch, args.resolution, tuple(args.shapes)), step
            )
            with torch.no_grad():
                posterior = vae.encode(to_tensor(pixels, args.device)).latent_dist
                eps = torch.randn(posterior.mean.shape, generator=generator).to(args.device)
                latents = (posterior.mean + posterior.std * eps) * scale
        drop = rng.random(len(texts)) < args.cfg_drop
        texts = ["" if d else t for d, t in zip(drop, texts, strict=True)]
        noise = torch.randn(latents.shape, generator=generator).to(args.device)
        if args.offset_noise and step >= args.offset_noise_from:
            # At 16x16 latents the last timestep keeps enough signal (sqrt(alpha_bar) 0.07) that an image's mean
            # colour shows through the noise: trained on plain noise the model read the background from it and
            # never from the prompt (background right in 11% of renders from pure noise, chance is 12.5%).
            # A constant offset per channel hides it (Guttenberg's offset noise).
            offset = torch.randn((*latents.shape[:2], 1, 1), generator=generator).to(args.device)
            noise = noise + args.offset_noise * offset
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(texts),), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps.to(args.device))
        with torch.set_grad_enabled(not args.freeze_text):
            hidden = text_encoder(captions.ids(texts).to(args.device)).last_hidden_state
        prediction = unet(noisy, timesteps.to(args.device), hidden).sample
        per_sample = (prediction.float() - noise.float()).pow(2).mean(dim=(1, 2, 3))
        if args.min_snr:
            s = snr[timesteps]
            per_sample = per_sample * (torch.clamp(s, max=args.min_snr) / s).to(per_sample.device)
        loss = per_sample.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        if args.ema:
            decay = min(args.ema, (1 + step) / (10 + step))
            ema_update(ema_unet, unet, decay)
            if not args.freeze_text:
                ema_update(ema_text, text_encoder, decay)
        return {"loss": loss.item()}

    record = train_loop(
        "unet",
        args,
        args.unet_steps,
        args.unet_minutes,
        step_fn,
        state,
        checkpoint,
        lambda: {
            "unet": unet.state_dict(),
            "text_encoder": text_encoder.state_dict(),
            "ema_unet": ema_unet.state_dict(),
            "ema_text": ema_text.state_dict(),
            "optimizer": optimizer.state_dict(),
            "config": recorded_config(args),
            "vae_steps": vae_record["steps"],
        },
    )
    # A fresh tokenizer: encoding captions leaves padding and truncation set on the fast tokenizer's
    # backend, and save_pretrained would write them into tokenizer.json.
    return ema_unet.eval(), ema_text.eval(), build_tokenizer(args.tokenizer), record


# ---------------------------------------------------------------------------------------
# Export


def export(args: argparse.Namespace, vae: Any, unet: Any, text_encoder: Any, tokenizer: Any, records: dict) -> Path:
    import diffusers
    import transformers
    from diffusers import StableDiffusionPipeline

    out = Path(args.out)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=tiny_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to("cpu")
    if args.save_dtype == "float16":
        pipe.to(torch.float16)
    staging = out.with_name(f".{out.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(staging, safe_serialization=True)
    record = {
        "what": "the `shapes` preset, trained by scripts/shapes/train.py (issue 17)",
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "config": recorded_config(args),
        "native_size": [args.resolution, args.resolution],
        "vocabulary": {
            "shapes": args.shapes,
            "colours": list(dataset.COLOURS),
            "backgrounds": list(dataset.BACKGROUNDS),
            "sizes": list(dataset.SIZES),
            "positions": list(dataset.POSITIONS),
            "caption": "a [size] <colour> <shape> [on a <colour> background][, <position>]",
        },
        "parameters": {
            "unet": parameters(unet),
            "vae": parameters(vae),
            "text_encoder": parameters(text_encoder),
        },
        "stages": records,
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "device": args.device,
        },
    }
    (staging / "train.json").write_text(json.dumps(record, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"[export] {out}: {size / 1e6:.1f} MB", flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    signal.signal(signal.SIGTERM, on_sigterm)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps(recorded_config(args), indent=1) + "\n")
    started = time.perf_counter()
    images = Images(args.workers)
    try:
        vae, vae_record = train_vae(args, work, images)
        if args.stage == "vae":
            return
        unet, text_encoder, tokenizer, unet_record = train_unet(args, work, vae, vae_record, images)
        if args.stage == "unet":
            return
    finally:
        images.close()
    records = {"vae": vae_record, "unet": unet_record, "wall_seconds_this_run": round(time.perf_counter() - started, 1)}
    export(args, vae, unet, text_encoder, tokenizer, records)


if __name__ == "__main__":
    main()

"""The opt-in compiled render path (``farm render --compile``): channels_last and torch.compile for the
UNet and the VAE decoder, recorded in rows and PNGs, rebuilt by ``farm reproduce``.

On a CPU these tests compile with the ``aot_eager`` backend ($FARM_COMPILE_BACKEND, set below at
import, so before the session's Ray starts and its actors see it too): dynamo and AOTAutograd trace
and compile the graphs as for inductor, but no C++ is generated, which takes inductor minutes a shape
on a small CPU (docs/reproducibility.md). Rows then record compile_mode "aot_eager". The inductor
path itself runs in ``test_inductor_on_cpu`` (opt-in, FARM_TEST_INDUCTOR=1) and ``test_compiled_on_cuda``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from farm import compiled as compiled_path
from farm import models
from farm.actor import BatchRenderer
from farm.compiled import COMPILE_BACKEND_ENV, CompileError, compile_mode
from farm.images import encode_png, read_png_metadata
from farm.models import ModelError, load_components, render_path, resolve_model
from farm.spec import Batch, ControlNetUnit, GuidanceLoss, Lora, RenderTask

os.environ.setdefault(COMPILE_BACKEND_ENV, "aot_eager")

# Largest per-channel difference (out of 255) between a compiled and an eager render of the same batch:
# channels_last convolutions and fused kernels sum in another order (measured on tiny, CPU: 1, with
# aot_eager and with inductor).
COMPILED_TOLERANCE = 2
TINY_STYLE = Path(__file__).resolve().parents[1] / "jobs" / "loras" / "tiny-style.safetensors"
JOB = """
name: compiled
model: tiny
scheduler: euler
defaults: {negative_prompt: blurry, steps: 4, guidance: 7.5, width: 64, height: 64}
sweep:
  prompt: [a cute shiba inu, a red car]
"""


def task(prompt: str = "a cute shiba inu", seed: int = 1, **kw) -> RenderTask:
    fields = {"negative_prompt": "blurry", "steps": 4, "guidance": 7.5, "width": 64, "height": 64} | kw
    return RenderTask(model="tiny", scheduler="euler", prompt=prompt, seed=seed, **fields)


def largest_difference(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


@pytest.fixture(scope="module")
def compiled(tiny_path):
    """tiny loaded with --compile's path; its graphs compile at each test's first call of a shape."""
    return load_components(resolve_model("tiny"), "cpu", "float32", compile=True)


@pytest.fixture(scope="module")
def eager(tiny_path):
    """A fresh eager tiny (LoRA adapters loaded here never reach the session's tiny_components)."""
    return load_components(resolve_model("tiny"), "cpu", "float32")


def test_compile_mode_per_device_and_as_recorded(monkeypatch):
    monkeypatch.delenv(COMPILE_BACKEND_ENV, raising=False)
    assert compile_mode("cpu", False) is None and compile_mode("cuda", None) is None
    assert compile_mode("cpu", True) == compiled_path.CPU_COMPILE_MODE == "default"
    assert compile_mode("cuda", True) == compiled_path.CUDA_COMPILE_MODE
    assert compile_mode("cpu", "reduce-overhead") == "reduce-overhead"  # a recorded mode is taken as it is
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "aot_eager")
    assert compile_mode("cuda", True) == "aot_eager"
    with pytest.raises(CompileError, match="compile mode 'fast' is not one farm knows"):
        compile_mode("cpu", "fast")
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "tvm")
    with pytest.raises(CompileError, match=f"{COMPILE_BACKEND_ENV}='tvm'"):
        compile_mode("cpu", True)


def test_an_unknown_recorded_mode_is_a_model_error_before_loading(tiny_path, monkeypatch):
    monkeypatch.setattr(models, "load_pipeline", lambda *a: pytest.fail("loaded the model"))
    with pytest.raises(ModelError, match=r"^model 'tiny': compile mode 'fast' is not one farm knows \("):
        load_components(resolve_model("tiny"), "cpu", "float32", compile="fast")


def test_an_eager_load_records_the_eager_path(tiny_components):
    assert render_path(tiny_components) == {
        "compile_mode": None,
        "channels_last": False,
        "torch_version": torch.__version__,
        "triton_version": None,
        "gpu_name": None,
        "cuda_version": None,
        "cudnn_version": None,
    }


def test_a_compiled_load_sets_the_path_and_compiles_in_place(compiled):
    assert (compiled.compile_mode, compiled.channels_last) == (compile_mode("cpu", True), True)
    path = render_path(compiled)
    assert (path["compile_mode"], path["channels_last"], path["triton_version"]) == (compiled.compile_mode, True, None)
    channels_last = torch.channels_last
    assert compiled.unet.conv_in.weight.is_contiguous(memory_format=channels_last)
    assert compiled.vae.decoder.conv_in.weight.is_contiguous(memory_format=channels_last)
    # nn.Module.compile: the modules stay themselves (config, dtype, LoRA adapters), their calls compiled
    assert compiled.unet._compiled_call_impl is not None and compiled.vae.decoder._compiled_call_impl is not None
    assert compiled.vae._compiled_call_impl is None  # vae.encode (img2img) stays eager


def test_compiled_images_are_close_to_eager_and_repeat_exactly(compiled, eager):
    tasks = [task(seed=1), task("a red car", seed=2)]
    reference = render_batch(eager, tasks)
    first = render_batch(compiled, tasks)
    assert largest_difference(first, reference) <= COMPILED_TOLERANCE
    assert np.array_equal(render_batch(compiled, tasks), first)  # the second call runs the compiled graphs


def test_img2img_and_a_guidance_loss_through_the_compiled_decoder(compiled, eager):
    """vae.encode on channels_last weights, and a loss's gradient through the compiled decoder."""
    blue = GuidanceLoss(name="color", target=(None, None, 0.9), scale=2000.0, every=1)
    fields = {"init_image": "x.png", "init_image_sha256": "0" * 64, "strength": 0.5, "start_step": 2}
    tasks = [task(seed=1, guidance_loss=blue, **fields), task("a red car", seed=2, guidance_loss=blue, **fields)]
    init = [np.full((64, 64, 3), (200, 40, 30), np.uint8), np.full((64, 64, 3), (20, 160, 90), np.uint8)]
    reference = render_batch(eager, tasks, init)
    assert largest_difference(render_batch(compiled, tasks, init), reference) <= COMPILED_TOLERANCE
    plain = render_batch(eager, [task(seed=1), task("a red car", seed=2)])
    assert largest_difference(reference, plain) > 10  # the init images and the loss steered


def test_a_lora_and_a_controlnet_with_the_compiled_unet(compiled, eager):
    """A LoRA's adapters go into the compiled UNet (it compiles again), a ControlNet's residuals into its call."""
    from farm.controlnets import load_controlnets
    from farm.loras import apply_loras
    from farm.render import render_batch as render_core

    style = Lora(str(TINY_STYLE), models.file_sha256(TINY_STYLE), 0.8)
    unit = ControlNetUnit(model="tiny-controlnet", image="x.png", image_sha256="0" * 64, scale=1.0)
    tasks = [
        task(seed=1, loras=(style,), controlnet=(unit,)),
        task("a red car", seed=2, loras=(style,), controlnet=(unit,)),
    ]
    blocks = np.random.default_rng(7).integers(0, 256, (4, 4, 3), dtype=np.uint8).repeat(16, 0).repeat(16, 1)
    images = {}
    for name, components in (("eager", eager), ("compiled", compiled)):
        apply_loras(components, tasks[0].loras, False)
        controlnets = load_controlnets(components, tasks[0].controlnet_models)
        images[name] = render_core(components, tasks, controlnets=controlnets, control_images=[[blocks]] * 2).images
        apply_loras(components, (), False)
    assert largest_difference(images["compiled"], images["eager"]) <= COMPILED_TOLERANCE
    assert largest_difference(images["eager"], render_batch(eager, [task(seed=1), task("a red car", seed=2)])) > 10


def render_batch(components, tasks: list[RenderTask], init: list | None = None) -> np.ndarray:
    from farm.render import render_batch as render_core

    return render_core(components, tasks, init).images


# ---------------------------------------------------------------------------------------
# farm reproduce rebuilds the recorded path (load_components stubbed: eager math, the path recorded)


@pytest.fixture
def loads(monkeypatch) -> list:
    """Every load_components call's ``compile``; the model loads eager but says it took that path,
    so rows and PNGs record it without a compile's wait."""
    calls = []
    real = models.load_components

    def load(model, device, dtype, safety_checker=False, compile=False):
        calls.append(compile)
        components = real(model, device, dtype, safety_checker)
        components.compile_mode = compile_mode(device, compile)
        components.channels_last = components.compile_mode is not None
        return components

    monkeypatch.setattr(models, "load_components", load)
    return calls


def recorded_job(root: Path, compile: bool | str) -> tuple[Path, list[RenderTask]]:
    from farm import manifest

    tasks = [task(seed=1), task("a red car", seed=2)]
    threads = torch.get_num_threads()
    try:
        renderer = BatchRenderer("compiled", str(root), "tiny", threads=1, compile=compile)
        manifest.write_part(str(root), renderer.render(Batch.of(tasks)))
    finally:
        torch.set_num_threads(threads)
    return root, tasks


@pytest.mark.parametrize("recorded", ["default", False], ids=["compiled", "eager"])
def test_reproduce_loads_the_recorded_path(tiny_path, tmp_path, loads, recorded):
    from farm.manifest import read_manifest
    from farm.reproduce import reproduce_image, reproduce_task

    root, tasks = recorded_job(tmp_path / "job", recorded)
    rows = read_manifest(str(root)).to_pylist()
    assert {(r["compile_mode"], r["channels_last"]) for r in rows} == {(recorded or None, bool(recorded))}
    png = root / "images" / f"{tasks[1].task_id}.png"
    meta = read_png_metadata(png.read_bytes())
    assert meta.get("render_path", {}).get("compile_mode") == (recorded or None)  # eager PNGs have none
    del loads[:]
    by_row = reproduce_task(str(root), tasks[1].task_id, str(tmp_path / "diff"))
    by_png = reproduce_image(str(png), str(tmp_path / "diff"))
    assert loads == [recorded, recorded]
    assert by_row.identical and by_row.warnings == () and by_row.compile_mode == (recorded or None)
    assert by_png.max_difference <= 1 and by_png.warnings == ()  # rendered alone
    assert ("compiled: default" in by_row.summary()) == bool(recorded)


def test_reproduce_warns_of_other_versions(tiny_path, tmp_path, loads):
    from farm.reproduce import path_warnings, reproduce_image

    root, tasks = recorded_job(tmp_path / "job", "default")
    png = root / "images" / f"{tasks[0].task_id}.png"
    meta = read_png_metadata(png.read_bytes())
    meta["render_path"] |= {"torch_version": "2.0.0", "triton_version": "3.0.0"}
    png.write_bytes(encode_png(decode(png), meta))
    result = reproduce_image(str(png), str(tmp_path / "diff"))
    assert loads[-1] == "default" and result.max_difference <= 1  # rendered alone
    assert any(
        w.startswith(f"recorded with torch 2.0.0, rendered now with torch {torch.__version__}") for w in result.warnings
    )
    assert any(w.startswith("recorded with triton 3.0.0, rendered now with no triton") for w in result.warnings)
    same = {"compile_mode": "default", "channels_last": True, "torch_version": torch.__version__}
    assert path_warnings(same, same) == []
    assert path_warnings(same, same | {"channels_last": False}) == [
        "recorded with channels_last True, rendered now with False: another render path"
    ]


def decode(png: Path) -> np.ndarray:
    from farm.images import decode_rgb

    return decode_rgb(png.read_bytes())


def test_render_help_shows_compile():
    from farm.cli import main

    result = CliRunner().invoke(main, ["render", "--help"])
    assert result.exit_code == 0 and "--compile" in result.output
    assert "farm reproduce rebuilds it" in " ".join(result.output.split())


# ---------------------------------------------------------------------------------------
# Through Ray and the CLI


@pytest.mark.slow
def test_a_compiled_job_records_its_path_and_reproduces(ray_session, tmp_path):
    from farm.cli import main
    from farm.driver import RenderOptions, run_job
    from farm.manifest import read_manifest
    from farm.spec import load_job

    spec_path = tmp_path / "compiled.yaml"
    spec_path.write_text(JOB)
    options = RenderOptions(out=str(tmp_path / "out"), actors=1, batch_size=2, progress=False, compile=True)
    summary = run_job(load_job(spec_path), options)
    assert (summary.rendered, summary.failed) == (2, 0)
    root = tmp_path / "out" / "compiled"
    rows = read_manifest(str(root)).to_pylist()
    mode = compile_mode("cpu", True)
    assert [(r["compile_mode"], r["channels_last"], r["torch_version"]) for r in rows] == [
        (mode, True, torch.__version__)
    ] * 2
    meta = read_png_metadata((root / rows[0]["image_path"]).read_bytes())
    assert meta["render_path"]["compile_mode"] == mode and meta["render_path"]["channels_last"] is True
    assert json.loads(rows[0]["task_json"]) == meta["task"]

    result = CliRunner().invoke(main, ["reproduce", str(root), rows[0]["task_id"], "--diff-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert f"identical (in its recorded batch of 2, compiled: {mode}" in result.output


# ---------------------------------------------------------------------------------------
# inductor itself: minutes of C++ compiles on a small CPU, so opt-in there; on a GPU, the device's mode


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("FARM_TEST_INDUCTOR") != "1",
    reason="inductor's CPU compile takes minutes a shape here: set FARM_TEST_INDUCTOR=1",
)
def test_inductor_on_cpu(tiny_path, eager):
    components = load_components(resolve_model("tiny"), "cpu", "float32", compile="default")
    tasks = [task(seed=1, guidance=1.0)]  # one UNet shape (no classifier-free guidance), one decode
    images = render_batch(components, tasks)
    assert largest_difference(images, render_batch(eager, tasks)) <= COMPILED_TOLERANCE
    assert np.array_equal(render_batch(components, tasks), images)


@pytest.mark.gpu
def test_compiled_on_cuda(tiny_path):
    device = "cuda"
    components = load_components(resolve_model("tiny"), device, "float16", compile=compiled_path.CUDA_COMPILE_MODE)
    reference = load_components(resolve_model("tiny"), device, "float16")
    path = render_path(components)
    assert path["compile_mode"] == compiled_path.CUDA_COMPILE_MODE and path["gpu_name"] and path["cuda_version"]
    assert path["triton_version"] == compiled_path.triton_version()
    tasks = [task(seed=1), task("a red car", seed=2)]
    images = render_batch(components, tasks)
    assert largest_difference(images, render_batch(reference, tasks)) <= COMPILED_TOLERANCE
    assert np.array_equal(render_batch(components, tasks), images)
    # a last partial batch: its own graph, the same pixels as in the batch of two, within the tolerance
    assert largest_difference(render_batch(components, tasks[:1]), images[:1]) <= COMPILED_TOLERANCE

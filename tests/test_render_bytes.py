"""The render core keeps its bytes (issue 16): every pinned case renders the final latents, images
and captured frames the code of commit bfadff0 rendered (tests/render_golden.json, written by
``python tests/render_cases.py``); pixels become uint8 on the device exactly as numpy made them;
and the denoising loop never waits for the device (on CUDA under ``set_sync_debug_mode("error")``,
on the CPU by marking the device's tensors and recording every host read of them).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from render_cases import GOLDEN, GOLDEN_COMMIT, cases, environment, init_pixels, render_case, task

from farm import conditioning, render, samplers
from farm.spec import SCHEDULERS

GOLDEN_DATA = json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def pinned(tiny_components: Any) -> Iterator[np.ndarray]:
    """The environment the golden bytes were written in (its CPU thread count too); the init image."""
    recorded, here = GOLDEN_DATA["environment"], environment(tiny_components)
    for library in ("torch", "diffusers"):
        if recorded[library] != here[library]:
            pytest.skip(f"golden bytes are for {library} {recorded[library]}, this is {here[library]}")
    assert here["model_hash"] == recorded["model_hash"], "the tiny preset's weights changed"
    threads = torch.get_num_threads()
    torch.set_num_threads(int(recorded["threads"]))
    yield init_pixels()
    torch.set_num_threads(threads)


def test_golden_data_covers_every_case():
    assert GOLDEN_DATA["commit"] == GOLDEN_COMMIT
    assert sorted(GOLDEN_DATA["cases"]) == sorted(cases())
    assert {name for name in GOLDEN_DATA["cases"] if name in SCHEDULERS} == set(SCHEDULERS)


@pytest.mark.parametrize("name", sorted(GOLDEN_DATA["cases"]))
def test_render_keeps_its_bytes(tiny_components, pinned, name):
    got = render_case(tiny_components, cases()[name], pinned)
    want = GOLDEN_DATA["cases"][name]
    assert got.keys() == want.keys()
    assert got["latents_dtype"] == "torch.float32"  # nothing on the way turned the latents float64
    assert [k for k in want if got[k] != want[k]] == []


# ---------------------------------------------------------------------------------------
# uint8 on the device


def numpy_uint8(pixels: torch.Tensor) -> np.ndarray:
    """bfadff0's conversion: to the host, float32, then x 255, round and cast in numpy."""
    return (pixels.cpu().permute(0, 2, 3, 1).float().numpy() * 255).round().astype(np.uint8)


def device_uint8(pixels: torch.Tensor) -> np.ndarray:
    return render.to_uint8(pixels).permute(0, 2, 3, 1).cpu().numpy()


def ties() -> torch.Tensor:
    """float32 values in [0, 1] whose float32 product with 255 is exactly k + 0.5, and their neighbours."""
    k = torch.arange(255, dtype=torch.float64)
    near = ((k + 0.5) / 255).float()
    values = torch.cat([near, torch.nextafter(near, torch.ones(())), torch.nextafter(near, torch.zeros(()))])
    return torch.cat([values, torch.tensor([0.0, 1.0, 0.5])])


def test_uint8_on_the_device_rounds_as_numpy_did():
    values = ties()
    exact = values[(values * 255) == (values * 255).floor() + 0.5]
    assert len(exact) > 50  # many exact ties: rounding half to even is pinned, not assumed
    # half to even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, ...
    assert torch.equal(render.to_uint8(exact).long() % 2, torch.zeros(len(exact), dtype=torch.long))
    generator = torch.Generator().manual_seed(0)
    random = torch.rand(2, 3, 16, 16, generator=generator)
    for pixels in (values.reshape(1, 3, -1, 1), random, random.half(), values.half().reshape(1, 3, -1, 1)):
        assert np.array_equal(device_uint8(pixels), numpy_uint8(pixels))


def old_decode_latents(components: Any, latents: torch.Tensor, chunk: int) -> np.ndarray:
    """bfadff0's decode_latents: chunks to the host, uint8 in numpy."""
    vae = components.vae
    images = []
    with render.vae_precision(components) as dtype:
        for start in range(0, latents.shape[0], chunk):
            part = latents[start : start + chunk] / vae.config.scaling_factor
            with torch.no_grad():
                decoded = vae.decode(part.to(dtype)).sample
            decoded = (decoded / 2 + 0.5).clamp(0, 1)
            images.append(decoded.cpu().permute(0, 2, 3, 1).float().numpy())
    return (np.concatenate(images) * 255).round().astype(np.uint8)


@pytest.mark.parametrize("chunk", [2, 5])
def test_decode_latents_equals_the_numpy_path(tiny_components, chunk):
    latents = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * 3
    new = render.decode_latents(tiny_components, latents, chunk=chunk)
    old = old_decode_latents(tiny_components, latents, chunk)
    assert new.dtype == np.uint8 and new.shape == (5, 64, 64, 3) and new.flags.c_contiguous
    assert np.array_equal(new, old)
    assert (new == 255).any() and (new == 0).any()  # the clamp at both ends is exercised


# ---------------------------------------------------------------------------------------
# No host syncs in the loop: on the CPU, with the device's tensors marked


class OnDevice(torch.Tensor):
    """A CPU tensor standing for one on the accelerator: every read of its value on the host (what
    on CUDA waits for the device) is recorded in ``OnDevice.reads``. Copies to the host by ``.to``
    and copies from pageable host memory cannot be told apart from CPU work here: the CUDA test
    catches those."""

    reads: list[str] = []  # of the denoise call that runs (sync_reads)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in HOST_READS:
            cls.reads.append(name)
        elif name == "__getitem__" and reads_on_host(args[0], args[1]):
            cls.reads.append("index with a device tensor")
        return super().__torch_function__(func, types, args, kwargs)


HOST_READS = {"item", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "tolist", "nonzero"}


def reads_on_host(table: Any, index: Any) -> bool:
    """Indexing that reads a device tensor's value on the host: a host table by a device index, or any
    tensor by a device scalar or mask (Python indexing takes their ``item`` / ``nonzero``)."""
    parts = index if isinstance(index, tuple) else (index,)
    marked = [p for p in parts if isinstance(p, OnDevice)]
    if not marked:
        return False
    return not isinstance(table, OnDevice) or any(p.dim() == 0 or p.dtype == torch.bool for p in marked)


def marked(tensor: torch.Tensor, device: Any = None) -> torch.Tensor:
    """``samplers.to_device`` in the CPU test: the tensor, marked as on the device."""
    return tensor.as_subclass(OnDevice)


def sync_reads(components: Any, tasks: list, monkeypatch: pytest.MonkeyPatch, init: list | None = None) -> list[str]:
    """The host reads of device tensors ``render.denoise`` makes for these tasks (render_batch's other steps
    run unmarked); its result is compared with the unmarked render's latents."""
    for module in (samplers, render, conditioning):
        monkeypatch.setattr(module, "to_device", marked)
    real, reads = render.denoise, []

    def marking(components, scheduler, timesteps, latents, *args: Any, **kwargs: Any) -> torch.Tensor:
        OnDevice.reads = []
        out = real(components, scheduler, timesteps, latents.as_subclass(OnDevice), *args, **kwargs)
        reads.extend(OnDevice.reads)
        return out.as_subclass(torch.Tensor)

    monkeypatch.setattr(render, "denoise", marking)
    render.render_batch(components, tasks, init)
    return reads


# Syncs left in diffusers' own steps (issue 16): UniPC copies host sigmas to the device one by one,
# builds tensors from device scalars (torch.tensor(rks)) and solves on the device each step.
LEFT = {"unipc"}


@pytest.mark.parametrize("name", [n for n in SCHEDULERS if n not in LEFT])
def test_the_loop_never_reads_the_device(tiny_components, monkeypatch, name):
    both = ("latents", "x0")
    tasks = [task(1, name, capture=both), task(2, name, "a cat", capture=both)]
    assert sync_reads(tiny_components, tasks, monkeypatch) == []


@pytest.mark.parametrize("name", ["ddim", "pndm", "lcm", "euler_a"])
def test_img2img_loop_never_reads_the_device(tiny_components, monkeypatch, name):
    img2img = task(3, name, init_image="x.png", init_image_sha256="0", strength=0.5, start_step=3, capture=("x0",))
    assert sync_reads(tiny_components, [img2img], monkeypatch, [init_pixels()]) == []


def test_the_sync_check_can_fail(tiny_components, monkeypatch):
    class Reading(render.StepCallback):
        def stepped(self, state: render.StepState) -> None:
            float(state.latents.abs().max())

    monkeypatch.setattr(render, "step_callbacks", lambda *args: [Reading()])
    assert sync_reads(tiny_components, [task(1, "euler", steps=2)], monkeypatch) == ["__float__"] * 2


# ---------------------------------------------------------------------------------------
# No host syncs in the loop: on CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("name", SCHEDULERS)
def test_cuda_loop_has_no_host_syncs(monkeypatch, tiny_path, name):
    from farm.models import load_components, resolve_model

    if name in LEFT:
        pytest.xfail("diffusers' UniPC syncs in its own step (LEFT)")
    components = load_components(resolve_model("tiny"), "cuda", "float16")
    real = render.denoise

    def strict(*args: Any, **kwargs: Any) -> torch.Tensor:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(render, "denoise", strict)
    both = ("latents", "x0")
    render.render_batch(components, [task(1, name, capture=both), task(2, name, "a cat", capture=both)])
    img2img = task(3, name, init_image="x.png", init_image_sha256="0", strength=0.5, start_step=3, capture=both)
    render.render_batch(components, [img2img], [init_pixels()])

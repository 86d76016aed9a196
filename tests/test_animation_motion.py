"""Animation that holds together, the job side: ControlNet entries (a path or each frame's own
source, scale sweeps and schedules), flow-warped chaining, and animations from text with
Deforum's 2D motion; end to end, flow and motion shots render, record their recipe, report a
motion-compensated flicker and reproduce."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_animation import write_clip

from farm.driver import RenderOptions, run_job
from farm.manifest import read_manifest
from farm.models import file_sha256
from farm.reproduce import reproduce_task
from farm.spec import SpecError, load_job, parse_job


@pytest.fixture
def files(tmp_path: Path) -> Path:
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "edges.png")
    (tmp_path / "frames").mkdir()
    for i in range(3):
        Image.fromarray(np.full((64, 64, 3), 40 * i, np.uint8)).save(tmp_path / "frames" / f"{i}.png")
    return tmp_path


def test_a_controlnet_entry_is_hashed_and_its_scale_sweeps_in_one_line(files: Path):
    job = "defaults: {controlnet: [{model: tiny-controlnet, image: edges.png, preprocess: canny}]}\n"
    job += "sweep: {controlnet.0.scale: [0, 0.5, 1]}"
    found = list(parse_job(job, base_dir=files).tasks())
    assert [t.controlnet[0].scale for t in found] == [0, 0.5, 1]
    unit = found[0].controlnet[0]
    assert unit.image == str(files / "edges.png") and unit.image_sha256 == file_sha256(files / "edges.png")
    assert unit.preprocess == "canny" and (unit.low_threshold, unit.high_threshold) == (100, 200)
    # the model set is the batch key: scales may share a batch, another ControlNet may not
    assert found[0].batch_key == found[2].batch_key
    other = dataclasses.replace(found[0], controlnet=(dataclasses.replace(unit, model="org/other-controlnet"),))
    assert other.batch_key != found[0].batch_key


@pytest.mark.parametrize(
    ("controlnet", "message"),
    [
        ("[{model: tiny-controlnet}]", r"defaults.controlnet\[0\].image: missing"),
        ("[{model: nowhere/at-all/x, image: edges.png}]", r"defaults.controlnet\[0\].model: unknown ControlNet"),
        ("[{model: tiny-controlnet, image: edges.png, preprocess: depth}]", "expected one of none, canny"),
        ("[{model: tiny-controlnet, image: edges.png, start: 0.6, end: 0.5}]", "is not after start"),
        ("[{model: tiny-controlnet, image: gone.png}]", r"defaults.controlnet\[0\].image: no such file: gone.png"),
        ("[{model: tiny-controlnet, image: source}]", "source is each frame's own source frame, only in kind: animate"),
    ],
)
def test_bad_controlnet_entries_are_one_line(files: Path, controlnet: str, message: str):
    with pytest.raises(SpecError, match=message):
        parse_job(f"defaults: {{controlnet: {controlnet}}}", base_dir=files)


def test_a_source_control_image_is_each_frames_own_source_and_flow_names_the_frame_before(files: Path):
    job = """
kind: animate
defaults:
  {prompt: a cat, width: 64, height: 64, controlnet: [{model: tiny-controlnet, image: source, preprocess: canny}]}
animate: {source: frames, mode: chained, flow: dis, schedules: {controlnet.0.scale: "0:(0), 2:(1)"}}
"""
    found = list(parse_job(job, base_dir=files).tasks())
    assert [t.controlnet[0].image for t in found] == [t.init_image for t in found]
    assert [t.controlnet[0].image_sha256 for t in found] == [t.init_image_sha256 for t in found]
    assert [t.controlnet[0].scale for t in found] == [0.0, 0.5, 1.0]
    assert [t.flow for t in found] == [None, "dis", "dis"]
    assert [t.flow_from for t in found] == [None, found[0].init_image, found[1].init_image]
    with pytest.raises(SpecError, match="animate.flow: only for mode: chained"):
        parse_job(job.replace("mode: chained, ", ""), base_dir=files)


def test_an_animation_from_text_moves_the_camera_frame_by_frame():
    job = """
kind: animate
defaults: {prompt: a castle, steps: 10, width: 64, height: 64}
animate: {frames: 4, motion: {zoom: "0:(1.1)", angle: "0:(0), 3:(3)", translation_x: "0:(2)"}}
"""
    spec = parse_job(job)
    assert spec.animation.mode == "chained"
    first, *rest = list(spec.tasks())
    assert first.motion is None and first.strength is None and first.start_step == 0 and first.previous is None
    assert [t.motion for t in rest] == [(1.1, 1.0, 2.0, 0.0), (1.1, 2.0, 2.0, 0.0), (1.1, 3.0, 2.0, 0.0)]
    # img2img of the frame before at Deforum's default (strength 0.35: 3 of 10 steps run)
    assert {(t.strength, t.start_step) for t in rest} == {(0.35, 7)}
    assert [t.previous for t in rest] == [first.task_id, rest[0].task_id, rest[1].task_id]


@pytest.mark.parametrize(
    ("animate", "message"),
    [
        ("{source: clip.mp4, motion: {zoom: '0:(1.02)'}}", "animate.source: not with motion"),
        ("{frames: 4, motion: {tilt: '0:(1)'}}", "animate.motion.tilt: unknown field"),
        ("{frames: 4, motion: {zoom: '0:(0)'}}", "a zoom above 0"),
        ("{frames: 0}", "animate.frames: expected a whole number of frames from 1"),
        ("{frames: 4, mode: chained}", "animate.mode: not with motion"),
    ],
)
def test_bad_motion_is_one_line(animate: str, message: str):
    with pytest.raises(SpecError, match=message):
        parse_job(f"kind: animate\nanimate: {animate}")


# ---------------------------------------------------------------------------------------
# End to end


def render(folder: Path, name: str, text: str, kind: str = "animate"):
    path = folder / f"{name}.yaml"
    path.write_text(f"name: {name}\nkind: {kind}\nmodel: tiny\nscheduler: euler\n{text}")
    options = RenderOptions(out=str(folder / "out"), actors=1, batch_size=2, progress=False)
    return run_job(load_job(path), options), folder / "out" / name


def rows(root: Path) -> list[dict]:
    return sorted(
        (r for r in read_manifest(str(root)).to_pylist() if r["capture"] is None and r["status"] == "ok"),
        key=lambda r: r["frame"],
    )


@pytest.mark.slow
def test_flow_chained_frames_record_their_flow_and_reproduce(ray_session, tmp_path: Path):
    write_clip(tmp_path / "clip.mp4", frames=4)
    text = "defaults: {steps: 6, width: 64, height: 64, prompt: a cat, strength: 0.5, seed: 3}\n"
    summary, root = render(tmp_path, "flowed", text + "animate: {source: clip.mp4, mode: chained, flow: farneback}\n")
    assert summary.failed == 0 and summary.rendered == 4
    found = rows(root)
    assert [r["flow"] for r in found] == [None, "farneback", "farneback", "farneback"]
    assert json.loads(found[1]["flow_config"])["winsize"] > 0 and found[0]["flow_config"] is None
    assert len(summary.flicker_compensated) == 1 and summary.flicker_compensated[0] is not None
    assert json.loads((root / "summary.json").read_text())["flicker_compensated"] == [
        round(summary.flicker_compensated[0], 4)
    ]
    assert reproduce_task(str(root), found[-1]["task_id"], str(tmp_path)).identical


@pytest.mark.slow
def test_a_zoom_animation_renders_from_text_and_reproduces(ray_session, tmp_path: Path):
    text = "defaults: {steps: 6, width: 64, height: 64, prompt: a castle, seed: 5}\n"
    text += 'animate: {frames: 4, motion: {zoom: "0:(1.05)", translation_x: "0:(2)"}}\n'
    summary, root = render(tmp_path, "zoom", text)
    assert summary.failed == 0 and summary.rendered == 4 and summary.videos
    found = rows(root)
    assert found[0]["start_step"] == 0 and found[1]["start_step"] == 4 and found[1]["init_image"] is None
    assert summary.flicker_compensated[0] is not None
    assert reproduce_task(str(root), found[-1]["task_id"], str(tmp_path)).identical


@pytest.mark.slow
def test_a_controlnet_grid_renders_records_its_images_and_scale_zero_is_without_it(ray_session, tmp_path: Path):
    diagonal = np.kron(np.eye(8, dtype=np.uint8) * 255, np.ones((8, 8), np.uint8))
    Image.fromarray(diagonal[:, :, None].repeat(3, 2)).save(tmp_path / "edges.png")
    common = "defaults: {steps: 4, width: 64, height: 64, prompt: a house"
    unit = "{model: tiny-controlnet, image: edges.png, preprocess: canny}"
    sweep = "sweep: {controlnet.0.scale: [0, 1, 1.5], seed: [1, 2]}\n"
    summary, root = render(tmp_path, "cn", f"{common}, controlnet: [{unit}]}}\n{sweep}", kind="grid")
    assert summary.failed == 0 and summary.rendered == 6
    _, plain = render(tmp_path, "plain", f"{common}}}\nsweep: {{seed: [1, 2]}}\n", kind="grid")
    found = read_manifest(str(root)).to_pylist()
    units = {r["task_id"]: json.loads(r["controlnet"])[0] for r in found}
    assert {u["image_sha256"] for u in units.values()} == {file_sha256(tmp_path / "edges.png")}
    pixels = {(units[r["task_id"]]["scale"], r["seed"]): np.asarray(Image.open(root / r["image_path"])) for r in found}
    assert len({p.tobytes() for p in pixels.values()}) == 6
    for r in read_manifest(str(plain)).to_pylist():
        assert np.array_equal(pixels[(0, r["seed"])], np.asarray(Image.open(plain / r["image_path"])))
    assert reproduce_task(str(root), found[-1]["task_id"], str(tmp_path)).identical

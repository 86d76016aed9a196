"""Animation jobs end to end on Ray: every frame once and in order, chained shots, resume after
SIGKILL, the videos decoded back, flicker, and ``farm video``."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from test_animation import FRAMES, SIZE, write_clip
from test_resume import farm_render, wait_for_first_part

from farm.cli import main
from farm.driver import RenderOptions, run_job
from farm.manifest import read_manifest
from farm.reproduce import reproduce_task
from farm.spec import load_job
from farm.video import flicker, read_video_info

pytestmark = pytest.mark.slow

HEAD = """
name: {name}
kind: animate
model: tiny
scheduler: euler
defaults: {{steps: 10, width: 64, height: 64, prompt: a cute shiba inu, strength: 0.5, seed: 3}}
"""


def write_job(folder: Path, name: str, animate: str, sweep: str = "") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(HEAD.format(name=name) + sweep + animate)
    return path


def render(job: Path, out: Path, batch_size: int = 4):
    return run_job(load_job(job), RenderOptions(out=str(out), actors=2, batch_size=batch_size, progress=False))


def ok_rows(root: Path) -> list[dict]:
    return [r for r in read_manifest(str(root)).to_pylist() if r["status"] == "ok" and r["capture"] is None]


def load(root: Path, row: dict) -> np.ndarray:
    return np.asarray(Image.open(root / row["image_path"]).convert("RGB"))


def decode(path: Path) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("animation")
    write_clip(folder / "clip.mp4")
    return folder


@pytest.fixture(scope="module")
def independent(ray_session, folder: Path):
    """The test clip, every frame its own img2img task, over 2 actors in batches of 4."""
    summary = render(write_job(folder, "independent", "animate: {source: clip.mp4}\n"), folder / "out")
    return summary, folder / "out" / "independent"


@pytest.fixture(scope="module")
def chained(ray_session, folder: Path):
    """The same clip and settings, chained with colour coherence: two shots (seeds 3 and 4)."""
    text = "animate: {source: clip.mp4, mode: chained, blend: 0.5, color_coherence: true}\n"
    summary = render(write_job(folder, "chained", text, "sweep: {seed: [3, 4]}\n"), folder / "out")
    return summary, folder / "out" / "chained"


def test_an_independent_animation_over_two_actors_gives_every_frame_once_in_order(independent):
    summary, root = independent
    assert (summary.rendered, summary.failed) == (FRAMES, 0)
    rows = ok_rows(root)
    assert sorted(r["frame"] for r in rows) == list(range(FRAMES)), "every frame exactly once"
    assert len({r["actor"] for r in rows}) == 2, "fanned out over both actors"

    # The video the job wrote by itself: H.264, yuv420p, every frame, the clip's size and fps.
    video = root / "independent.mp4"
    assert summary.videos == ["independent.mp4"]
    info = read_video_info(video)
    assert (info["codec"], info["pix_fmt"], info["frames"]) == ("h264", "yuv420p", FRAMES)
    assert (info["width"], info["height"], info["fps"]) == (SIZE, SIZE, pytest.approx(12.0))

    # The same frames as `farm video` stitches in frame order (whose order the side-by-side
    # test below checks against the moving square of each frame's source).
    assert invoke(str(root), "-o", str(root.parent / "again.mp4")).exit_code == 0
    again = decode(root.parent / "again.mp4")
    assert len(again) == FRAMES and all(np.array_equal(a, b) for a, b in zip(decode(video), again, strict=True))
    pngs = [load(root, r) for r in sorted(rows, key=lambda r: r["frame"])]

    # Flicker: printed and stored, the mean |frame n+1 - frame n| of the rendered frames.
    assert summary.flicker == [pytest.approx(flicker(pngs))]
    stored = json.loads((root / "summary.json").read_text())
    assert stored["videos"] == ["independent.mp4"] and stored["flicker"] == [pytest.approx(flicker(pngs), abs=1e-4)]


def test_chained_shots_run_frame_after_frame_each_on_one_actor_at_a_time(chained):
    summary, root = chained
    assert (summary.rendered, summary.failed) == (2 * FRAMES, 0)
    assert summary.videos == ["chained-shot0.mp4", "chained-shot1.mp4"]
    rows = ok_rows(root)
    shots = [sorted((r for r in rows if r["seed"] == seed), key=lambda r: r["frame"]) for seed in (3, 4)]
    for shot in shots:
        assert [r["frame"] for r in shot] == list(range(FRAMES))
        assert shot[0]["previous"] is None
        for before, row in zip(shot, shot[1:], strict=False):
            assert row["previous"] == before["task_id"] and row["color_reference"] == shot[0]["task_id"]
            # One frame at a time: frame n+1 started rendering after frame n's row was made.
            started = row["created_at"].timestamp() - row["seconds"]
            assert before["created_at"].timestamp() < started
    # Several shots at once, on different actors: each shot's span overlaps the other's.
    spans = [(s[0]["created_at"], s[-1]["created_at"]) for s in shots]
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1]
    assert len({r["actor"] for r in rows}) == 2


def test_chained_mode_flickers_less_than_independent_on_the_same_clip(independent, chained):
    (independent_summary, _), (chained_summary, _) = independent, chained
    # Shot 0 of the chained job has the independent job's seed (3), clip and settings.
    assert chained_summary.flicker[0] < independent_summary.flicker[0], (
        chained_summary.flicker,
        independent_summary.flicker,
    )


def test_a_chained_frame_reproduces_bit_for_bit_from_its_row(chained, tmp_path: Path):
    _, root = chained
    row = next(r for r in ok_rows(root) if r["seed"] == 4 and r["frame"] == 5)
    result = reproduce_task(str(root), row["task_id"], str(tmp_path))
    assert result.identical, result.summary()


@pytest.mark.parametrize("flow", ["", ", flow: farneback"], ids=["blend", "flow"])
def test_a_chained_shot_resumes_from_its_last_finished_frame_after_sigkill(
    ray_session, folder: Path, tmp_path: Path, flow: str
):
    job = write_job(
        tmp_path,
        "crashanim",
        "animate: {source: " + str(folder / "clip.mp4") + f", mode: chained, blend: 0.4{flow}}}\n",
    )
    out = tmp_path / "out"
    root = out / "crashanim"

    # 1. Kill -9 the driver once the first frames have landed
    proc = farm_render(job, out)
    wait_for_first_part(root, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    landed = sorted(r["frame"] for r in ok_rows(root))
    assert 0 < len(landed) < FRAMES, "the kill must come mid-shot for this test to mean anything"
    assert landed == list(range(len(landed))), "a chain finishes its frames in order"

    # 2. The rerun renders only the frames after them
    rerun = subprocess.run(
        [sys.executable, "-m", "farm.cli", "render", str(job), "--out", str(out), "--no-progress"],
        capture_output=True,
        text=True,
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert re.search(rf"\bskipped {len(landed)},", rerun.stdout), rerun.stdout
    rows = ok_rows(root)
    assert sorted(r["frame"] for r in rows) == list(range(FRAMES))
    assert len({r["task_id"] for r in read_manifest(str(root)).to_pylist()}) == FRAMES

    # 3. The same bytes as a shot rendered without a crash
    clean = tmp_path / "clean"
    render(job, clean)
    clean_rows = {r["task_id"]: r["image_sha256"] for r in ok_rows(clean / "crashanim")}
    assert {r["task_id"]: r["image_sha256"] for r in rows} == clean_rows


def invoke(*args: str):
    return CliRunner().invoke(main, ["video", *args])


def test_farm_video_writes_side_by_side_gif_webm_and_a_selection(independent, tmp_path: Path):
    _, root = independent
    result = invoke(str(root), "-o", str(tmp_path / "sbs.mp4"), "--side-by-side")
    assert result.exit_code == 0, result.output
    info = read_video_info(tmp_path / "sbs.mp4")
    assert (info["width"], info["height"], info["frames"]) == (2 * SIZE, SIZE, FRAMES)
    # The left half is each frame's source: the clip's white square, 2 px further right a frame.
    lefts = [frame[:, :SIZE].mean(axis=2) for frame in decode(tmp_path / "sbs.mp4")]
    xs = [float((left * np.arange(SIZE)).sum() / left.sum()) for left in lefts]
    assert xs == pytest.approx([2 + 2 * i + 7.5 for i in range(FRAMES)], abs=1.0)

    assert invoke(str(root), "-o", str(tmp_path / "a.webm"), "--fps", "6").exit_code == 0
    webm = read_video_info(tmp_path / "a.webm")
    assert (webm["codec"], webm["frames"], webm["fps"]) == ("vp9", FRAMES, pytest.approx(6.0))

    result = invoke(str(root), "-o", str(tmp_path / "a.gif"), "--where", "frame < 10")
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "a.gif") as gif:
        assert gif.n_frames == 10

    result = invoke(str(root), "-o", str(tmp_path / "r.mp4"), "--order", "seed DESC")
    assert result.exit_code == 2 and result.output.startswith("error: --order: unknown column"), result.output


def test_farm_video_refuses_two_shots_mixed_and_names_the_way_out(chained, tmp_path: Path):
    _, root = chained
    result = invoke(str(root), "-o", str(tmp_path / "x.mp4"))
    assert result.exit_code == 2, result.output
    assert result.output.splitlines() == [
        'error: the rows hold several shots (frame repeats); pick one with --where, e.g. --where "seed = 1"'
    ]
    result = invoke(str(root), "-o", str(tmp_path / "x.mp4"), "--where", "seed = 4")
    assert result.exit_code == 0 and f"{FRAMES} frames" in result.output, result.output


def test_step_captures_stitch_the_same_way(ray_session, tmp_path: Path):
    job = tmp_path / "traj.yaml"
    job.write_text(
        "name: traj\nkind: trajectory\nmodel: tiny\nscheduler: euler\n"
        "defaults: {steps: 6, width: 64, height: 64, prompt: a cat, seed: 1}\n"
    )
    run_job(load_job(job), RenderOptions(out=str(tmp_path / "out"), actors=1, progress=False))
    root = tmp_path / "out" / "traj"
    video = tmp_path / "x0.mp4"
    result = invoke(str(root), "-o", str(video), "--where", "capture = 'x0'")
    assert result.exit_code == 0, result.output
    assert read_video_info(video)["frames"] == 6
    assert invoke(str(root), "-o", str(tmp_path / "latents.mp4"), "--where", "capture = 'latents'").exit_code == 0
    assert read_video_info(tmp_path / "latents.mp4")["frames"] == 7  # the start, then one per step


def test_a_walk_writes_its_video(ray_session, tmp_path: Path):
    job = tmp_path / "walk.yaml"
    job.write_text(
        "name: walk\nkind: walk\nmodel: tiny\nscheduler: euler\ndefaults: {steps: 6, width: 64, height: 64}\n"
        "walk: {prompts: [a cat, a dog], seeds: [1, 2], frames: 3, fps: 5}\n"
    )
    summary = render(job, tmp_path / "out")
    assert (summary.rendered, summary.videos) == (4, ["walk.mp4"])
    info = read_video_info(tmp_path / "out" / "walk" / "walk.mp4")
    assert (info["frames"], info["fps"]) == (4, pytest.approx(5.0))


def test_a_failed_frame_ends_its_shot_and_a_rerun_picks_it_up(ray_session, tmp_path: Path):
    from test_animation import square_frame

    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(square_frame(i)).save(folder / f"{i}.png")
    job = write_job(tmp_path, "broken", "animate: {source: frames, mode: chained}\n")
    spec = load_job(job)
    original = (folder / "2.png").read_bytes()
    Image.fromarray(square_frame(9)).save(folder / "2.png")  # changed after the job was read

    summary = run_job(spec, RenderOptions(out=str(tmp_path / "out"), actors=2, progress=False))
    root = tmp_path / "out" / "broken"
    rows = sorted(read_manifest(str(root)).to_pylist(), key=lambda r: r["frame"])
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "failed", "failed", "failed"]
    assert "sha256 differs" in rows[2]["error"]
    assert all(r["error"].startswith("not rendered: frame 2 of this shot failed") for r in rows[3:])
    assert (summary.rendered, summary.failed, summary.videos) == (2, 4, ["broken.mp4"])
    assert read_video_info(root / "broken.mp4")["frames"] == 2

    (folder / "2.png").write_bytes(original)
    again = run_job(load_job(job), RenderOptions(out=str(tmp_path / "out"), actors=2, progress=False))
    assert (again.skipped, again.rendered, again.failed) == (2, 4, 0)
    assert read_video_info(root / "broken.mp4")["frames"] == 6

"""Animation jobs as specs: sources, schedules, prompts, seeds, chains and walks (no Ray)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import assert_dry_run_fails

from farm.driver import WorkQueue, plan_work
from farm.spec import Animation, Batch, RenderTask, SpecError, load_job, parse_job, shots
from farm.spec.animation import DEFAULT_FPS

FRAMES = 24
SIZE = 64


def square_frame(i: int) -> np.ndarray:
    """Frame ``i`` of the test clip: a white square moving right across black, RGB."""
    frame = np.zeros((SIZE, SIZE, 3), np.uint8)
    x = 2 + 2 * i  # 2 to 48: the square stays whole in frame
    frame[20:36, x : x + 16] = 255
    return frame


def write_clip(path: Path, frames: int = FRAMES, fps: float = 12.0) -> Path:
    """A moving square as an mp4 written with OpenCV (as a user's camera clip would be)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (SIZE, SIZE))
    for i in range(frames):
        writer.write(cv2.cvtColor(square_frame(i), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    return write_clip(tmp_path / "clip.mp4")


def job(tmp_path: Path, text: str, name: str = "anim") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"name: {name}\nkind: animate\n"
        "defaults: {model: tiny, steps: 10, width: 64, height: 64, scheduler: euler, prompt: a cat}\n" + text
    )
    return path


def centroid_x(path: str) -> float:
    from PIL import Image

    pixels = np.asarray(Image.open(path).convert("L"), dtype=float)
    return float((pixels * np.arange(SIZE)[None, :]).sum() / pixels.sum())


# ---------------------------------------------------------------------------------------
# Sources


def test_frames_come_from_a_video_the_test_wrote(tmp_path: Path, clip: Path):
    spec = load_job(job(tmp_path, "animate: {source: clip.mp4}\n"))
    tasks = list(spec.tasks())
    assert [t.frame for t in tasks] == list(range(FRAMES))
    assert spec.animation.fps == pytest.approx(12.0, rel=1e-3)
    # Each init image is the clip's frame: the square's centre moves 2 px a frame.
    xs = [centroid_x(t.init_image) for t in tasks]
    assert xs == pytest.approx([2 + 2 * i + 7.5 for i in range(FRAMES)], abs=0.6)
    assert all(t.init_image_sha256 for t in tasks)


def test_start_end_and_stride_pick_frames_and_divide_the_fps(tmp_path: Path, clip: Path):
    spec = load_job(job(tmp_path, "animate: {source: clip.mp4, start: 2, end: 20, stride: 3}\n"))
    xs = [centroid_x(t.init_image) for t in spec.tasks()]
    assert xs == pytest.approx([2 + 2 * i + 7.5 for i in range(2, 20, 3)], abs=0.6)
    assert spec.animation.fps == pytest.approx(4.0, rel=1e-3)


def test_a_folder_of_images_is_read_in_natural_order(tmp_path: Path):
    from PIL import Image

    folder = tmp_path / "frames"
    folder.mkdir()
    for i in (1, 2, 10, 9):  # written out of order; "10" sorts after "9" only naturally
        Image.fromarray(square_frame(i)).save(folder / f"f{i}.png")
    (folder / "notes.txt").write_text("not a frame")
    spec = load_job(job(tmp_path, "animate: {source: frames, fps: 8}\n"))
    assert [Path(t.init_image).name for t in spec.tasks()] == ["f1.png", "f2.png", "f9.png", "f10.png"]
    assert spec.animation.fps == 8.0


def test_a_rerun_reads_the_same_decoded_frames(tmp_path: Path, clip: Path):
    first = [
        (t.init_image, t.init_image_sha256) for t in load_job(job(tmp_path, "animate: {source: clip.mp4}\n")).tasks()
    ]
    again = [
        (t.init_image, t.init_image_sha256) for t in load_job(job(tmp_path, "animate: {source: clip.mp4}\n")).tasks()
    ]
    assert first == again


def test_a_folder_source_defaults_to_the_default_fps(tmp_path: Path):
    from PIL import Image

    (tmp_path / "f").mkdir()
    Image.fromarray(square_frame(0)).save(tmp_path / "f" / "0.png")
    assert load_job(job(tmp_path, "animate: {source: f}\n")).animation.fps == DEFAULT_FPS


# ---------------------------------------------------------------------------------------
# Schedules, prompts and seeds


def test_schedules_set_each_frame_linearly_and_hold_outside_the_keys(tmp_path: Path, clip: Path):
    text = 'animate:\n  source: clip.mp4\n  schedules: {strength: "2:(0.8), 10:(0.4)", guidance: "0:(3), 4:(7)"}\n'
    tasks = list(load_job(job(tmp_path, text)).tasks())
    assert [t.strength for t in tasks[:4]] == [0.8, 0.8, 0.8, 0.75]
    assert [t.strength for t in tasks[10:]] == [0.4] * (FRAMES - 10)
    assert [t.guidance for t in tasks[:6]] == [3.0, 4.0, 5.0, 6.0, 7.0, 7.0]
    # strength decides where img2img starts (diffusers: int(steps x strength) steps run)
    assert [t.start_step for t in tasks[:4]] == [2, 2, 2, 3]


def test_prompts_keyed_by_frame_are_held_or_blended(tmp_path: Path, clip: Path):
    held = list(load_job(job(tmp_path, "animate: {source: clip.mp4, prompts: {0: a cat, 4: a dog}}\n")).tasks())
    assert [t.prompt for t in held[:6]] == ["a cat"] * 4 + ["a dog"] * 2
    assert all(not t.mix for t in held)
    text = "animate: {source: clip.mp4, prompts: {0: a cat, 4: a dog}, prompt_blend: true}\n"
    blended = list(load_job(job(tmp_path, text)).tasks())
    assert blended[0].prompt == "a cat" and not blended[0].mix
    assert blended[1].prompt == "" and [(m.prompt, m.weight) for m in blended[1].mix] == [
        ("a cat", 0.75),
        ("a dog", 0.25),
    ]
    assert blended[4].prompt == "a dog" and not blended[4].mix


def test_seed_fixed_iter_and_schedule(tmp_path: Path, clip: Path):
    fixed = [t.seed for t in load_job(job(tmp_path, "animate: {source: clip.mp4}\n")).tasks()]
    assert fixed == [0] * FRAMES
    stepped = [t.seed for t in load_job(job(tmp_path, "animate: {source: clip.mp4, seed: iter}\n")).tasks()]
    assert stepped == list(range(FRAMES))
    text = 'animate: {source: clip.mp4, seed: "0:(10), 4:(14)"}\n'
    assert [t.seed for t in load_job(job(tmp_path, text)).tasks()][:6] == [10, 11, 12, 13, 14, 14]


def test_iter_counts_from_each_shots_seed(tmp_path: Path, clip: Path):
    text = "sweep: {scheduler: [euler, ddim]}\nanimate: {source: clip.mp4, end: 3, seed: iter}\n"
    path = job(tmp_path, text)
    path.write_text(path.read_text().replace("prompt: a cat}", "prompt: a cat, seed: 7}"))
    assert [(t.scheduler, t.seed) for t in load_job(path).tasks()] == [
        ("euler", 7),
        ("euler", 8),
        ("euler", 9),
        ("ddim", 7),
        ("ddim", 8),
        ("ddim", 9),
    ]


def test_a_mix_weight_can_be_scheduled(tmp_path: Path, clip: Path):
    path = job(tmp_path, 'animate:\n  source: clip.mp4\n  schedules: {mix.1.weight: "0:(0), 8:(1)"}\n')
    text = path.read_text().replace("prompt: a cat}", "mix: [{prompt: a cat, weight: 1}, {prompt: a dog, weight: 0}]}")
    path.write_text(text)
    tasks = list(load_job(path).tasks())
    assert [t.mix[1].weight for t in tasks[:9:2]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert all(t.mix[0].weight == 1.0 for t in tasks)


# ---------------------------------------------------------------------------------------
# Chains


def test_chained_frames_name_the_frame_before_and_frame_zero(tmp_path: Path, clip: Path):
    text = 'animate: {source: clip.mp4, end: 5, mode: chained, blend: "0:(0.2), 4:(0.6)", color_coherence: true}\n'
    tasks = list(load_job(job(tmp_path, text)).tasks())
    assert tasks[0].previous is None and tasks[0].color_reference is None and tasks[0].blend == 0.0
    for before, task in zip(tasks, tasks[1:], strict=False):
        assert task.previous == before.task_id
        assert task.color_reference == tasks[0].task_id
    assert [t.blend for t in tasks[1:]] == pytest.approx([0.3, 0.4, 0.5, 0.6])


def test_chained_shots_are_chains_of_one_frame_batches(tmp_path: Path, clip: Path):
    spec = load_job(job(tmp_path, "sweep: {seed: [1, 2]}\nanimate: {source: clip.mp4, end: 4, mode: chained}\n"))
    tasks = list(spec.tasks())
    done = {tasks[0].task_id, tasks[1].task_id}  # shot 0's first two frames already rendered
    work = plan_work(spec, tasks, done, batch_size=8)
    first, second = work.take(), work.take()
    assert [first.tasks[0].task_id, second.tasks[0].task_id] == [tasks[2].task_id, tasks[4].task_id]
    assert work.take() is None, "each chain has one batch out at a time"
    assert work.finish(first, ok=True) == []
    assert work.take().tasks[0].task_id == tasks[3].task_id
    # A failed frame ends its chain: the rest come back to be failed, not rendered.
    dropped = work.finish(second, ok=False)
    assert [b.tasks[0].task_id for b in dropped] == [t.task_id for t in tasks[5:8]]


def test_shots_cut_an_animations_tasks_at_each_sweep_combination(tmp_path: Path, clip: Path):
    spec = load_job(job(tmp_path, "sweep: {seed: [1, 2]}\nanimate: {source: clip.mp4, end: 3, mode: chained}\n"))
    cut = list(shots(spec, spec.tasks()))
    assert [[(t.seed, t.frame) for t in shot] for shot in cut] == [[(1, 0), (1, 1), (1, 2)], [(2, 0), (2, 1), (2, 2)]]


def test_animation_fps_default_is_the_sections_default():
    assert Animation(frames=((),)).fps == DEFAULT_FPS  # task.py holds a literal; keep the two in step


def test_independent_frames_batch_together(tmp_path: Path, clip: Path):
    spec = load_job(job(tmp_path, "animate: {source: clip.mp4}\n"))
    work = plan_work(spec, spec.tasks(), set(), batch_size=8)
    batches = []
    while (batch := work.take()) is not None:
        batches.append(batch)
    assert [len(b.tasks) for b in batches] == [8, 8, 8]
    assert work.empty


def test_work_queue_tells_equal_batches_of_two_chains_apart():
    def batch(seed: int) -> Batch:
        return Batch.of([RenderTask("tiny", "euler", "p", "", seed, 4, 7.5, 64, 64)])

    work = WorkQueue(chains=[[batch(1), batch(2)], [batch(1), batch(3)]])
    first, second = work.take(), work.take()
    assert first == second and first is not second
    assert work.finish(second, ok=True) == []
    assert work.take().tasks[0].seed == 3, "the second chain is free; the first still has its batch out"


def test_work_queue_spreads_chains_in_turn():
    def batch(i: int) -> Batch:
        return Batch.of([RenderTask("tiny", "euler", f"p{i}", "", i, 4, 7.5, 64, 64)])

    work = WorkQueue(chains=[[batch(0), batch(1)], [batch(2)], [batch(3)]])
    taken = [work.take() for _ in range(3)]
    assert [b.tasks[0].seed for b in taken] == [0, 2, 3]
    for b in taken:
        work.finish(b, ok=True)
    assert work.take().tasks[0].seed == 1
    assert not work.empty


# ---------------------------------------------------------------------------------------
# Walks


def walk_job(text: str) -> list[RenderTask]:
    spec = parse_job(
        "name: w\nkind: walk\ndefaults: {steps: 4, width: 64, height: 64, scheduler: euler}\n" + text,
        base_dir=Path.cwd(),
    )
    return list(spec.tasks())


def test_a_walk_slerps_prompts_and_noise_between_stops():
    tasks = walk_job("walk: {prompts: [a cat, a dog, a house], seeds: [1, 2, 3], frames: 4}\n")
    assert len(tasks) == 2 * 4 + 1
    assert [t.frame for t in tasks] == list(range(9))
    # Stops are the plain images of their prompt and seed.
    for index, (prompt, seed) in ((0, ("a cat", 1)), (4, ("a dog", 2)), (8, ("a house", 3))):
        assert (tasks[index].prompt, tasks[index].seed, tasks[index].mix, tasks[index].variation_seed) == (
            prompt,
            seed,
            (),
            None,
        )
    between = tasks[1]
    assert between.mix_mode == "slerp" and [(m.prompt, m.weight) for m in between.mix] == [
        ("a cat", 0.75),
        ("a dog", 0.25),
    ]
    assert (between.seed, between.variation_seed, between.variation_strength) == (1, 2, 0.25)


def test_a_looping_walk_ends_where_it_began():
    tasks = walk_job("walk: {prompts: [a cat, a dog], seeds: 5, frames: 3, loop: true}\n")
    assert len(tasks) == 6
    assert [m.prompt for m in tasks[-1].mix] == ["a dog", "a cat"]
    assert all(t.variation_seed is None for t in tasks), "one seed: only the prompts move"


def test_walk_schedules_apply_per_frame():
    tasks = walk_job('walk: {prompts: [a, b], frames: 4, schedules: {guidance: "0:(1), 4:(5)"}}\n')
    assert [t.guidance for t in tasks] == [1.0, 2.0, 3.0, 4.0, 5.0]


# ---------------------------------------------------------------------------------------
# Bad animation jobs: one line, exit 2, the field (and the schedule) named


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('animate:\n  source: clip.mp4\n  schedules: {strength: "0:(0.65), 10:0.4"}\n', "animate.schedules.strength: "),
        ('animate:\n  source: clip.mp4\n  schedules: {guidance: "0:(sin(t))"}\n', "animate.schedules.guidance: "),
        (
            'animate:\n  source: clip.mp4\n  schedules: {strength: "0:(1.5)"}\n',
            "animate.schedules.strength (frame 0): ",
        ),
        ('animate:\n  source: clip.mp4\n  schedules: {width: "0:(64)"}\n', "animate.schedules.width: not a field"),
        ('animate:\n  source: clip.mp4\n  schedules: {mix.3.weight: "0:(1)"}\n', "animate.schedules.mix.3.weight: "),
        ('animate: {source: clip.mp4, mode: chained, blend: "0:(2)"}\n', "animate.blend (frame 0): "),
        ('animate: {source: clip.mp4, seed: "0:(-1)"}\n', "animate.seed (frame 0): "),
        ("animate: {source: clip.mp4, seed: sometimes}\n", "animate.seed: expected fixed, iter or a schedule"),
        ("animate: {source: clip.mp4, blend: 0.5}\n", "animate.blend: only for mode: chained"),
        ("animate: {source: clip.mp4, mode: sideways}\n", "animate.mode: expected one of independent, chained"),
        ("animate: {source: clip.mp4, start: 30}\n", "animate: frames 30 to 24"),
        ("animate: {source: clip.mp4, stride: 0}\n", "animate.stride: expected a whole number from 1"),
        ("animate: {source: missing.mp4}\n", "animate.source: no such file or folder: missing.mp4"),
        ("animate: {source: clip.mp4, prompts: {}}\n", "animate.prompts: "),
        ("animate: {source: clip.mp4, fps: 0}\n", "animate.fps: expected frames per second"),
        ("animate: {source: clip.mp4, speed: 2}\n", "animate.speed: unknown field"),
        ("animate: [clip.mp4]\n", "animate: expected a mapping with source"),
        ('sweep: {strength: [0.3, 0.5]}\nanimate: {source: clip.mp4, schedules: {strength: "0:(1)"}}\n', "animate.sc"),
        ("sweep: {seed: [1, 2]}\nanimate: {source: clip.mp4, seed: iter}\n", "animate.seed: seed is swept"),
        ("walk: {prompts: [a, b]}\n", "walk: only for kind: walk"),
        ("sweep: {init_image: [clip.mp4]}\nanimate: {source: clip.mp4}\n", "init_image: an animate job's init images"),
    ],
)
def test_bad_animation_jobs_exit_2_naming_the_field(tmp_path: Path, clip: Path, text: str, message: str):
    assert_dry_run_fails(job(tmp_path, text), message)


def test_a_refused_job_decodes_nothing(tmp_path: Path, clip: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FARM_HOME", str(tmp_path / "home"))  # the session's cache may hold this clip
    with pytest.raises(SpecError, match="animate.schedules.strength"):
        load_job(job(tmp_path, 'animate: {source: clip.mp4, schedules: {strength: "0:(x)"}}\n'))
    assert not (tmp_path / "home").exists()
    load_job(job(tmp_path, "animate: {source: clip.mp4}\n"))
    assert len(list((tmp_path / "home" / "frames").rglob("*.png"))) == FRAMES


def test_a_frame_cache_that_cannot_be_written_is_one_line(tmp_path: Path, clip: Path, monkeypatch):
    (tmp_path / "home").write_text("a file where the cache folder should be")
    monkeypatch.setenv("FARM_HOME", str(tmp_path / "home"))
    assert_dry_run_fails(job(tmp_path, "animate: {source: clip.mp4}\n"), "animate.source: cannot decode into")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("walk: {prompts: [a]}\n", "walk.prompts: a walk needs two different stops"),
        ("walk: {prompts: [a, b], seeds: [1, 2, 3]}\n", "walk.seeds: 3 seeds for 2 prompts"),
        ("walk: {prompts: [a, b], frames: 0}\n", "walk.frames: expected a whole number from 1"),
        ("walk: {prompts: a}\n", "walk.prompts: expected a list"),
        ('walk: {prompts: [a, b], schedules: {variation_strength: "0:(1)"}}\n', "walk.schedules.variation_strength:"),
        ("sweep: {prompt: [a, b]}\nwalk: {prompts: [a, b]}\n", "sweep.prompt: a walk sets prompt"),
        ("sweep: {mix_mode: [sum, slerp]}\nwalk: {prompts: [a, b]}\n", "sweep.mix_mode: this walk job sets"),
        ("walk: {prompts: [a], loop: true}\n", "walk.prompts: a walk needs two different stops"),
        ("walk: {prompts: [a, b], frames: 20000000}\n", "walk: 20000001 frames; at most 100000"),
    ],
)
def test_bad_walks_exit_2_naming_the_field(tmp_path: Path, text: str, message: str):
    path = tmp_path / "w.yaml"
    path.write_text("name: w\nkind: walk\ndefaults: {steps: 4, width: 64, height: 64}\n" + text)
    assert_dry_run_fails(path, message)


# ---------------------------------------------------------------------------------------
# The actor's side of a chain (no Ray): the init image it builds, and bytes that repeat


def render_chain(tasks: list[RenderTask], folder: Path) -> list[tuple[str, str]]:
    """Render a chained shot frame after frame with one BatchRenderer (on CUDA where there is
    one, in float16; else on CPU): each frame's (device, PNG sha256)."""
    from farm.actor import BatchRenderer

    renderer = BatchRenderer("chain", str(folder), "tiny", "auto", threads=1)
    rows = []
    for task in tasks:
        (row,) = renderer.render(Batch.of([task]))
        assert row["status"] == "ok", row["error"]
        rows.append((row["device"], row["image_sha256"]))
    return rows


def chained_tasks(tmp_path: Path, clip: Path, frames: int = 3) -> list[RenderTask]:
    text = f"animate: {{source: clip.mp4, end: {frames}, mode: chained, blend: 0.4, color_coherence: true}}\n"
    return list(load_job(job(tmp_path, text)).tasks())


def test_a_chained_frames_init_image_is_its_source_blended_with_the_frame_before(
    tiny_path: Path, tmp_path: Path, clip: Path
):
    from PIL import Image

    from farm.images import fit_image
    from farm.inputs import read_init_image
    from farm.storage import open_root
    from farm.video import blend_images, match_colors

    tasks = chained_tasks(tmp_path, clip)
    filesystem, base = open_root(str(tmp_path / "out"))
    errors: dict[str, str] = {}
    assert read_init_image(tasks[1], filesystem, base, errors) is None
    assert "is missing (did that frame fail?)" in errors[tasks[1].task_id]

    render_chain(tasks[:1], tmp_path / "out")
    frame0 = np.asarray(Image.open(tmp_path / "out" / "images" / f"{tasks[0].task_id}.png").convert("RGB"))
    source = fit_image(Path(tasks[1].init_image).read_bytes(), SIZE, SIZE)
    expected = match_colors(blend_images(source, frame0, 0.4), frame0)
    init = read_init_image(tasks[1], filesystem, base, {})
    assert np.array_equal(init, expected)
    assert not np.array_equal(init, source) and not np.array_equal(init, frame0)


def test_a_chained_shot_renders_the_same_bytes_twice(tiny_path: Path, tmp_path: Path, clip: Path):
    tasks = chained_tasks(tmp_path, clip)
    first = render_chain(tasks, tmp_path / "a")
    assert first == render_chain(tasks, tmp_path / "b")
    assert len({sha for _, sha in first}) == len(tasks)


@pytest.mark.gpu
def test_a_chained_shot_renders_the_same_bytes_twice_on_cuda(tiny_path: Path, tmp_path: Path, clip: Path):
    tasks = chained_tasks(tmp_path, clip, frames=6)
    first = render_chain(tasks, tmp_path / "a")
    assert {device for device, _ in first} == {"cuda"}
    assert first == render_chain(tasks, tmp_path / "b")

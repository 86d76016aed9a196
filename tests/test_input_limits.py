"""Input images over farm's pixel limit (images.MAX_INPUT_PIXELS) are refused from their header,
never decoded: when the job is read (exit 2, one line) and in the actor (the task's failed row).

The test image is a real, valid 13000x13000 PNG of about 20 KB (1-bit, all black), written here
chunk by chunk so making it costs no 169 MB image either. Decoding it costs ~0.8 GB.
"""

from __future__ import annotations

import dataclasses
import io
import re
import struct
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageFile

import farm.driver
import farm.images
from farm.cli import main
from farm.images import fit_image, sha256_bytes
from farm.inputs import read_init_image
from farm.spec import RenderTask

SIDE = 13000
OVER = f"{SIDE}x{SIDE} pixels is over farm's limit of 67,108,864 (8192x8192); resize it first"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = SIDE, height: int = SIDE) -> bytes:
    """A valid 1-bit greyscale PNG of width x height, all black: a few KB whatever its size."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte 0, then the packed pixels
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bomb") / "big.png"
    path.write_bytes(bomb_png())
    return path


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding any image fails the test: the limit must be applied from the header alone."""

    def load(self):
        raise AssertionError(f"decoded a {self.size[0]}x{self.size[1]} image")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(address):
        raise AssertionError("Ray started for a job that should have been refused")

    monkeypatch.setattr(farm.driver, "start_ray", refuse)


def test_the_test_image_is_small_and_really_that_big(bomb: Path):
    assert bomb.stat().st_size < 64_000
    with pytest.warns(Image.DecompressionBombWarning), Image.open(bomb) as image:
        assert image.size == (SIDE, SIDE) and image.mode == "1"
    assert SIDE * SIDE > farm.images.MAX_INPUT_PIXELS


def test_limit_takes_camera_photos_and_8k_video():
    farm.images.check_input_pixels(6000, 4000)  # a 24 Mpx photo
    farm.images.check_input_pixels(9504, 6336)  # 60 Mpx, a full-frame camera's largest
    farm.images.check_input_pixels(7680, 4320)  # an 8K video frame
    with pytest.raises(ValueError, match="over farm's limit"):
        farm.images.check_input_pixels(8192, 8193)


def test_check_reads_the_header_only(bomb: Path, no_decoding: None):
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=f"^{re.escape(OVER)}$"):
            farm.images.check_input_image(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20


def test_check_passes_a_file_that_is_not_an_image(tmp_path: Path):
    """Not an image: left to whoever decodes it, which fails that task alone (as before)."""
    path = tmp_path / "notes.png"
    path.write_bytes(b"an image")
    farm.images.check_input_image(path)


def test_fit_image_refuses_before_decoding(bomb: Path, no_decoding: None):
    with pytest.raises(ValueError, match=f"^{re.escape(OVER)}$"):
        fit_image(bomb.read_bytes(), 64, 64)


def test_fit_image_refuses_without_the_memory(bomb: Path):
    """Measured in a fresh process: tracemalloc cannot see Pillow's pixel buffers (C allocations)."""
    script = (
        "import resource, sys\n"
        "from farm.images import fit_image\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    fit_image(data, 64, 64)\n"
        "except ValueError as exc:\n"
        "    print(exc)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    # cwd elsewhere: `python -c` puts its cwd first on sys.path, and farm must come from where pytest's does.
    proc = subprocess.run(
        [sys.executable, "-c", script, str(bomb)], capture_output=True, text=True, timeout=120, cwd=bomb.parent
    )
    assert proc.returncode == 0, proc.stderr
    message, grown_mb = proc.stdout.splitlines()
    assert message == OVER
    assert int(grown_mb) < 50, f"fit_image grew the process by {grown_mb} MB"


def test_a_normal_init_image_still_fits():
    pixels = np.zeros((100, 150, 3), np.uint8)
    pixels[:, :75] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    assert fit_image(buffer.getvalue(), 64, 64).shape == (64, 64, 3)


def test_actor_gives_the_task_a_failed_row_naming_file_and_limit(bomb: Path, no_decoding: None):
    task = dataclasses.replace(
        RenderTask("tiny", "euler", "a cat", "", 1, 4, 7.5, 64, 64, init_image=str(bomb), strength=0.5),
        init_image_sha256=sha256_bytes(bomb.read_bytes()),
    )
    errors: dict[str, str] = {}
    assert read_init_image(task, None, "", errors) is None  # type: ignore[arg-type]
    assert errors == {task.task_id: f"init_image: {bomb}: {OVER}"}


def write_job(tmp_path: Path, text: str) -> Path:
    job = tmp_path / "job.yaml"
    job.write_text("name: big\ndefaults: {steps: 4, width: 64, height: 64, prompt: a cat}\n" + text)
    return job


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry_run", "render"])
def test_job_with_an_init_image_over_the_limit_exits_2_in_one_line(
    tmp_path: Path, bomb: Path, no_ray: None, no_decoding: None, dry_run: bool
):
    (tmp_path / "small.png").write_bytes(bomb_png(64, 64))
    (tmp_path / "big.png").write_bytes(bomb.read_bytes())
    job = write_job(tmp_path, "sweep: {init_image: [small.png, big.png]}\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["render", str(job), "--out", str(out), *(["--dry-run"] if dry_run else [])])
    assert result.exit_code == 2, result.output
    assert result.output.splitlines() == [f"error: sweep.init_image[1]: big.png: {OVER}"]
    assert not out.exists()


def dry_run_animation(tmp_path: Path, source: str):
    """`farm render --dry-run` of an animate job over ``source`` (relative to tmp_path)."""
    job = tmp_path / "anim.yaml"
    job.write_text(
        "name: anim\nkind: animate\ndefaults: {steps: 4, width: 64, height: 64, prompt: a cat}\n"
        f"animate: {{source: {source}}}\n"
    )
    return CliRunner().invoke(main, ["render", str(job), "--dry-run", "--out", str(tmp_path / "out")])


def test_image_folder_source_with_a_frame_over_the_limit_exits_2(tmp_path: Path, bomb: Path, no_decoding: None):
    frames = tmp_path / "frames"
    frames.mkdir()
    (frames / "0001.png").write_bytes(bomb_png(64, 64))
    (frames / "0002.png").write_bytes(bomb.read_bytes())
    result = dry_run_animation(tmp_path, "frames")
    assert result.exit_code == 2, result.output
    assert result.output.splitlines() == [f"error: animate.source: {frames / '0002.png'}: {OVER}"]


def test_video_source_over_the_limit_exits_2_before_decoding_a_frame(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A video's size comes from its stream (OpenCV's CAP_PROP_FRAME_WIDTH/HEIGHT) before probe_video
    decodes its frames. Encoding a 13000x13000 video is no test's business: the limit is lowered."""
    from test_animation import SIZE, write_clip

    import farm.video

    write_clip(tmp_path / "clip.mp4", frames=3)
    monkeypatch.setattr(farm.images, "MAX_INPUT_PIXELS", 32 * 32, raising=False)

    def probe(path):
        raise AssertionError("probe_video decoded the frames of a video over the limit")

    monkeypatch.setattr(farm.video, "probe_video", probe)
    result = dry_run_animation(tmp_path, "clip.mp4")
    assert result.exit_code == 2, result.output
    expected = (
        f"error: animate.source: clip.mp4: {SIZE}x{SIZE} pixels is over farm's limit of 1,024 (32x32); resize it first"
    )
    assert result.output.splitlines() == [expected]

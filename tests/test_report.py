"""farm report (farm.report): a static HTML gallery over a hand-made job (no Ray, no torch),
checked as text and in headless Chromium from file://."""

from __future__ import annotations

import hashlib
import html
import io
import json
import re
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from farm.cli import main
from farm.manifest import ManifestError, base_row, write_part
from farm.report import embed_json, write_report
from farm.spec import Batch, RenderTask

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
GUIDANCES = [3.0, 7.5]
SEEDS = [1, 2, 3]
SIZE = 64
HOSTILE = '</script><b>x</b> & "quotes"'


def write_image(job: Path, row: dict, rgb: tuple[int, int, int]) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), rgb).save(buffer, format="PNG")
    path = job / row["image_path"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    row["image_sha256"] = hashlib.sha256(buffer.getvalue()).hexdigest()


def make_job(root: Path) -> tuple[Path, list[str]]:
    """2 guidances x 3 seeds = 6 ok images (guidance 7.5 has the hostile prompt), a failed row
    and a step frame; returns the job folder and the ok task ids."""
    job = root / "job"
    ok = []
    for minute, guidance in enumerate(GUIDANCES):
        prompt = "a cat" if guidance == 3.0 else HOSTILE
        tasks = [RenderTask("tiny", "euler", prompt, "", s, 2, guidance, SIZE, SIZE) for s in SEEDS]
        batch = Batch.of(tasks)
        rows = []
        for index, task in enumerate(tasks):
            row = base_row("job", task, batch, index)
            row.update(status="ok", created_at=T0 + timedelta(minutes=minute), seconds=0.5)
            write_image(job, row, (int(guidance * 30), task.seed * 70, 200 - task.seed * 40))
            rows.append(row)
            ok.append(row["task_id"])
        write_part(str(job), rows)
    task = RenderTask("tiny", "euler", "a dog", "", 99, 2, 9.0, SIZE, SIZE)
    failed = base_row("job", task, Batch.of([task]), 0)
    failed.update(status="failed", error="boom", created_at=T0)
    frame = {**rows[0], "capture": "latents", "step_index": 0, "image_path": "frames/x/latents-0000.png"}
    write_image(job, frame, (0, 0, 0))
    write_part(str(job), [failed, frame])
    return job, ok


@pytest.fixture
def report(tmp_path):
    job, ok = make_job(tmp_path)
    info = write_report(str(job))
    return job, ok, info


def embedded_rows(page: str) -> list[dict]:
    m = re.search(r'<script type="application/json" id="rows">(.*?)</script>', page, re.S)
    assert m, "no rows script in the page"
    return json.loads(m.group(1))


# ---------------------------------------------------------------------------------------
# Without a browser


def test_report_writes_index_and_one_thumbnail_per_ok_row(report):
    job, ok, info = report
    index = job / "report" / "index.html"
    assert info.index == str(index) and index.is_file()
    assert info.images == 6
    thumbs = sorted(p.stem for p in (job / "report" / "thumbs").iterdir())
    assert thumbs == sorted(ok)
    with Image.open(job / "report" / "thumbs" / f"{ok[0]}.jpg") as im:
        assert max(im.size) <= 256


def test_embedded_json_is_the_ok_rows_only(report):
    job, ok, _ = report
    rows = embedded_rows((job / "report" / "index.html").read_text())
    assert sorted(r["task_id"] for r in rows) == sorted(ok)
    assert all(r["status"] == "ok" and r["capture"] is None for r in rows)
    assert {r["prompt"] for r in rows} == {"a cat", HOSTILE}
    assert {(r["guidance"], r["seed"]) for r in rows} == {(g, s) for g in GUIDANCES for s in SEEDS}


def test_hostile_prompt_cannot_break_out_of_the_script(report):
    job, _, _ = report
    page = (job / "report" / "index.html").read_text()
    assert "</script><b>" not in page
    assert "<b>x</b>" not in page
    # exactly the page's own script tags close
    assert page.count("</script>") == 4
    assert "\\u003c/script\\u003e" in page
    assert json.loads(embed_json([{"p": HOSTILE}])) == [{"p": HOSTILE}]


def test_page_has_no_external_resources(report):
    job, _, _ = report
    page = (job / "report" / "index.html").read_text()
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    assert "http://" not in page and "https://" not in page


def test_report_on_a_folder_that_is_not_a_job(tmp_path):
    with pytest.raises(ManifestError, match="no such folder"):
        write_report(str(tmp_path / "missing"))


def test_cli_report_prints_path_and_url(tmp_path):
    job, _ = make_job(tmp_path)
    result = CliRunner().invoke(main, ["report", str(job)])
    assert result.exit_code == 0, result.output
    index = job / "report" / "index.html"
    assert f"wrote {index}: 6 images" in result.output
    assert f"file://{index}" in result.output
    assert index.is_file()


def test_cli_report_output_dir_links_back_to_the_images(tmp_path):
    job, ok = make_job(tmp_path)
    out = tmp_path / "elsewhere" / "gallery"
    result = CliRunner().invoke(main, ["report", str(job), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert len(list((out / "thumbs").iterdir())) == 6
    page = (out / "index.html").read_text()
    base = json.loads(re.search(r'id="image-base">(.*?)</script>', page).group(1))[0]["b"]
    assert (out / (base + f"images/{ok[0]}.png")).resolve().is_file()


def test_cli_report_bad_folder_is_one_line_exit_2(tmp_path):
    result = CliRunner().invoke(main, ["report", str(tmp_path / "missing")])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0
    assert "no such folder" in result.output


# ---------------------------------------------------------------------------------------
# In headless Chromium, from file://


def chromium() -> str:
    for candidate in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium"):
        if candidate and Path(candidate).exists():
            return candidate
    pytest.fail("chromium not found: make test installs it (make browser: apt-get install chromium)")


def run_chromium(url: str, *args: str) -> str:
    cmd = [
        chromium(),
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--allow-file-access-from-files",
        "--virtual-time-budget=3000",
        *args,
        url,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def shown(dom: str) -> tuple[list[str], str]:
    ids = re.findall(r'<figure class="thumb" data-task-id="([0-9a-f]+)"', dom)
    count = re.search(r'<p id="count">(.*?)</p>', dom)
    return ids, html.unescape(count.group(1)) if count else ""


def test_chromium_renders_a_thumbnail_per_ok_row(report):
    job, ok, _ = report
    dom = run_chromium((job / "report" / "index.html").as_uri(), "--dump-dom")
    ids, count = shown(dom)
    assert sorted(ids) == sorted(ok)
    assert count == "6 of 6 images"
    # the hostile prompt is shown as text, not parsed as markup
    assert "<b>x</b>" not in dom
    assert html.escape("</script><b>x</b>", quote=False) in dom


def test_chromium_applies_a_filter_from_the_hash_and_screenshots(report, tmp_path):
    job, _, _ = report
    url = (job / "report" / "index.html").as_uri() + "#seed=2"
    dom = run_chromium(url, "--dump-dom")
    ids, count = shown(dom)
    assert len(ids) == 2
    assert count == "2 of 6 images"
    # the hash filled the filter controls
    assert re.search(r'<option value="seed" selected', dom)
    assert re.search(r'<input id="filter-text"[^>]*value="=2"', dom)

    url = (job / "report" / "index.html").as_uri() + "#prompt~" + "CAT"
    ids, count = shown(run_chromium(url, "--dump-dom"))
    assert len(ids) == 3 and count == "3 of 6 images"
    ids, count = shown(run_chromium((job / "report" / "index.html").as_uri() + "#guidance>5", "--dump-dom"))
    assert len(ids) == 3 and count == "3 of 6 images"

    shot = tmp_path / "shot.png"
    run_chromium(
        (job / "report" / "index.html").as_uri() + "#seed=2",
        f"--screenshot={shot}",
        "--window-size=1200,900",
        "--hide-scrollbars",
    )
    assert shot.is_file()
    with Image.open(shot) as image:
        assert image.size == (1200, 900)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 10
        # the seed-2 thumbnails' colours (guidance 3.0: (90, 140, 120)) are on screen
        assert any(abs(c[0] - 90) < 8 and abs(c[1] - 140) < 8 and abs(c[2] - 120) < 8 for _, c in colours)


def test_a_missing_image_is_left_out_of_the_gallery_with_a_warning(tmp_path):
    job, ok = make_job(tmp_path)
    (job / "images" / f"{ok[1]}.png").unlink()
    info = write_report(str(job))
    assert info.images == 5 and info.missing == [f"images/{ok[1]}.png"]
    rows = embedded_rows((job / "report" / "index.html").read_text())
    assert sorted(r["task_id"] for r in rows) == sorted(ok[:1] + ok[2:])
    assert not (job / "report" / "thumbs" / f"{ok[1]}.jpg").exists()
    result = CliRunner().invoke(main, ["report", str(job)])
    assert result.exit_code == 0, result.output
    assert "5 images" in result.stdout
    (warning,) = result.stderr.splitlines()
    assert warning.startswith(f"warning: left out 1 image whose file is missing (images/{ok[1]}.png)")

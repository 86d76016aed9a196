"""User text printed to a terminal: a prompt cannot drive it (no raw escape sequences), while the
machine formats (CSV, JSON) keep the exact text. No Ray, no torch: hand-made manifests."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from farm.cli import main
from farm.manifest import _cell, base_row, format_table, write_part
from farm.spec import Batch, RenderTask

# Set the window title (OSC 0 ... BEL), then clear the screen (CSI 2J).
HOSTILE = "a cat\x1b]0;pwned\x07\x1b[2J"
# Bytes a terminal acts on: ESC, BEL, CSI as one C1 byte (U+009B), and the other C0 controls.
RAW_CONTROLS = ["\x1b", "\x07", "\x9b", "\x00", "\r", "\x7f"]


def hostile_job(root: Path, prompts: list[str]) -> str:
    job = str(root / "job")
    tasks = [RenderTask("tiny", "euler", prompt, "", seed, 2, 7.5, 64, 64) for seed, prompt in enumerate(prompts)]
    batch = Batch.of(tasks)
    rows = [base_row("job", task, batch, index) for index, task in enumerate(tasks)]
    for row in rows:
        row.update(status="ok", seconds=0.5, image_sha256="ab" * 32)
    write_part(job, rows)
    return job


def query(job: str, fmt: str, *options: str, terminal: bool = True) -> str:
    """``farm query``'s output; ``terminal``: as a terminal gets it (click strips CSI sequences from
    what goes to a pipe, so without it a raw ``\\x1b[2J`` would be hidden from the test)."""
    sql = "SELECT prompt FROM manifest ORDER BY seed"
    result = CliRunner().invoke(main, ["query", job, sql, "--format", fmt, *options], color=terminal)
    assert result.exit_code == 0, result.output
    return result.output


def test_table_output_escapes_a_prompts_terminal_sequences(tmp_path: Path):
    job = hostile_job(tmp_path, [HOSTILE])
    table = query(job, "table")
    assert not [c for c in RAW_CONTROLS if c in table], repr(table)
    assert "a cat\\x1b]0;pwned\\x07\\x1b[2J" in table  # shown, visibly


def test_csv_and_json_keep_the_exact_text(tmp_path: Path):
    text = HOSTILE + " \x9b\x7f\u202e end\nsecond line\ttab"
    job = hostile_job(tmp_path, [text])
    assert [json.loads(line)["prompt"] for line in query(job, "json").splitlines()] == [text]
    (row,) = csv.DictReader(io.StringIO(query(job, "csv")))
    assert row["prompt"] == text
    for fmt in ("csv", "json"):  # -o writes the same text to a file
        query(job, fmt, "-o", str(tmp_path / f"out.{fmt}"))
        assert (tmp_path / f"out.{fmt}").read_text() == query(job, fmt)


def test_csv_piped_keeps_the_exact_text(tmp_path: Path):
    job = hostile_job(tmp_path, [HOSTILE])
    (row,) = csv.DictReader(io.StringIO(query(job, "csv", terminal=False)))
    assert row["prompt"] == HOSTILE


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("two\nlines\tand a tab\r", "two\\nlines\\tand a tab\\r"),
        ("nul\x00 del\x7f csi\x9b1m", "nul\\x00 del\\x7f csi\\x9b1m"),
        ("abc\u202edcba\u2066x\u2069", "abc\\u202edcba\\u2066x\\u2069"),  # bidi override and isolate
        ("line\u2028sep", "line\\u2028sep"),
        # Printable text stays as it is: accents, CJK, emoji joined by ZWJ, backslashes.
        ("café 猫 👩\u200d🚀 C:\\x", "café 猫 👩\u200d🚀 C:\\x"),
    ],
)
def test_cell_escapes_controls_and_nothing_else(text: str, shown: str):
    assert _cell(text, None) == shown


def test_column_names_are_escaped_too(tmp_path: Path):
    import pyarrow as pa

    table = pa.table({"\x1b[2J": ["x"]})
    out = format_table(table)
    assert "\x1b" not in out and out.splitlines()[0].strip() == "\\x1b[2J"


def test_a_long_escaped_value_is_still_cut_to_the_width():
    assert len(_cell("\x1b" * 100, 60)) == 60


def test_dry_run_shows_prompts_escaped(tmp_path: Path):
    """farm render --dry-run prints each prompt with repr(): already escaped; kept that way."""
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({"defaults": {"prompt": HOSTILE + "\x9b\u202e", "steps": 2, "width": 64, "height": 64}}))
    args = ["render", str(job), "--dry-run", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(main, args, color=True)
    assert result.exit_code == 0, result.output
    assert not [c for c in [*RAW_CONTROLS, "\u202e"] if c in result.output], repr(result.output)
    assert "\\x1b]0;pwned\\x07\\x1b[2J\\x9b\\u202e" in result.output

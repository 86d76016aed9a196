"""The manifest schema, atomic part files and the column table in docs/manifest.md."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from farm.manifest import COLUMNS, SCHEMA, ok_task_ids, query, read_manifest, write_part
from farm.spec import RenderTask

MANIFEST_DOCS = Path(__file__).resolve().parents[1] / "docs" / "manifest.md"


def row(task_id: str, status: str = "ok") -> dict:
    return {"task_id": task_id, "status": status, "prompt": "p", "seed": 1}


def test_parts_are_written_whole_and_read_as_one_dataset(tmp_path: Path):
    root = str(tmp_path / "job")
    first = write_part(root, [row("a"), row("b", "failed")])
    write_part(root, [row("c")])
    assert pq.read_schema(first) == SCHEMA
    files = sorted(p.name for p in (tmp_path / "job" / "manifest").iterdir())
    assert len(files) == 2 and all(f.startswith("part-") and f.endswith(".parquet") for f in files)
    assert sorted(read_manifest(root).column("task_id").to_pylist()) == ["a", "b", "c"]
    assert ok_task_ids(root) == {"a", "c"}


def test_hidden_temporary_files_are_ignored(tmp_path: Path):
    root = str(tmp_path / "job")
    write_part(root, [row("a")])
    (tmp_path / "job" / "manifest" / ".part-half-written.parquet.tmp").write_bytes(b"PAR1 truncated")
    assert read_manifest(root).num_rows == 1


def test_empty_manifest_reads_and_queries(tmp_path: Path):
    root = str(tmp_path / "nothing")
    assert read_manifest(root).num_rows == 0
    assert ok_task_ids(root) == set()
    assert query(root, "SELECT count(*) AS n FROM manifest").to_pylist() == [{"n": 0}]


def test_every_task_field_is_a_column():
    names = {name for name, _, _ in COLUMNS}
    assert set(RenderTask.__dataclass_fields__) <= names


def test_docs_document_every_column():
    text = MANIFEST_DOCS.read_text()
    for name, _, _ in COLUMNS:
        assert f"| `{name}` |" in text, name


def test_repeated_column_names_stay_apart():
    import pyarrow as pa

    from farm.manifest import format_table

    table = pa.table([pa.array([1]), pa.array([2])], names=["a", "a"])
    assert format_table(table, "json") == '{"a": 1, "a_1": 2}'
    assert format_table(table).splitlines()[2].split() == ["1", "2"]


def test_a1111_parameters_chunk():
    import io

    import numpy as np
    from PIL import Image

    from farm.images import encode_png, read_png_metadata

    task = RenderTask("tiny", "euler_a", "a cat", "blurry", 42, 20, 7.5, 64, 48)
    meta = {"task": json.loads(task.canonical_json()), "task_id": task.task_id, "model_hash": "abcdef0123456789"}
    data = encode_png(np.zeros((48, 64, 3), np.uint8), meta)
    with Image.open(io.BytesIO(data)) as image:
        text = image.text["parameters"]
        assert image.size == (64, 48)
    assert text.splitlines() == [
        "a cat",
        "Negative prompt: blurry",
        "Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 64x48, Model hash: abcdef0123, Model: tiny",
    ]
    assert read_png_metadata(data) == meta


def test_a1111_parameters_name_variation_and_denoising_strength():
    from farm.images import a1111_parameters

    task = RenderTask(
        "tiny", "euler", "a dog", "", 1, 20, 7.5, 64, 64, variation_seed=9, variation_strength=0.25, strength=0.5
    )
    line = a1111_parameters({"task": json.loads(task.canonical_json())}).splitlines()[-1]
    assert line.endswith("Variation seed: 9, Variation seed strength: 0.25, Denoising strength: 0.5")


def test_every_scheduler_has_an_a1111_sampler_name():
    """images.py (a tool, below spec) keys A1111's names by farm's scheduler names: keep both in step."""
    from farm.images import A1111_SAMPLERS
    from farm.spec import SCHEDULERS

    assert set(A1111_SAMPLERS) == set(SCHEDULERS)

"""The files a job names (init images, textual-inversion files, LoRAs): made absolute against the
job's folder, checked to exist, hashed, and an init image's size checked from its header.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from farm.models import file_sha256
from farm.spec.fields import SpecError
from farm.spec.task import Embedding, Lora

# Task fields that name files.
FILE_FIELDS = ("init_image", "embeddings", "loras", "controlnet")
# A control image that is an animate job's own source frame, resolved frame by frame.
SOURCE_FRAME = "source"

# One sweep axis, as job.py holds it: field names, and per value a tuple of one value per name.
Axis = tuple[tuple[str, ...], tuple[tuple[Any, ...], ...]]


def resolve_files(defaults: dict[str, Any], axes: list[Axis], base_dir: Path) -> dict[str, str]:
    """Make init image and embedding paths absolute, check they exist, and hash them; an init image
    over the input pixel limit is refused from its header (images.MAX_INPUT_PIXELS)."""
    hashes: dict[str, str] = {}
    images: set[str] = set()  # the init images whose size was checked (a sweep may name one many times)

    def resolve(path: str, where: str, image: bool = False) -> str:
        full = Path(path).expanduser()
        full = full if full.is_absolute() else base_dir / full
        try:
            if not full.is_file():
                raise SpecError(f"{where}: no such file: {path}")
            resolved = str(full.resolve())
            if image and resolved not in images:
                check_image(resolved, f"{where}: {path}")
                images.add(resolved)
            if resolved not in hashes:
                hashes[resolved] = file_sha256(resolved)
        except OSError as exc:
            raise SpecError(f"{where}: cannot read {path} ({exc.strerror or exc})") from exc
        return resolved

    def fix(key: str, value: Any, where: str) -> Any:
        if key == "init_image" and value is not None:
            return resolve(value, where, image=True)
        if key == "embeddings":
            out = []
            for i, e in enumerate(value):
                path = resolve(e.path, f"{where}[{i}]")
                out.append(Embedding(path=path, sha256=hashes[path], token=e.token))
            return tuple(out)
        if key == "controlnet":
            return tuple(
                unit
                if unit.image == SOURCE_FRAME
                else dataclasses.replace(
                    unit,
                    image=(path := resolve(unit.image, f"{where}[{i}].image", image=True)),
                    image_sha256=hashes[path],
                )
                for i, unit in enumerate(value)
            )
        if key == "loras":
            return tuple(
                Lora(path=(path := resolve(lora.path, f"{where}[{i}].path")), sha256=hashes[path], weight=lora.weight)
                for i, lora in enumerate(value)
            )
        return value

    for key in FILE_FIELDS:
        defaults[key] = fix(key, defaults[key], f"defaults.{key}")
    for i, (names, rows) in enumerate(axes):
        if set(FILE_FIELDS) & set(names):
            fixed = tuple(
                tuple(fix(n, v, f"sweep.{n}[{j}]") for n, v in zip(names, row, strict=True))
                for j, row in enumerate(rows)
            )
            axes[i] = (names, fixed)
    return hashes


def check_image(path: str, where: str) -> None:
    """SpecError when an input image's header says it is over the input pixel limit (nothing is decoded)."""
    # Here, not at the top: farm.images loads numpy and PIL, which a job without images never needs.
    from farm.images import check_input_image

    try:
        check_input_image(path)
    except ValueError as exc:
        raise SpecError(f"{where}: {exc}") from exc


def resolve_folder(path: str, base_dir: Path, where: str = "safety_check.checker") -> Path:
    """A folder the job names, made absolute against the job's folder; SpecError when it is not one."""
    full = Path(path).expanduser()
    full = full if full.is_absolute() else base_dir / full
    if not full.is_dir():
        raise SpecError(f"{where}: no such folder: {path}")
    return full.resolve()


def check_source_controls(kind: str, defaults: dict[str, Any], axes: list[Axis]) -> None:
    """A control image ``source`` (the frame's own source) exists only in an animate job."""
    if kind == "animate":
        return
    values = [defaults["controlnet"]] + [
        row[names.index("controlnet")] for names, rows in axes if "controlnet" in names for row in rows
    ]
    for units in values:
        for i, unit in enumerate(units):
            if unit.image == SOURCE_FRAME:
                raise SpecError(
                    f"controlnet[{i}].image: source is each frame's own source frame, only in kind: animate; "
                    "give an image path"
                )


def resolve_source_controls(fields: dict[str, Any]) -> None:
    """An animate frame's ``source`` control images become its own source frame (path and sha256)."""
    units = fields["controlnet"]
    if any(unit.image == SOURCE_FRAME for unit in units):
        fields["controlnet"] = tuple(
            dataclasses.replace(unit, image=fields["init_image"], image_sha256=fields["init_image_sha256"])
            if unit.image == SOURCE_FRAME
            else unit
            for unit in units
        )

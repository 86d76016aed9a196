"""Textual-inversion files -> vectors: the one place in the model layer that reads these files.

``load_embeddings`` turns a job's ``Embedding`` references into ``LoadedEmbedding`` tensors for
``text.PromptEncoder`` and ``render.render_batch``, which touch no files. Formats: diffusers
(``{token: vectors}`` in ``.safetensors`` or ``.bin``) and A1111 (``string_to_param`` in ``.pt``,
``emb_params`` in ``.safetensors``). Pickles (``.bin``, ``.pt``) load only through
``torch.load(weights_only=True)`` (DESIGN.md, "Safety").
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from farm.models import Components, file_sha256
from farm.spec import Embedding
from farm.text import LoadedEmbedding, PromptEncoder, PromptError, check_textual_inversion

# .bin and .pt are pickles, read only through torch.load(weights_only=True); other suffixes
# (A1111's embeddings hidden in .png files, say) are not supported.
EMBEDDING_SUFFIXES = (".safetensors", ".bin", ".pt")


def load_embeddings(
    embeddings: Sequence[Embedding], components: Components | None = None, long_prompt: str = "truncate"
) -> tuple[LoadedEmbedding, ...]:
    """Read each textual-inversion file, in order -> its token and vectors.

    Raises ``PromptError`` ("embeddings[i]: ...") for the first file that cannot be read or has
    changed since the job was read. Given the ``components`` (and ``long_prompt``) the vectors are
    for, a problem the model has with a file before that one (vector size, token), or with the
    long-prompt mode, is raised instead: the order in which ``PromptEncoder`` checks them. A family
    that takes no textual-inversion files (SDXL) is refused before any file is read.
    """
    if components is not None and embeddings:
        check_textual_inversion(components)
    loaded: list[LoadedEmbedding] = []
    for index, embedding in enumerate(embeddings):
        try:
            loaded.append(load_embedding(embedding))
        except PromptError as exc:
            if components is not None:
                PromptEncoder(components, loaded, long_prompt)  # raises for an earlier problem
            raise PromptError(f"embeddings[{index}]: {exc}") from exc
    return tuple(loaded)


def load_embedding(embedding: Embedding) -> LoadedEmbedding:
    """One file, checked against the sha256 the job recorded, as vectors."""
    check_sha256(embedding)
    token, vectors = load_embedding_file(embedding.path, embedding.token)
    return LoadedEmbedding(embedding, token, vectors)


def check_sha256(embedding: Embedding) -> None:
    """The file must be the one the job recorded, or the manifest row would not be its recipe."""
    if not embedding.sha256:
        return
    try:
        actual = file_sha256(embedding.path)
    except OSError as exc:
        raise PromptError(f"{embedding.path}: cannot read ({exc.strerror or exc})") from exc
    if actual != embedding.sha256:
        raise PromptError(
            f"{embedding.path}: changed since the job was read (sha256 {actual[:12]}..., expected "
            f"{embedding.sha256[:12]}...)"
        )


def load_embedding_file(path: str, token: str | None = None) -> tuple[str, torch.Tensor]:
    """Read a textual-inversion file (diffusers or A1111) -> (trigger token, vectors (n, d) float32 on CPU)."""
    found_token, vectors = find_vectors(read_embedding_file(path), path)
    return token or found_token or Path(path).stem, as_vector_rows(vectors, path)


def read_embedding_file(path: str) -> Any:
    """The file's contents: a dict of tensors (or a bare tensor), read without running code."""
    suffix = Path(path).suffix.lower()
    if suffix not in EMBEDDING_SUFFIXES:
        raise PromptError(f"{path}: expected a textual-inversion file ending in {', '.join(EMBEDDING_SUFFIXES)}")
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as exc:  # OSError, SafetensorError, ...: the user needs one line either way
            raise PromptError(f"{path}: cannot read as safetensors ({exc})") from exc
    try:
        # A pickle may hold any object, and unpickling it can run code; weights_only admits only
        # tensors and plain containers (DESIGN.md: the safety contract for textual-inversion .bin files).
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch words every failure "Weights only load failed"; a refused object names a GLOBAL or
        # the allowlist (add_safe_globals), while a corrupt file fails on an unknown opcode.
        refused = re.search(r"GLOBAL (\S+)|add_safe_globals", str(exc))
        if refused:
            what = f" ({refused.group(1)})" if refused.group(1) else ""
            raise PromptError(
                f"{path}: refused: the pickle holds a Python object{what} beyond tensors, and loading it "
                "could run code; convert the embedding to .safetensors"
            ) from exc
        raise PromptError(f"{path}: cannot read: not a valid torch.save file") from exc
    except Exception as exc:  # a corrupt file raises RuntimeError, EOFError, OSError, ... from torch.load
        raise PromptError(f"{path}: cannot read ({first_line(exc)})") from exc


def first_line(exc: Exception) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def find_vectors(state: Any, path: str) -> tuple[str | None, Any]:
    """The (stored token name, vectors) of a loaded file, in any of the formats in use."""
    if isinstance(state, torch.Tensor):  # a bare tensor saved with torch.save: no name stored
        return None, state
    if not isinstance(state, dict):
        raise PromptError(f"{path}: holds a {type(state).__name__}, not a textual-inversion embedding")
    if "string_to_param" in state:  # A1111 .pt: {'string_to_param': {'*': (n, d)}, 'name': ...}
        params = state["string_to_param"]
        if not isinstance(params, dict) or "*" not in params:
            raise PromptError(f"{path}: 'string_to_param' has no '*' entry (an A1111 embedding has one)")
        name = state.get("name")
        return (name if isinstance(name, str) and name else None), params["*"]
    if "emb_params" in state:  # A1111 .safetensors: no name stored, the file stem serves
        return None, state["emb_params"]
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise PromptError(f"{path}: holds no tensors; not a textual-inversion embedding")
    if len(tensors) > 1:
        keys = ", ".join(sorted(map(str, tensors))[:4])
        raise PromptError(
            f"{path}: holds {len(tensors)} tensors ({keys}); expected one (diffusers), "
            "or 'string_to_param' / 'emb_params' (A1111)"
        )
    ((name, vectors),) = tensors.items()  # diffusers: {token: vectors}
    return str(name), vectors


def as_vector_rows(vectors: Any, path: str) -> torch.Tensor:
    """Vectors as a float32 CPU tensor (n, d); a single vector (d,) becomes (1, d)."""
    if not isinstance(vectors, torch.Tensor):
        raise PromptError(f"{path}: the embedding is a {type(vectors).__name__}, not a tensor")
    rows = vectors.detach().to("cpu", torch.float32)
    if rows.ndim == 1:
        rows = rows.unsqueeze(0)
    if rows.ndim != 2 or 0 in rows.shape:
        raise PromptError(f"{path}: vectors of shape {tuple(vectors.shape)}; expected (d,) or (n, d)")
    if not torch.isfinite(rows).all():
        raise PromptError(f"{path}: the vectors hold NaN or infinite values")
    return rows

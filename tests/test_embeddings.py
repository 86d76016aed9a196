"""Textual-inversion files -> vectors (farm.embeddings): formats, the pickle refusal, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from farm.embeddings import load_embedding_file, load_embeddings
from farm.models import file_sha256
from farm.spec import Embedding
from farm.text import PromptEncoder, PromptError


def hidden_size(components) -> int:
    return components.text_encoder.config.hidden_size


def embedding(path: Path, token: str | None = None) -> Embedding:
    return Embedding(path=str(path), sha256=file_sha256(path), token=token)


def write_diffusers_safetensors(path: Path, rows: torch.Tensor) -> Path:
    save_file({"<tok>": rows}, path / "learned_embeds.safetensors")
    return path / "learned_embeds.safetensors"


def write_diffusers_bin(path: Path, rows: torch.Tensor) -> Path:
    torch.save({"<tok>": rows}, path / "learned_embeds.bin")
    return path / "learned_embeds.bin"


def write_a1111_pt(path: Path, rows: torch.Tensor) -> Path:
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": rows}, "name": "<tok>", "step": 3000}
    torch.save(data, path / "whatever.pt")
    return path / "whatever.pt"


def write_a1111_safetensors(path: Path, rows: torch.Tensor) -> Path:
    save_file({"emb_params": rows}, path / "<tok>.safetensors")  # A1111 stores no name: the stem is the token
    return path / "<tok>.safetensors"


@pytest.mark.parametrize(
    "write", [write_diffusers_safetensors, write_diffusers_bin, write_a1111_pt, write_a1111_safetensors]
)
@pytest.mark.parametrize("count", [1, 3])
def test_load_embedding_file_formats(tmp_path, write, count):
    rows = torch.randn(count, 32, dtype=torch.float16)
    path = write(tmp_path, rows if count > 1 or write is write_a1111_pt else rows[0])
    token, vectors = load_embedding_file(str(path))
    assert token == "<tok>"
    assert vectors.dtype == torch.float32 and vectors.device.type == "cpu"
    assert torch.equal(vectors, rows.float())
    assert load_embedding_file(str(path), token="<mine>")[0] == "<mine>"


def test_loaded_vectors_stand_in_for_their_token(tiny_components, tmp_path):
    """A file holding the model's own row for 'rabbit', read and encoded, makes '<r>' encode like 'rabbit'."""
    table = tiny_components.text_encoder.embeddings.token_embedding.weight
    (rabbit,) = tiny_components.tokenizer("rabbit", add_special_tokens=False).input_ids
    path = tmp_path / "rabbit.safetensors"
    save_file({"<r>": table[rabbit].detach().clone()}, path)
    (loaded,) = load_embeddings([embedding(path)])
    assert loaded.embedding == embedding(path) and loaded.token == "<r>" and loaded.vectors.shape == (1, 32)
    got = PromptEncoder(tiny_components, [loaded]).encode("a portrait of <r> dog")
    assert torch.equal(got.embeds, PromptEncoder(tiny_components).encode("a portrait of rabbit dog").embeds)


def test_bin_files_load_weights_only(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.bin"
    torch.save({"<tok>": RunsCode(str(marker))}, path)
    refused = r"^embeddings\[0\]: .*evil.bin: refused: the pickle holds a Python object \(\S*write_marker\)"
    with pytest.raises(PromptError, match=refused):
        load_embeddings([embedding(path)])
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is real: unpickled the unsafe way, it runs
    assert marker.read_text() == "pwned"


class RunsCode:
    """An object whose unpickling runs a function: what weights_only must refuse."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return write_marker, (self.marker,)


def write_marker(marker: str) -> None:
    Path(marker).write_text("pwned")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("corrupt.safetensors", b"not a safetensors file at all", "cannot read as safetensors"),
        ("corrupt.bin", b"\x00\x01 not a pickle", "cannot read: not a valid torch.save file"),
        ("truncated.pt", b"", "cannot read"),
        ("empty.pt", None, "holds no tensors"),
        ("style.png", b"\x89PNG", "expected a textual-inversion file ending in .safetensors, .bin, .pt"),
    ],
)
def test_unreadable_embedding_files(tmp_path, name, content, message):
    path = tmp_path / name
    if content is None:
        torch.save({"name": "x", "step": 10}, path)
    else:
        path.write_bytes(content)
    good = tmp_path / "good.safetensors"
    save_file({"<good>": torch.zeros(32)}, good)
    with pytest.raises(PromptError, match=rf"^embeddings\[1\]: {path}: {message}"):
        load_embeddings([embedding(good), embedding(path)])


def test_changed_file_is_refused(tmp_path):
    path = tmp_path / "tok.safetensors"
    save_file({"<tok>": torch.zeros(32)}, path)
    stale = Embedding(path=str(path), sha256="0" * 64)
    with pytest.raises(PromptError, match=r"^embeddings\[0\]: .*changed since the job was read"):
        load_embeddings([stale])


def test_a_missing_file_is_named(tmp_path):
    gone = Embedding(path=str(tmp_path / "gone.safetensors"), sha256="0")
    with pytest.raises(PromptError, match=r"^embeddings\[0\]: .*gone.safetensors: cannot read \(No such file"):
        load_embeddings([gone])


def test_an_earlier_files_problem_with_the_model_comes_first(tiny_components, tmp_path):
    """Given the model, problems come in file order, as the encoder checks them: file 0's vector
    size before file 1's absence."""
    big = tmp_path / "sd15.safetensors"
    save_file({"<big>": torch.zeros(768)}, big)
    gone = Embedding(path=str(tmp_path / "gone.safetensors"), sha256="0")
    with pytest.raises(PromptError, match=r"^embeddings\[1\]: .*gone.safetensors: cannot read"):
        load_embeddings([embedding(big), gone])  # without the model: only the files are read
    with pytest.raises(PromptError, match=r"^embeddings\[0\]: .*sd15.safetensors holds vectors of size 768"):
        load_embeddings([embedding(big), gone], tiny_components)
    with pytest.raises(PromptError, match=r"^long_prompt: unknown mode 'wrap'"):
        load_embeddings([gone], tiny_components, "wrap")

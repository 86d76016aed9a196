"""The text side of the render core: plain encoding, textual inversion, token mixing, long prompts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from farm.models import file_sha256
from farm.spec import Embedding, TokenMix
from farm.text import EncodedPrompt, PromptEncoder, PromptError, load_embedding_file, pad_chunks

# Words that are one token in the tiny vocabulary ("cat" and "photo" are two there).
PROMPT = "a portrait of a puppy in the snow"


def hidden_size(components) -> int:
    return components.text_encoder.config.hidden_size


def token_id(components, word: str) -> int:
    (only,) = components.tokenizer(word, add_special_tokens=False).input_ids
    return only


def table_row(components, word: str) -> torch.Tensor:
    """The model's own token embedding of a one-token word, as a textual-inversion file would hold it."""
    return components.text_encoder.embeddings.token_embedding.weight[token_id(components, word)].detach().clone()


def reference(components, text: str) -> torch.Tensor:
    """What the text encoder gives for a prompt through its ordinary forward."""
    tokenizer = components.tokenizer
    ids = tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return components.text_encoder(ids)[0]


def embedding(path: Path, token: str | None = None) -> Embedding:
    return Embedding(path=str(path), sha256=file_sha256(path), token=token)


# ---------------------------------------------------------------------------------------
# Plain prompts


def test_plain_encode_matches_text_encoder_and_is_reproducible(tiny_components):
    encoded = PromptEncoder(tiny_components).encode(PROMPT)
    assert encoded.embeds.shape == (1, 77, hidden_size(tiny_components))
    assert encoded.embeds.dtype == tiny_components.text_encoder.dtype
    assert encoded.tokens == len(PROMPT.split())
    assert not encoded.truncated
    torch.testing.assert_close(encoded.embeds, reference(tiny_components, PROMPT), atol=1e-5, rtol=0)
    assert torch.equal(encoded.embeds, PromptEncoder(tiny_components).encode(PROMPT).embeds)


def test_encoding_does_not_depend_on_other_prompts(tiny_components):
    busy = PromptEncoder(tiny_components)
    for other in ("a dog", "", "a robot riding a horse at night " * 3):
        busy.encode(other)
    alone = PromptEncoder(tiny_components).encode(PROMPT)
    assert torch.equal(busy.encode(PROMPT).embeds, alone.embeds)


def test_encode_is_cached(tiny_components):
    encoder = PromptEncoder(tiny_components)
    first = encoder.encode(PROMPT)
    assert encoder.encode(PROMPT) is first
    assert encoder.encode(PROMPT, [TokenMix("puppy", "skunk", 0.5)]) is not first


def test_unknown_long_prompt_mode(tiny_components):
    with pytest.raises(PromptError, match=r"^long_prompt: unknown mode 'wrap'"):
        PromptEncoder(tiny_components, long_prompt="wrap")


# ---------------------------------------------------------------------------------------
# Textual inversion


def test_textual_inversion_changes_only_positions_from_the_token_on(tiny_components, tmp_path):
    vector = torch.randn(hidden_size(tiny_components), generator=torch.Generator().manual_seed(0))
    path = tmp_path / "learned_embeds.safetensors"
    save_file({"<bird-style>": vector}, path)
    with_token = PromptEncoder(tiny_components, [embedding(path)]).encode("a portrait of <bird-style> dog").embeds
    plain = PromptEncoder(tiny_components).encode("a portrait of rabbit dog").embeds
    # BOS, a, portrait, of: causal attention never lets them see the token at position 4.
    assert torch.equal(with_token[0, :4], plain[0, :4])
    assert not torch.isclose(with_token[0, 4:], plain[0, 4:]).all(dim=-1).any()


def test_textual_inversion_vector_stands_in_for_its_token(tiny_components, tmp_path):
    """A file holding the model's own row for 'rabbit' makes '<r>' encode exactly like 'rabbit'."""
    path = tmp_path / "rabbit.safetensors"
    save_file({"<r>": table_row(tiny_components, "rabbit")}, path)
    encoder = PromptEncoder(tiny_components, [embedding(path)])
    got = encoder.encode("a portrait of <r> dog")
    assert got.tokens == 5
    assert torch.equal(got.embeds, PromptEncoder(tiny_components).encode("a portrait of rabbit dog").embeds)


def test_multi_vector_embedding_expands_like_diffusers(tiny_components, tmp_path):
    rows = torch.stack([table_row(tiny_components, "rabbit"), table_row(tiny_components, "dog")])
    path = tmp_path / "pair.safetensors"
    save_file({"emb_params": rows}, path)
    encoder = PromptEncoder(tiny_components, [embedding(path, token="<pair>")])
    # diffusers' names for the extra vectors: <pair>_1, ...
    assert len(encoder.tokenizer("<pair>_1", add_special_tokens=False).input_ids) == 1
    got = encoder.encode("a <pair> in the snow")
    assert got.tokens == 6
    assert torch.equal(got.embeds, PromptEncoder(tiny_components).encode("a rabbit dog in the snow").embeds)


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
def test_load_embedding_file_formats(tiny_components, tmp_path, write, count):
    rows = torch.randn(count, hidden_size(tiny_components), dtype=torch.float16)
    path = write(tmp_path, rows if count > 1 or write is write_a1111_pt else rows[0])
    token, vectors = load_embedding_file(str(path))
    assert token == "<tok>"
    assert vectors.dtype == torch.float32 and vectors.device.type == "cpu"
    assert torch.equal(vectors, rows.float())
    assert load_embedding_file(str(path), token="<mine>")[0] == "<mine>"


def test_bin_files_load_weights_only(tiny_components, tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.bin"
    torch.save({"<tok>": RunsCode(str(marker))}, path)
    refused = r"^embeddings\[0\]: .*evil.bin: refused: the pickle holds a Python object \(\S*write_marker\)"
    with pytest.raises(PromptError, match=refused):
        PromptEncoder(tiny_components, [embedding(path)])
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


def test_wrong_vector_size(tiny_components, tmp_path):
    path = tmp_path / "sd15.safetensors"
    save_file({"<tok>": torch.zeros(768)}, path)
    with pytest.raises(PromptError) as info:
        PromptEncoder(tiny_components, [embedding(path)])
    assert str(info.value) == f"embeddings[0]: {path} holds vectors of size 768; this model's text encoder needs 32"


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
def test_unreadable_embedding_files(tiny_components, tmp_path, name, content, message):
    path = tmp_path / name
    if content is None:
        torch.save({"name": "x", "step": 10}, path)
    else:
        path.write_bytes(content)
    good = tmp_path / "good.safetensors"
    save_file({"<good>": torch.zeros(hidden_size(tiny_components))}, good)
    with pytest.raises(PromptError, match=rf"^embeddings\[1\]: {path}: {message}"):
        PromptEncoder(tiny_components, [embedding(good), embedding(path)])


def test_token_already_in_vocabulary(tiny_components, tmp_path):
    path = tmp_path / "dog.safetensors"
    save_file({"dog": torch.zeros(hidden_size(tiny_components))}, path)
    with pytest.raises(PromptError, match=r"^embeddings\[0\]: token 'dog' is already a single token"):
        PromptEncoder(tiny_components, [embedding(path)])
    with pytest.raises(PromptError, match=r"^embeddings\[1\]: token '<x>' is already a single token"):
        PromptEncoder(tiny_components, [embedding(path, "<x>"), embedding(path, "<x>")])


def test_changed_file_is_refused(tiny_components, tmp_path):
    path = tmp_path / "tok.safetensors"
    save_file({"<tok>": torch.zeros(hidden_size(tiny_components))}, path)
    stale = Embedding(path=str(path), sha256="0" * 64)
    with pytest.raises(PromptError, match=r"^embeddings\[0\]: .*changed since the job was read"):
        PromptEncoder(tiny_components, [stale])


def test_shared_model_is_not_changed(tiny_components, tmp_path):
    tokenizer = tiny_components.tokenizer
    table = tiny_components.text_encoder.embeddings.token_embedding.weight
    size, before = len(tokenizer), table.detach().clone()
    path = tmp_path / "tok.safetensors"
    save_file({"<new-tok>": torch.ones(2, hidden_size(tiny_components))}, path)
    encoder = PromptEncoder(tiny_components, [embedding(path)])
    encoder.encode("a <new-tok> dog")
    assert len(encoder.tokenizer) == size + 2
    assert len(tokenizer) == size
    assert len(tokenizer("<new-tok>", add_special_tokens=False).input_ids) > 1
    assert table.shape == before.shape and torch.equal(table, before)


# ---------------------------------------------------------------------------------------
# Token mixing


def test_token_mix_weight_zero_is_the_plain_prompt(tiny_components):
    encoder = PromptEncoder(tiny_components)
    mixed = encoder.encode(PROMPT, [TokenMix("puppy", "skunk", 0.0)])
    assert torch.equal(mixed.embeds, encoder.encode(PROMPT).embeds)


def test_token_mix_weight_one_is_the_other_word(tiny_components):
    encoder = PromptEncoder(tiny_components)
    mixed = encoder.encode(PROMPT, [TokenMix("puppy", "skunk", 1.0)]).embeds
    skunk = encoder.encode(PROMPT.replace("puppy", "skunk")).embeds
    torch.testing.assert_close(mixed, skunk, atol=1e-6, rtol=0)


def test_token_mix_halfway_changes_from_the_token_on(tiny_components):
    encoder = PromptEncoder(tiny_components)
    plain = encoder.encode(PROMPT).embeds
    skunk = encoder.encode(PROMPT.replace("puppy", "skunk")).embeds
    mixed = encoder.encode(PROMPT, [TokenMix("puppy", "skunk", 0.5)]).embeds
    at = PROMPT.split().index("puppy") + 1  # after BOS
    assert torch.equal(mixed[0, :at], plain[0, :at])
    for other in (plain, skunk):
        assert not torch.isclose(mixed[0, at:], other[0, at:]).all(dim=-1).any()


def test_token_mix_every_occurrence(tiny_components):
    encoder = PromptEncoder(tiny_components)
    mixed = encoder.encode("a puppy and a puppy", [TokenMix("puppy", "skunk", 1.0)]).embeds
    torch.testing.assert_close(mixed, encoder.encode("a skunk and a skunk").embeds, atol=1e-6, rtol=0)


THIS_TOKENIZER = "this model's tokenizer"


@pytest.mark.parametrize(
    ("mixes", "message"),
    [
        ([TokenMix("xyz", "skunk", 0.5)], f"token_mix.token: 'xyz' is 3 tokens for {THIS_TOKENIZER}; expected one"),
        ([TokenMix("puppy", "xyz", 0.5)], f"token_mix.with: 'xyz' is 3 tokens for {THIS_TOKENIZER}; expected one"),
        ([TokenMix("skunk", "dog", 0.5)], "token_mix.token: 'skunk' does not occur in the prompt"),
        (
            [TokenMix("puppy", "dog", 0.5), TokenMix("snow", "sky", 0.5)],
            "token_mix[1].token: 'snow' does not occur in the prompt",
        ),
        (
            [TokenMix("puppy", "dog", 0.5), TokenMix("puppy", "sky", 0.5)],
            "token_mix[1].token: 'puppy' is already mixed by token_mix[0]",
        ),
    ],
)
def test_token_mix_errors(tiny_components, mixes, message):
    with pytest.raises(PromptError) as info:
        PromptEncoder(tiny_components).encode("a portrait of a puppy", mixes)
    assert str(info.value) == message


# ---------------------------------------------------------------------------------------
# Long prompts


LONG = " ".join(["dog"] * 100)


def test_chunk_mode_encodes_long_prompts_in_chunks(tiny_components):
    encoded = PromptEncoder(tiny_components, long_prompt="chunk").encode(LONG)
    assert encoded.embeds.shape == (1, 154, hidden_size(tiny_components))
    assert (encoded.tokens, encoded.truncated) == (100, False)
    first = PromptEncoder(tiny_components).encode(" ".join(["dog"] * 75)).embeds
    rest = PromptEncoder(tiny_components).encode(" ".join(["dog"] * 25)).embeds
    # Two chunks run as one batch of 2, so compare with a tolerance for the kernels.
    torch.testing.assert_close(encoded.embeds[:, :77], first, atol=1e-5, rtol=0)
    torch.testing.assert_close(encoded.embeds[:, 77:], rest, atol=1e-5, rtol=0)


def test_chunk_mode_short_and_empty_prompts_are_one_chunk(tiny_components):
    encoder = PromptEncoder(tiny_components, long_prompt="chunk")
    for text in (PROMPT, ""):
        encoded = encoder.encode(text)
        assert encoded.embeds.shape == (1, 77, hidden_size(tiny_components))
        assert torch.equal(encoded.embeds, PromptEncoder(tiny_components).encode(text).embeds)


def test_truncate_mode_drops_tokens_past_75(tiny_components):
    encoder = PromptEncoder(tiny_components)
    encoded = encoder.encode(LONG)
    assert encoded.embeds.shape == (1, 77, hidden_size(tiny_components))
    assert (encoded.tokens, encoded.truncated) == (100, True)
    torch.testing.assert_close(encoded.embeds, reference(tiny_components, LONG), atol=1e-5, rtol=0)
    assert torch.equal(encoded.embeds, encoder.encode(" ".join(["dog"] * 75)).embeds)
    assert not encoder.encode(" ".join(["dog"] * 75)).truncated


def test_long_prompt_gives_no_length_warning(tiny_components, monkeypatch):
    from transformers import tokenization_utils_base

    warnings: list[str] = []
    monkeypatch.setattr(tokenization_utils_base.logger, "warning", lambda msg, *args: warnings.append(msg))
    # The tokenizer warns once per instance; forget whether it already has.
    monkeypatch.setattr(tiny_components.tokenizer, "deprecation_warnings", {})
    PromptEncoder(tiny_components, long_prompt="chunk").encode(" ".join(["snow"] * 120))
    assert not [w for w in warnings if "longer than the specified maximum" in w]


def test_pad_chunks_appends_copies_of_empty():
    d = 8
    empty = torch.randn(1, 77, d)
    two, one = torch.randn(1, 154, d), torch.randn(1, 77, d)
    out = pad_chunks([two, one], empty)
    assert out.shape == (2, 154, d)
    assert torch.equal(out[0], two[0])
    assert torch.equal(out[1, :77], one[0])
    assert torch.equal(out[1, 77:], empty[0])
    assert pad_chunks([one, one], empty).shape == (2, 77, d)
    with pytest.raises(ValueError, match="not multiples of 77"):
        pad_chunks([torch.randn(1, 80, d)], empty)


def test_encoded_prompt_is_frozen(tiny_components):
    encoded = PromptEncoder(tiny_components).encode("a dog")
    assert isinstance(encoded, EncodedPrompt)
    with pytest.raises(AttributeError):
        encoded.tokens = 3


def test_token_mix_on_a_token_lost_to_truncation_is_an_error(tiny_components):
    encoder = PromptEncoder(tiny_components)
    prompt = " ".join(["dog"] * 80) + " puppy"
    with pytest.raises(PromptError, match="token_mix.token: 'puppy' does not occur in the prompt"):
        encoder.encode(prompt, (TokenMix("puppy", "skunk", 0.5),))
    chunked = PromptEncoder(tiny_components, long_prompt="chunk")
    assert chunked.encode(prompt, (TokenMix("puppy", "skunk", 0.5),)).embeds.shape[1] == 154

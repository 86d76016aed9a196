"""The text side of the render core: plain encoding, textual inversion, token mixing, long prompts.

Textual-inversion vectors arrive here as tensors; reading their files is tested in test_embeddings.py.
"""

from __future__ import annotations

import pytest
import torch

from farm.spec import Embedding, TokenMix
from farm.text import EncodedPrompt, LoadedEmbedding, PromptEncoder, PromptError, pad_chunks, run_text_transformer

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


def loaded(token: str, vectors: torch.Tensor, path: str = "learned_embeds.safetensors") -> LoadedEmbedding:
    """What farm.embeddings reads from a textual-inversion file: its token and vectors (n, d) float32."""
    return LoadedEmbedding(Embedding(path=path, sha256=""), token, vectors.float().reshape(-1, vectors.shape[-1]))


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


def test_textual_inversion_changes_only_positions_from_the_token_on(tiny_components):
    vector = torch.randn(hidden_size(tiny_components), generator=torch.Generator().manual_seed(0))
    encoder = PromptEncoder(tiny_components, [loaded("<bird-style>", vector)])
    with_token = encoder.encode("a portrait of <bird-style> dog").embeds
    plain = PromptEncoder(tiny_components).encode("a portrait of rabbit dog").embeds
    # BOS, a, portrait, of: causal attention never lets them see the token at position 4.
    assert torch.equal(with_token[0, :4], plain[0, :4])
    assert not torch.isclose(with_token[0, 4:], plain[0, 4:]).all(dim=-1).any()


def test_textual_inversion_vector_stands_in_for_its_token(tiny_components):
    """The model's own row for 'rabbit' makes '<r>' encode exactly like 'rabbit'."""
    encoder = PromptEncoder(tiny_components, [loaded("<r>", table_row(tiny_components, "rabbit"))])
    got = encoder.encode("a portrait of <r> dog")
    assert got.tokens == 5
    assert torch.equal(got.embeds, PromptEncoder(tiny_components).encode("a portrait of rabbit dog").embeds)


def test_multi_vector_embedding_expands_like_diffusers(tiny_components):
    rows = torch.stack([table_row(tiny_components, "rabbit"), table_row(tiny_components, "dog")])
    encoder = PromptEncoder(tiny_components, [loaded("<pair>", rows)])
    # diffusers' names for the extra vectors: <pair>_1, ...
    assert len(encoder.tokenizer("<pair>_1", add_special_tokens=False).input_ids) == 1
    got = encoder.encode("a <pair> in the snow")
    assert got.tokens == 6
    assert torch.equal(got.embeds, PromptEncoder(tiny_components).encode("a rabbit dog in the snow").embeds)


def test_wrong_vector_size(tiny_components):
    with pytest.raises(PromptError) as info:
        PromptEncoder(tiny_components, [loaded("<tok>", torch.zeros(768), "/x/sd15.safetensors")])
    assert (
        str(info.value)
        == "embeddings[0]: /x/sd15.safetensors holds vectors of size 768; this model's text encoder needs 32"
    )


def test_token_already_in_vocabulary(tiny_components):
    zeros = torch.zeros(hidden_size(tiny_components))
    with pytest.raises(PromptError, match=r"^embeddings\[0\]: token 'dog' is already a single token"):
        PromptEncoder(tiny_components, [loaded("dog", zeros)])
    with pytest.raises(PromptError, match=r"^embeddings\[1\]: token '<x>' is already a single token"):
        PromptEncoder(tiny_components, [loaded("<x>", zeros), loaded("<x>", zeros)])


def test_shared_model_is_not_changed(tiny_components):
    tokenizer = tiny_components.tokenizer
    table = tiny_components.text_encoder.embeddings.token_embedding.weight
    size, before = len(tokenizer), table.detach().clone()
    encoder = PromptEncoder(tiny_components, [loaded("<new-tok>", torch.ones(2, hidden_size(tiny_components)))])
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


# ---------------------------------------------------------------------------------------
# The CLIP layer read (clip_skip)


def input_ids(components, text: str) -> torch.Tensor:
    tokenizer = components.tokenizer
    return tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def test_hidden_states_match_the_text_encoders_own(tiny_components):
    encoder, ids = tiny_components.text_encoder, input_ids(tiny_components, PROMPT)
    with torch.no_grad():
        ours = run_text_transformer(encoder, encoder.embeddings.token_embedding(ids))
        theirs = encoder(ids, output_hidden_states=True).hidden_states
    assert len(ours) == len(theirs) == encoder.config.num_hidden_layers + 1
    for mine, reference_state in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, reference_state, atol=1e-6, rtol=0)


def test_clip_skip_reads_an_earlier_layer_through_the_final_layer_norm(tiny_components):
    default = PromptEncoder(tiny_components).encode(PROMPT).embeds
    assert torch.equal(PromptEncoder(tiny_components, clip_skip=1).encode(PROMPT).embeds, default)
    skipped = PromptEncoder(tiny_components, clip_skip=2).encode(PROMPT).embeds
    encoder = tiny_components.text_encoder
    with torch.no_grad():
        states = encoder(input_ids(tiny_components, PROMPT), output_hidden_states=True).hidden_states
        expected = encoder.final_layer_norm(states[-2])
    torch.testing.assert_close(skipped, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(skipped, default)


@pytest.mark.parametrize(
    ("clip_skip", "message"),
    [
        (0, "clip_skip: expected a whole number from 1 (1: the last layer), got 0"),
        (4, "clip_skip: 4 reads past the first layer of this model's text encoder; expected at most 3"),
    ],
)
def test_clip_skip_out_of_range(tiny_components, clip_skip, message):
    with pytest.raises(PromptError) as info:
        PromptEncoder(tiny_components, clip_skip=clip_skip)
    assert str(info.value) == message

"""The text side of the render core: prompts -> text embeddings for the UNet. No Ray, no files.

Every prompt takes one path through each of the family's text encoders (SD: one; SDXL: two, read
side by side): token ids -> token embeddings (the model's table, extended by any textual-inversion
vectors) -> optional token mixing (the notebook's puppy + skunk) -> the rest of the CLIP text
transformer (position embeddings, causal encoder) -> the hidden state of the layer the family (and
``clip_skip``) reads. Each distinct prompt is encoded alone, so its embedding never depends on which
other prompts share a batch. Textual-inversion vectors arrive as tensors (``LoadedEmbedding``);
``farm.embeddings`` reads the files.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from farm.errors import FarmError
from farm.models import Components
from farm.spec import LONG_PROMPT_MODES, Embedding, TokenMix

# Distinct prompts one encoder keeps: an actor may live through a sweep of thousands of prompts,
# and each embedding (77 x 768 in fp16, ~118 KB per chunk) sits on the GPU while cached.
CACHE_SIZE = 256
# SDXL's textual-inversion files hold one set of vectors per text encoder (clip_l, clip_g); farm
# reads files of one set, so it refuses them there rather than condition one encoder only.
SDXL_TEXTUAL_INVERSION = (
    "embeddings: textual inversion is not supported on SDXL (its files hold vectors for two text encoders)"
)


class PromptError(FarmError, ValueError):
    """A prompt, token mix or embedding this model cannot use; the message names the field."""


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensor fields with == has no single truth value
class LoadedEmbedding:
    """One textual-inversion file's contents, as ``farm.embeddings`` reads it."""

    embedding: Embedding  # the job's reference to the file (its path names the file in messages)
    token: str  # the trigger: the job's token, else the name stored in the file, else the file's stem
    vectors: torch.Tensor  # (n, d) float32 on the CPU, finite


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensor fields with == has no single truth value
class EncodedPrompt:
    """One prompt's text embeddings; shared through the cache, so treat the tensors as read-only."""

    embeds: torch.Tensor  # (1, 77 * chunks, d) on the components' device, in the text encoder's dtype
    tokens: int  # the prompt's token count without BOS/EOS, after textual-inversion expansion
    truncated: bool  # True when truncate mode dropped tokens
    # SDXL: text_encoder_2's projected pooled output of the first chunk (1, p), as A1111 pools long
    # prompts; None for a family without pooled conditioning.
    pooled: torch.Tensor | None = None


@dataclass(frozen=True)
class TokenRows:
    """A prompt as one tokenizer reads it: rows of ``max_length`` ids and the token mixes to apply."""

    rows: list[list[int]]
    mixes: list[tuple[int, int, float]]
    tokens: int
    truncated: bool


# ---------------------------------------------------------------------------------------
# The text transformer after the token-embedding lookup


def run_text_transformer(text_model: Any, token_embeds: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """CLIPTextModel's forward from token embeddings (k, L, d) on -> its hidden states, as
    ``output_hidden_states=True`` gives them: the embeddings' output, then each encoder layer's.

    transformers 5 ``CLIPTextModel.forward`` accepts only ``input_ids``, so this repeats its steps
    with its own submodules and mask helper: position embeddings, then its encoder's layers under a
    causal mask (the loop ``CLIPEncoder.forward`` runs, keeping every layer's output). The final
    layer norm is the caller's. A test holds it equal to ``text_encoder(input_ids, output_hidden_states=True)``.
    """
    from transformers.masking_utils import create_causal_mask

    hidden = text_model.embeddings(inputs_embeds=token_embeds)
    mask = create_causal_mask(config=text_model.config, inputs_embeds=hidden, attention_mask=None, cache=None)
    states = [hidden]
    for layer in text_model.encoder.layers:
        hidden = layer(hidden, mask, is_causal=True)
        states.append(hidden)
    return tuple(states)


def pool_text(text_model: Any, last_hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """CLIPTextModel's pooled output (k, d): the final-layer-normed state at each row's end-of-text
    token, found by transformers' rule (its legacy ``eos_token_id == 2`` configs take the largest id)."""
    normed = text_model.final_layer_norm(last_hidden)
    eos = text_model.config.eos_token_id
    marks = input_ids.int() if eos == 2 else (input_ids == eos).int()
    return normed[torch.arange(normed.shape[0], device=normed.device), marks.argmax(dim=-1)]


def check_textual_inversion(components: Components) -> None:
    """PromptError where the model's family cannot take textual-inversion files (SDXL)."""
    if components.family == "sdxl":
        raise PromptError(SDXL_TEXTUAL_INVERSION)


def hidden_layer(components: Components, clip_skip: int | None) -> tuple[int, bool]:
    """Which hidden state a family reads, counted from the end, and whether the final layer norm follows.

    SD reads the last layer through the final layer norm; A1111's ``clip_skip`` N reads the N-th
    from the end instead (diffusers' ``clip_skip`` N - 1). SDXL reads the penultimate layer of both
    encoders as is (diffusers' default); ``clip_skip`` N reads the (N + 1)-th from the end.
    """
    skip = 1 if clip_skip is None else clip_skip
    if not isinstance(skip, int) or isinstance(skip, bool) or skip < 1:
        raise PromptError(f"clip_skip: expected a whole number from 1 (1: the last layer), got {clip_skip!r}")
    encoders = [components.text_encoder]
    from_end, final_norm = skip, True
    if components.family == "sdxl":
        encoders.append(components.text_encoder_2)
        from_end, final_norm = skip + 1, False
    # The hidden states are the embeddings' output and one per layer.
    states = min(encoder.config.num_hidden_layers for encoder in encoders) + 1
    if from_end > states:
        raise PromptError(
            f"clip_skip: {skip} reads past the first layer of this model's text encoder; "
            f"expected at most {skip - from_end + states}"
        )
    return from_end, final_norm


# ---------------------------------------------------------------------------------------
# One text encoder


class TextTower:
    """One tokenizer and CLIP text encoder of a prompt encoder: the hidden state it reads, its pooled
    projection (SDXL's second encoder), and the textual-inversion rows learned for it."""

    def __init__(
        self,
        tokenizer: Any,
        text_encoder: Any,
        long_prompt: str,
        layer: tuple[int, bool],
        own_tokenizer: bool = False,
    ) -> None:
        # CLIPTextModelWithProjection (SDXL's second encoder) wraps a CLIPTextModel and projects its pooled output.
        self.text_model = getattr(text_encoder, "text_model", text_encoder)
        self.projection = getattr(text_encoder, "text_projection", None)
        self.long_prompt = long_prompt
        self.from_end, self.final_norm = layer
        self.token_embedding = self.text_model.embeddings.token_embedding
        # The shared tokenizer serves every other batch; only a copy learns this encoder's tokens.
        self.tokenizer = copy.deepcopy(tokenizer) if own_tokenizer else tokenizer
        # Ids from here on are textual-inversion tokens, looked up in `extra` rather than the model's
        # table: extending a copy of the table would duplicate ~76 MB (49408 x 768 fp16) per encoder.
        self.first_new_id = len(tokenizer)
        weight = self.token_embedding.weight
        self.extra = weight.new_empty((0, weight.shape[1]))
        self.expansions: dict[int, list[int]] = {}  # multi-vector trigger id -> the ids of all its vectors
        self.max_length = min(self.tokenizer.model_max_length, self.text_model.config.max_position_embeddings)

    # -- textual inversion

    def add_embedding(self, loaded: LoadedEmbedding, where: str) -> None:
        """Teach one textual-inversion file's token(s) to this encoder's tokenizer copy."""
        token, vectors = loaded.token, loaded.vectors
        count, size = vectors.shape
        needed = self.extra.shape[1]
        if size != needed:
            raise PromptError(
                f"{where}: {loaded.embedding.path} holds vectors of size {size}; "
                f"this model's text encoder needs {needed}"
            )
        # diffusers' naming, so prompts written for diffusers work: token, token_1, ..., token_{n-1}.
        names = [token] + [f"{token}_{i}" for i in range(1, count)]
        for name in names:
            self.check_new_token(name, where)
        self.tokenizer.add_tokens(names)
        ids = self.tokenizer.convert_tokens_to_ids(names)
        start = self.first_new_id + self.extra.shape[0]
        if ids != list(range(start, start + count)):  # the id -> row arithmetic in `lookup` relies on this
            raise RuntimeError(f"{where}: tokenizer gave ids {ids} to new tokens; expected {start}..")
        self.extra = torch.cat([self.extra, vectors.to(self.extra)])
        if count > 1:
            self.expansions[ids[0]] = ids

    def check_new_token(self, name: str, where: str) -> None:
        """A trigger must be one word the tokenizer does not already read as a single token."""
        if not name or any(c.isspace() for c in name):
            raise PromptError(f"{where}: token {name!r}: expected one word without spaces")
        if len(self.token_ids(name)) == 1:
            raise PromptError(
                f"{where}: token {name!r} is already a single token for this model's tokenizer; "
                f"choose a trigger it does not know, such as '<{name}>'"
            )

    # -- tokens

    def token_ids(self, text: str) -> list[int]:
        """Token ids without BOS/EOS, nothing dropped; multi-vector triggers not yet expanded."""
        # verbose=False: a long prompt is no error here (truncate or chunk handle it), so no length warning.
        return self.tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids

    def prompt_ids(self, text: str) -> list[int]:
        """The prompt's token ids, each multi-vector trigger expanded to all its vectors' ids."""
        ids = self.token_ids(text)
        if not self.expansions:
            return ids
        return [j for i in ids for j in self.expansions.get(i, (i,))]

    def sequences(self, ids: list[int]) -> tuple[list[list[int]], bool]:
        """Ids -> rows of ``max_length`` (BOS ... EOS, padded as the tokenizer pads); and whether any were dropped."""
        body = self.max_length - 2  # room left by BOS and EOS
        if self.long_prompt == "chunk":
            chunks = [ids[start : start + body] for start in range(0, len(ids), body)] or [[]]
        else:
            chunks = [ids[:body]]
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        rows = [[bos, *chunk, eos] for chunk in chunks]
        padded = self.tokenizer.pad({"input_ids": rows}, padding="max_length", max_length=self.max_length)
        return padded["input_ids"], self.long_prompt == "truncate" and len(ids) > body

    def single_token(self, word: str, where: str) -> int:
        """The id of a word that must be exactly one (non-special) token of this tokenizer."""
        ids = self.prompt_ids(word)  # expanded: a multi-vector trigger is several tokens, not one
        if len(ids) != 1:
            raise PromptError(f"{where}: {word!r} is {len(ids)} tokens for this model's tokenizer; expected one")
        if ids[0] in self.tokenizer.all_special_ids:
            raise PromptError(f"{where}: {word!r} is a special token (start, end or padding); expected a word")
        return ids[0]

    def prepare(self, text: str, token_mix: Sequence[TokenMix]) -> TokenRows:
        """A prompt's rows and its token mixes, checked against this tokenizer."""
        ids = self.prompt_ids(text)
        # A token past the truncation point is not in the prompt the model sees.
        kept = ids if self.long_prompt == "chunk" else ids[: self.max_length - 2]
        mixes = self.resolve_mixes(token_mix, kept)
        rows, truncated = self.sequences(ids)
        return TokenRows(rows, mixes, len(ids), truncated)

    # -- embeddings

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings for ids (k, L): the model's table, or this encoder's textual-inversion rows."""
        if not self.extra.shape[0]:
            return self.token_embedding(ids)
        is_new = ids >= self.first_new_id
        known = self.token_embedding(ids.masked_fill(is_new, 0))
        new = torch.nn.functional.embedding((ids - self.first_new_id).clamp(min=0), self.extra)
        return torch.where(is_new.unsqueeze(-1), new, known)

    def resolve_mixes(self, token_mix: Sequence[TokenMix], ids: list[int]) -> list[tuple[int, int, float]]:
        """Check each token mix against this tokenizer and the prompt -> (token id, other id, weight)."""
        mixes: list[tuple[int, int, float]] = []
        seen: dict[int, str] = {}
        for index, mix in enumerate(token_mix):
            where = "token_mix" if len(token_mix) == 1 else f"token_mix[{index}]"
            token = self.single_token(mix.token, f"{where}.token")
            other = self.single_token(mix.other, f"{where}.with")
            if token not in ids:
                raise PromptError(f"{where}.token: {mix.token!r} does not occur in the prompt")
            if token in seen:
                raise PromptError(f"{where}.token: {mix.token!r} is already mixed by {seen[token]}")
            if not isinstance(mix.weight, int | float) or not math.isfinite(mix.weight):
                raise PromptError(f"{where}.weight: expected a number, got {mix.weight!r}")
            seen[token] = where
            mixes.append((token, other, float(mix.weight)))
        return mixes

    def apply_mixes(self, embeds: torch.Tensor, ids: torch.Tensor, mixes: list[tuple[int, int, float]]) -> torch.Tensor:
        """At each position of a mixed token: (1 - w) * E[token] + w * E[other]."""
        if not mixes:
            return embeds
        out = embeds.clone()
        for token, other, weight in mixes:
            at = ids == token
            target = self.lookup(ids.new_tensor([other]))[0]
            # In float32, so fp16 tables lose nothing extra; w = 0 gives E[token] and w = 1 E[other] exactly.
            mixed = (1 - weight) * embeds[at].float() + weight * target.float()
            out[at] = mixed.to(embeds.dtype)
        return out

    def run(
        self, rows: list[list[int]], mixes: list[tuple[int, int, float]]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows (k, L) -> the hidden state this encoder is read at (k, L, d), and the projected pooled
        output of the first row (1, p) where the encoder has a projection."""
        # The chunks of one prompt go through together; other prompts never share this batch.
        input_ids = torch.tensor(rows, device=self.token_embedding.weight.device)
        with torch.no_grad():
            token_embeds = self.apply_mixes(self.lookup(input_ids), input_ids, mixes)
            states = run_text_transformer(self.text_model, token_embeds)
            hidden = states[-self.from_end]
            if self.final_norm:
                hidden = self.text_model.final_layer_norm(hidden)
            if self.projection is None:
                return hidden, None
            return hidden, self.projection(pool_text(self.text_model, states[-1][:1], input_ids[:1]))


def text_towers(
    components: Components, long_prompt: str, clip_skip: int | None, own_tokenizer: bool
) -> list[TextTower]:
    """The text encoders a family reads prompts with: SD's one, SDXL's two (the second one pools)."""
    layer = hidden_layer(components, clip_skip)
    towers = [TextTower(components.tokenizer, components.text_encoder, long_prompt, layer, own_tokenizer)]
    if components.family == "sdxl":
        towers.append(TextTower(components.tokenizer_2, components.text_encoder_2, long_prompt, layer))
    return towers


# ---------------------------------------------------------------------------------------
# The encoder


class PromptEncoder:
    """Encodes prompts for one model (its family's text encoders, at the layer ``clip_skip`` picks)
    plus its own textual-inversion tokens; caches each distinct prompt."""

    def __init__(
        self,
        components: Components,
        embeddings: Sequence[LoadedEmbedding] = (),
        long_prompt: str = "truncate",
        clip_skip: int | None = None,
    ) -> None:
        if long_prompt not in LONG_PROMPT_MODES:
            modes = ", ".join(LONG_PROMPT_MODES)
            raise PromptError(f"long_prompt: unknown mode {long_prompt!r}; expected one of {modes}")
        if embeddings:
            check_textual_inversion(components)
        self.components = components
        self.long_prompt = long_prompt
        self.towers = text_towers(components, long_prompt, clip_skip, own_tokenizer=bool(embeddings))
        self.cache: OrderedDict[tuple[str, tuple[TokenMix, ...]], EncodedPrompt] = OrderedDict()
        for index, embedding in enumerate(embeddings):
            self.towers[0].add_embedding(embedding, f"embeddings[{index}]")

    @property
    def tokenizer(self) -> Any:
        """The first text encoder's tokenizer (the one textual-inversion tokens are taught to)."""
        return self.towers[0].tokenizer

    def encode(self, text: str, token_mix: Sequence[TokenMix] = ()) -> EncodedPrompt:
        """Text embeddings for one prompt (1, 77 * chunks, d), encoded alone and cached per (text, token_mix)."""
        key = (text, tuple(token_mix))
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        prepared = [tower.prepare(text, token_mix) for tower in self.towers]
        # Two tokenizers may split a long prompt into different chunk counts: pad the shorter with
        # empty chunks, as pad_chunks pads a batch's shorter prompts.
        chunks = max(len(p.rows) for p in prepared)
        outputs = [
            tower.run(p.rows + tower.sequences([])[0] * (chunks - len(p.rows)), p.mixes)
            for tower, p in zip(self.towers, prepared, strict=True)
        ]
        # SDXL: both encoders' hidden states side by side on the feature axis, as diffusers concatenates them.
        hidden = torch.cat([h for h, _ in outputs], dim=-1) if len(outputs) > 1 else outputs[0][0]
        encoded = EncodedPrompt(
            embeds=hidden.reshape(1, -1, hidden.shape[-1]),
            tokens=max(p.tokens for p in prepared),
            truncated=any(p.truncated for p in prepared),
            pooled=outputs[-1][1],
        )
        self.cache[key] = encoded
        if len(self.cache) > CACHE_SIZE:
            self.cache.popitem(last=False)
        return encoded


def pad_chunks(embeds: Sequence[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
    """Pad (1, 77k_i, d) embeddings to the largest k by appending copies of ``empty`` (1, 77, d); -> (N, 77k, d)."""
    if not embeds:
        raise ValueError("pad_chunks: no embeddings")
    chunk = empty.shape[1]
    if any(e.shape[1] % chunk for e in embeds):
        raise ValueError(f"pad_chunks: sequence lengths {[e.shape[1] for e in embeds]} are not multiples of {chunk}")
    most = max(e.shape[1] for e in embeds) // chunk
    # A1111 pads a shorter prompt with empty-prompt chunks, so all share one cross-attention length.
    padded = [torch.cat([e, *[empty] * (most - e.shape[1] // chunk)], dim=1) for e in embeds]
    return torch.cat(padded)

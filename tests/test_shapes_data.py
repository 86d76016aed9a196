"""The `shapes` preset's data and checker (scripts/shapes, issue 17): a deterministic dataset whose captions
always name shape and colour, and an OpenCV checker that reads the dataset's own images right."""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` without `python -m`: scripts/ is not importable otherwise
    sys.path.insert(0, str(ROOT))

from scripts.shapes import checker, dataset  # noqa: E402

CAPTION = re.compile(
    r"^(?P<article>an?) (?:(?P<size>small|medium|large) )?(?P<colour>\w+) (?P<shape>\w+)"
    r"(?: on (?P<bg_article>an?) (?P<background>\w+) background)?(?:, (?P<position>[a-z ]+))?$"
)


def test_the_same_seed_draws_the_same_images_and_captions() -> None:
    first = dataset.batch_at(5, 10, 8, 64, dataset.SHAPES)
    again = dataset.batch_at(5, 10, 8, 64, dataset.SHAPES)
    assert first[0].dtype == np.uint8 and first[0].shape == (8, 64, 64, 3)
    assert np.array_equal(first[0], again[0]) and first[1] == again[1] and first[2] == again[2]
    # Any image can be drawn alone, and a resumed iterator yields what an unbroken one would.
    alone = dataset.sample_at(5, 13, 64, dataset.SHAPES)
    assert np.array_equal(alone[0], first[0][3]) and alone[1] == first[1][3]
    stream = dataset.batches(5, 4, 64, dataset.SHAPES)
    next(stream)
    resumed = next(dataset.batches(5, 4, 64, dataset.SHAPES, first_batch=1))
    assert np.array_equal(next(stream)[0], resumed[0])
    # Another seed is another dataset.
    other = dataset.batch_at(6, 10, 8, 64, dataset.SHAPES)
    assert other[1] != first[1]
    # The draws are pinned: a change to the dataset's draw order or grammar (which the shipped weights
    # were trained on) shows here. Pixels come from OpenCV's raster, so they are not pinned.
    captions = [dataset.sample_at(0, index, 64)[1] for index in range(20)]
    assert captions[:2] == ["a purple triangle, top right", "a black square on a white background, top right"]
    digest = hashlib.sha256("\n".join(captions).encode()).hexdigest()
    assert digest == "a58d1b82a6b2d70989b29d0b38cb3e0ce8d8e78f7239904d12ff9e09f16c8834"
    assert dataset.sample_at(0, 0, 128)[1] == captions[0]  # the resolution changes the pixels, not the draw


def test_captions_always_name_shape_and_colour_and_sometimes_the_rest() -> None:
    named = {"size": 0, "background": 0, "position": 0}
    for index in range(300):
        _, caption, attributes = dataset.sample_at(1, index, 64, dataset.SHAPES)
        match = CAPTION.match(caption)
        assert match, caption
        assert match["shape"] == attributes.shape and match["colour"] == attributes.colour
        for key in named:
            if match[key] is not None:
                named[key] += 1
                assert match[key] == getattr(attributes, key), caption
            assert (match[key] is not None) == (key in attributes.named), caption
        first_word = match["size"] or match["colour"]
        assert match["article"] == ("an" if first_word[0] in "aeiou" else "a"), caption
        assert set(caption.replace(",", "").split()) <= set(dataset.WORDS), caption
    # Each optional part is named in some captions and left out of others.
    assert all(60 < n < 270 for n in named.values()), named
    # A fresh caption for the same image keeps shape and colour.
    _, _, attributes = dataset.sample_at(1, 0, 64)
    rng = np.random.default_rng(0)
    texts = {dataset.recaption(attributes, rng) for _ in range(40)}
    assert len(texts) > 3 and all(f"{attributes.colour} {attributes.shape}" in t for t in texts)


def test_shape_and_background_colours_differ_and_are_far_apart() -> None:
    for index in range(300):
        _, _, a = dataset.sample_at(2, index, 64, dataset.SHAPES)
        assert a.colour != a.background
        assert dataset.contrast(a.colour, a.background) >= dataset.MIN_CONTRAST
        drawn = dataset.to_lab(np.array([a.rgb, a.background_rgb], dtype=np.uint8))
        assert np.linalg.norm(drawn[0] - drawn[1]) > dataset.MIN_CONTRAST - 10
    # Every named colour is closest to its own palette entry even at the jitter's extremes.
    for name, rgb in dataset.COLOURS.items():
        for sign in (-1, 1):
            jittered = np.clip(np.array(rgb) + sign * dataset.COLOUR_JITTER, 0, 255).astype(np.uint8)
            nearest = checker.nearest_colours(dataset.to_lab(jittered[None]))[0]
            assert dataset.COLOUR_NAMES[nearest] == name


def test_held_out_combinations_never_reach_training() -> None:
    held = set(dataset.triples(dataset.DEFAULT_SHAPES, "heldout"))
    everything = dataset.triples(dataset.DEFAULT_SHAPES, "all")
    assert held and len(held) < 0.2 * len(everything)
    for index in range(300):
        a = dataset.sample_at(3, index, 64)[2]
        assert (a.shape, a.colour, a.background) not in held
        b = dataset.sample_at(3, index, 64, split="heldout")[2]
        assert (b.shape, b.colour, b.background) in held


@pytest.mark.parametrize(("resolution", "count"), [(64, 300), (128, 60)])
def test_checker_reads_the_datasets_own_images(resolution: int, count: int) -> None:
    results = []
    for index in range(count):
        image, _, attributes = dataset.sample_at(4, index, resolution, dataset.SHAPES, "all")
        results.append(checker.check(image, {k: getattr(attributes, k) for k in checker.ATTRIBUTES}))
    rates = checker.pass_rates(results)
    assert set(rates) == set(checker.ATTRIBUTES)
    for name, (passed, total) in rates.items():
        assert total == count and passed / total >= 0.99, (name, passed, total)


def test_checker_fails_what_is_not_there() -> None:
    image, _, a = dataset.sample_at(4, 0, 64, dataset.DEFAULT_SHAPES, "all")
    wrong_colour = next(c for c in dataset.COLOURS if c not in (a.colour, a.background))
    wrong_shape = next(s for s in dataset.DEFAULT_SHAPES if s != a.shape)
    verdict = checker.check(image, {"shape": wrong_shape, "colour": wrong_colour, "background": a.colour})
    assert verdict == {"background": False, "colour": False, "shape": False}
    # A flat image has a background and no shape: shape and colour fail.
    flat = np.full((64, 64, 3), dataset.COLOURS["blue"], dtype=np.uint8)
    assert checker.check(flat, {"shape": "circle", "colour": "red", "background": "blue"}) == {
        "background": True,
        "colour": False,
        "shape": False,
    }


def test_the_shapes_tokenizer_knows_every_caption_word_as_one_token() -> None:
    pytest.importorskip("transformers")
    from farm.presets import TINY_WORDS, build_tiny_tokenizer
    from scripts.shapes.train import build_tokenizer

    tokenizer = build_tokenizer("shapes")
    tiny = build_tiny_tokenizer()
    for word in dataset.WORDS:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    # tiny's words keep their ids, so the two vocabularies agree where they overlap.
    for word in TINY_WORDS:
        assert tokenizer(word, add_special_tokens=False).input_ids == tiny(word, add_special_tokens=False).input_ids
    _, caption, _ = dataset.sample_at(0, 0, 64)
    assert len(tokenizer(caption).input_ids) == len(caption.replace(",", " ,").split()) + 2

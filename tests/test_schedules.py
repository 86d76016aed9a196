"""Keyframed schedules and keyed prompts: Deforum's syntax, strict parsing, interpolation and blending."""

from __future__ import annotations

import random

import pytest

from farm.schedules import (
    Schedule,
    ScheduleError,
    is_schedule_text,
    parse_keyed_prompts,
    parse_schedule,
    prompt_at,
)

# --- parse_schedule: what it reads ---


def test_issue_example_interpolates_and_holds() -> None:
    schedule = parse_schedule("0:(0.65), 10:(0.4)")
    assert schedule.keys == ((0, 0.65), (10, 0.4))
    assert schedule.value_at(0) == 0.65
    assert schedule.value_at(5) == pytest.approx(0.525)
    assert schedule.value_at(10) == 0.4
    assert schedule.value_at(20) == 0.4


def test_held_before_the_first_key() -> None:
    schedule = parse_schedule("5:(1), 10:(2)")
    assert schedule.value_at(0) == 1.0
    assert schedule.value_at(4) == 1.0
    assert schedule.value_at(5) == 1.0
    assert schedule.value_at(6) == pytest.approx(1.2)
    assert schedule.value_at(10) == 2.0


def test_linear_between_keys_uses_the_formula() -> None:
    schedule = parse_schedule("2:(-1), 6:(3), 8:(3)")
    for frame, expected in [(2, -1.0), (3, 0.0), (4, 1.0), (5, 2.0), (6, 3.0), (7, 3.0), (8, 3.0), (100, 3.0)]:
        assert schedule.value_at(frame) == pytest.approx(expected), frame


def test_out_of_order_keys_are_sorted() -> None:
    schedule = parse_schedule("10:(0.4), 0:(0.65), 5:(1)")
    assert schedule.keys == ((0, 0.65), (5, 1.0), (10, 0.4))
    assert schedule.value_at(5) == 1.0


@pytest.mark.parametrize(
    "text",
    [
        "0:(0.65),10:(0.4)",
        "0:(0.65), 10:(0.4),",
        "0:(0.65), 10:(0.4) , ",
        "  0 : ( 0.65 ) ,\n 10\t:(0.4)  ",
        "0: (0.65), 10 :(0.4)",
    ],
)
def test_whitespace_and_trailing_comma(text: str) -> None:
    assert parse_schedule(text).keys == ((0, 0.65), (10, 0.4))


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0:(-2)", -2.0),
        ("0:(+2)", 2.0),
        ("0:(1e-3)", 1e-3),
        ("0:(-1.5E+2)", -150.0),
        ("0:(.5)", 0.5),
        ("0:(3.)", 3.0),
        ("0:(7)", 7.0),
    ],
)
def test_number_forms(text: str, value: float) -> None:
    (key,) = parse_schedule(text).keys
    assert key == (0, value)
    assert type(key[1]) is float


@pytest.mark.parametrize(("value", "expected"), [(0.5, 0.5), (3, 3.0), (-1e-3, -1e-3), ("0.5", 0.5), (" 7 ", 7.0)])
def test_constants(value: object, expected: float) -> None:
    schedule = parse_schedule(value)
    assert schedule.keys == ((0, expected),)
    assert type(schedule.keys[0][1]) is float
    assert schedule.values(3) == [expected] * 3


def test_values_lists_frames_from_zero() -> None:
    assert parse_schedule("1:(0), 3:(4)").values(5) == pytest.approx([0.0, 0.0, 2.0, 4.0, 4.0])
    assert parse_schedule("0:(1)").values(0) == []


def test_values_at_keys_are_the_given_floats_exactly() -> None:
    rng = random.Random(1234)
    for _ in range(200):
        frames = rng.sample(range(500), rng.randint(1, 8))
        given = {frame: rng.uniform(-1e3, 1e3) * 10 ** rng.randint(-6, 3) for frame in frames}
        # repr is the shortest text that reads back as the same float, as a user could have typed it.
        text = ", ".join(f"{frame}:({value!r})" for frame, value in given.items())
        schedule = parse_schedule(text)
        for frame, value in given.items():
            got = schedule.value_at(frame)
            assert got == value and got.hex() == value.hex(), (text, frame)


@pytest.mark.parametrize("text", ["0:(-0.0), 10:(1)", "0:(-1.7e308), 10:(1.7e308)"])
def test_value_at_a_key_takes_no_arithmetic(text: str) -> None:
    # -0.0 + 0.0 is 0.0, and (v1 - v0) * 0 is nan when v1 - v0 overflows: a key must return its float as stored.
    schedule = parse_schedule(text)
    for frame, value in schedule.keys:
        assert schedule.value_at(frame).hex() == value.hex()


def test_interpolated_values_lie_between_their_keys() -> None:
    rng = random.Random(99)
    for _ in range(100):
        k0, k1 = sorted(rng.sample(range(200), 2))
        v0, v1 = rng.uniform(-10, 10), rng.uniform(-10, 10)
        schedule = parse_schedule(f"{k0}:({v0!r}), {k1}:({v1!r})")
        for frame in range(k0, k1 + 1):
            expected = v0 + (v1 - v0) * (frame - k0) / (k1 - k0)
            assert schedule.value_at(frame) == pytest.approx(expected)
            assert min(v0, v1) - 1e-12 <= schedule.value_at(frame) <= max(v0, v1) + 1e-12


def test_negative_frame_and_count_are_refused() -> None:
    schedule = parse_schedule("0:(1)")
    with pytest.raises(ValueError):
        schedule.value_at(-1)
    with pytest.raises(ValueError):
        schedule.values(-1)


def test_schedule_checks_hand_built_keys() -> None:
    for keys in [(), ((5, 1.0), (0, 2.0)), ((0, 1.0), (0, 2.0)), ((-1, 1.0),), ((0, float("nan")),), ((0, 1),)]:
        with pytest.raises(ScheduleError):
            Schedule(keys)  # type: ignore[arg-type]


def test_schedule_error_is_a_value_error() -> None:
    assert issubclass(ScheduleError, ValueError)


# --- parse_schedule: what it refuses ---


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("0:0.65", "parentheses"),
        ("0:(0.65), 10:0.4", "parentheses"),
        ("0:(0.65", "parentheses"),
        ("0:(0.5)), 5:(1)", "parentheses"),
        ("1.5:(2)", "non-negative integer"),
        ("x:(2)", "non-negative integer"),
        (":(2)", "non-negative integer"),
        ("-1:(2)", "negative"),
        ("1234567890:(2)", "too large"),
        ("0:(1), 0:(2)", "twice"),
        ("0:(1), 00:(2)", "twice"),
        ("0:(nan)", "finite"),
        ("0:(inf)", "finite"),
        ("0:(-Infinity)", "finite"),
        ("0:(1e999)", "finite"),
        ("nan", "finite"),
        ("0:(0.5*sin(t))", "math expressions are not supported; give numbers"),
        ("0:(0.5*2)", "math expressions are not supported; give numbers"),
        ("0:(t)", "math expressions are not supported; give numbers"),
        ("0:(1_000)", "math expressions are not supported; give numbers"),
        ("0:()", "empty"),
        ("0:(1),, 5:(2)", "empty item"),
        ("0:(1) 5:(2)", "commas"),
        ("abc", "not a number"),
    ],
)
def test_bad_text_is_refused_quoting_it(text: str, reason: str) -> None:
    with pytest.raises(ScheduleError) as caught:
        parse_schedule(text)
    message = str(caught.value)
    assert reason in message
    assert repr(text) in message
    assert "\n" not in message


def test_long_bad_text_is_quoted_bounded() -> None:
    text = "0:(1), " * 50 + "5:(x)"
    with pytest.raises(ScheduleError) as caught:
        parse_schedule(text)
    message = str(caught.value)
    assert text[:40] in message
    assert text not in message
    assert len(message) < 300


def test_huge_frame_is_refused_as_schedule_error() -> None:
    # int() of over 4300 digits raises a plain ValueError; the parser must not let that escape.
    with pytest.raises(ScheduleError, match="too large"):
        parse_schedule("1" * 5000 + ":(2)")


@pytest.mark.parametrize("value", [True, False, None, [0.5], {"0": 1}, (1, 2), float("nan"), float("inf"), 10**400])
def test_non_text_non_numbers_are_refused(value: object) -> None:
    with pytest.raises(ScheduleError) as caught:
        parse_schedule(value)
    assert "\n" not in str(caught.value)


def test_refusal_of_a_wrong_type_names_it() -> None:
    with pytest.raises(ScheduleError, match="bool True"):
        parse_schedule(True)
    with pytest.raises(ScheduleError, match=r"list \[0\.5\]"):
        parse_schedule([0.5])


def test_is_schedule_text() -> None:
    assert is_schedule_text("0:(1)")
    assert is_schedule_text("bad: text")
    assert not is_schedule_text("0.5")
    assert not is_schedule_text(0.5)
    assert not is_schedule_text({0: "a"})
    assert not is_schedule_text(None)


# --- keyed prompts ---


def test_keyed_prompts_are_sorted_and_accept_digit_strings() -> None:
    keys = parse_keyed_prompts({24: "a city", "0": "a forest", "12": "a town"})
    assert keys == ((0, "a forest"), (12, "a town"), (24, "a city"))


def test_a_plain_prompt_is_keyed_at_zero() -> None:
    assert parse_keyed_prompts("a forest") == ((0, "a forest"),)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ({}, "empty"),
        ({-1: "a"}, "negative"),
        ({"-3": "a"}, "negative"),
        ({1.5: "a"}, "non-negative integer"),
        ({"x1": "a"}, "'x1'"),
        ({"1" * 5000: "a"}, "non-negative integer"),
        ({True: "a"}, "True"),
        ({24: "a", "24": "b"}, "twice"),
        ({0: None}, "not text"),
        ({0: 5}, "not text"),
        (["a"], "mapping"),
        (None, "mapping"),
        (5, "mapping"),
    ],
)
def test_bad_keyed_prompts_are_refused(value: object, reason: str) -> None:
    with pytest.raises(ScheduleError) as caught:
        parse_keyed_prompts(value)
    assert reason in str(caught.value)


KEYS = ((10, "a forest"), (20, "a city"), (30, "a city"), (40, "the sea"))


@pytest.mark.parametrize(
    ("frame", "prompt"),
    [
        (0, "a forest"),
        (10, "a forest"),
        (15, "a forest"),
        (19, "a forest"),
        (20, "a city"),
        (39, "a city"),
        (99, "the sea"),
    ],
)
def test_prompt_held_without_blend(frame: int, prompt: str) -> None:
    assert prompt_at(KEYS, frame, blend=False) == ((prompt, 1.0),)


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (0, (("a forest", 1.0),)),
        (10, (("a forest", 1.0),)),
        (20, (("a city", 1.0),)),
        (25, (("a city", 1.0),)),  # same prompt on both sides: nothing to blend
        (30, (("a city", 1.0),)),
        (40, (("the sea", 1.0),)),
        (50, (("the sea", 1.0),)),
    ],
)
def test_blend_is_single_at_keys_outside_and_between_equal_prompts(frame: int, expected: tuple) -> None:
    assert prompt_at(KEYS, frame, blend=True) == expected


@pytest.mark.parametrize(("frame", "t"), [(11, 0.1), (12, 0.2), (15, 0.5), (19, 0.9)])
def test_blend_weights_between_keys(frame: int, t: float) -> None:
    (first, w0), (second, w1) = prompt_at(KEYS, frame, blend=True)
    assert (first, second) == ("a forest", "a city")
    assert w1 == pytest.approx(t)
    assert w0 == pytest.approx(1 - t)
    assert w0 + w1 == pytest.approx(1.0)


def test_blend_over_uneven_gap() -> None:
    keys = parse_keyed_prompts({0: "a", 3: "b"})
    assert prompt_at(keys, 1, blend=True) == (("a", pytest.approx(2 / 3)), ("b", pytest.approx(1 / 3)))
    assert prompt_at(keys, 2, blend=True) == (("a", pytest.approx(1 / 3)), ("b", pytest.approx(2 / 3)))


def test_prompt_at_needs_keys() -> None:
    with pytest.raises(ValueError):
        prompt_at((), 0, blend=False)

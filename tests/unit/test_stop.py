"""Unit tests for engine.stop: the streaming stop-string matcher and token-level stop reasons.

Streamed pieces must always join to the final text, and the final text never contains a stop string.
"""

import random

import pytest

from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from engine.stop import StopStringMatcher, token_stop_reason


def feed(stop, pieces):
    """-> (emitted pieces incl. flush when not stopped, stopped, matcher)."""
    m = StopStringMatcher(tuple(stop))
    out = []
    stopped = False
    for p in pieces:
        text, stopped = m.add(p)
        out.append(text)
        if stopped:
            break
    if not stopped:
        out.append(m.flush())
    return out, stopped, m


def reference(stop, full):
    """Expected final text: cut at the earliest occurrence of any stop string."""
    hits = [i for i in (full.find(s) for s in stop) if i >= 0]
    return (full[: min(hits)], True) if hits else (full, False)


# ---- StopStringMatcher ------------------------------------------------------------------------


def test_no_stop_strings_passes_text_through():
    m = StopStringMatcher(())
    assert m.add("Hello") == ("Hello", False)
    assert m.add(", world") == (", world", False)
    assert m.add("") == ("", False)
    assert m.flush() == ""
    assert m.text == "Hello, world"


def test_stop_string_excluded_from_output():
    out, stopped, m = feed(["STOP"], ["abc STOP def"])
    assert stopped
    assert out == ["abc "]
    assert m.text == "abc "


def test_held_back_text_released_when_not_a_stop():
    m = StopStringMatcher(("</s>",))
    assert m.add("x <") == ("x ", False)  # "<" could start "</s>"
    assert m.add("/") == ("", False)  # "</" still could
    assert m.add("b>") == ("</b>", False)  # "</b>" is not a stop: all released
    assert m.add(" end") == (" end", False)
    assert m.flush() == ""
    assert m.text == "x </b> end"


def test_held_back_text_released_on_flush():
    m = StopStringMatcher(("###",))
    assert m.add("total ##") == ("total ", False)
    assert m.flush() == "##"
    assert m.flush() == ""


def test_stop_string_spanning_several_pieces():
    out, stopped, m = feed(["<|end|>"], ["Hi", " there<", "|e", "nd", "|>", " never"])
    assert stopped
    assert "".join(out) == "Hi there"
    assert out[-1] == ""  # the stop arrived in the piece "|>": nothing more to emit
    assert m.text == "Hi there"


def test_stop_inside_single_piece_after_held_text():
    m = StopStringMatcher(("abc",))
    assert m.add("xa") == ("x", False)
    text, stopped = m.add("bcxyz")
    assert stopped and text == ""
    assert m.text == "x"


def test_multiple_stop_strings_earliest_wins():
    out, stopped, m = feed(["world", "lo"], ["hello world"])
    assert stopped and "".join(out) == "hel" and m.text == "hel"
    # Same when the earliest one completes later in the stream than a longer overlapping one.
    out, stopped, m = feed(["cdef", "bcd"], ["ab", "c", "d", "ef"])
    assert stopped and "".join(out) == "a" and m.text == "a"


def test_stop_at_very_start():
    out, stopped, m = feed(["\n"], ["\nabc"])
    assert stopped and out == [""] and m.text == ""


def test_overlapping_prefix_of_stop_string():
    # "aab" inside "aaab": the held tail must restart correctly after a partial match.
    out, stopped, m = feed(["aab"], ["a", "a", "a", "b", "c"])
    assert stopped and "".join(out) == "a" and m.text == "a"


@pytest.mark.parametrize("seed", range(200))
def test_random_streams_join_to_reference(seed):
    rng = random.Random(seed)
    alphabet = "ab<>/ \n"
    stop = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
    full = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
    pieces, i = [], 0
    while i < len(full):
        n = rng.randint(1, 5)
        pieces.append(full[i : i + n])
        i += n
    out, stopped, m = feed(stop, pieces)
    expected, expect_stop = reference(stop, full)
    assert stopped == expect_stop
    assert "".join(out) == expected == m.text
    assert not any(s in "".join(out) for s in stop)
    assert m.emitted == len(m.text)


@pytest.mark.parametrize("seed", range(50))
def test_emitted_text_never_revoked(seed):
    """Text already sent is a prefix of the final text at every step (nothing is taken back)."""
    rng = random.Random(1000 + seed)
    stop = ["ab", "bba", "a a"]
    full = "".join(rng.choice("ab ") for _ in range(30))
    m = StopStringMatcher(tuple(stop))
    sent = ""
    expected, _ = reference(stop, full)
    for ch in full:
        text, stopped = m.add(ch)
        sent += text
        assert expected.startswith(sent)
        if stopped:
            break
    else:
        sent += m.flush()
    assert sent == expected


# ---- token_stop_reason ------------------------------------------------------------------------


def make_seq(outputs, max_new=5, prompt_len=3, **params):
    seq = Sequence("r", list(range(prompt_len)), max_new, sampling_params=SamplingParams(**params))
    seq.output_token_ids = list(outputs)
    return seq


EOS = frozenset({2, 7})


def test_no_reason_mid_generation():
    assert token_stop_reason(make_seq([5, 6]), EOS, max_model_len=100) is None


def test_eos_token_stops():
    assert token_stop_reason(make_seq([5, 2]), EOS, 100) == "eos_token"
    assert token_stop_reason(make_seq([7]), EOS, 100) == "eos_token"


def test_eos_earlier_in_output_does_not_count():
    assert token_stop_reason(make_seq([2, 5]), EOS, 100) is None


def test_ignore_eos():
    assert token_stop_reason(make_seq([5, 2], ignore_eos=True), EOS, 100) is None
    assert token_stop_reason(make_seq([1, 2, 3, 4, 2], ignore_eos=True), EOS, 100) == "length"


def test_max_new_tokens_reached():
    assert token_stop_reason(make_seq([5, 6, 8], max_new=3), EOS, 100) == "length"
    assert token_stop_reason(make_seq([5, 6], max_new=3), EOS, 100) is None


def test_eos_wins_over_length_on_the_same_token():
    assert token_stop_reason(make_seq([5, 6, 2], max_new=3), EOS, 100) == "eos_token"


def test_context_length_reached():
    seq = make_seq([5, 6], max_new=50, prompt_len=8)  # 10 tokens in all
    assert token_stop_reason(seq, EOS, max_model_len=10) == "length"
    assert token_stop_reason(seq, EOS, max_model_len=11) is None

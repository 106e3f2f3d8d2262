"""Unit tests for engine.sampling_params.SamplingParams: validation and TGI's greedy/sampling rule.

Every validation error is a ValueError whose message names the offending field.
"""

import pytest

from engine.sampling_params import SamplingParams


def test_defaults_are_greedy():
    p = SamplingParams()
    assert p.max_new_tokens == 20
    assert p.greedy
    assert not p.needs_processing
    assert p.stop == ()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_new_tokens", 0),
        ("max_new_tokens", -3),
        ("max_new_tokens", 2.5),
        ("temperature", 0.0),
        ("temperature", -1.0),
        ("temperature", float("nan")),
        ("top_k", 0),
        ("top_k", -1),
        ("top_k", 2.0),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", -0.1),
        ("top_p", float("nan")),
        ("typical_p", 0.0),
        ("typical_p", 1.01),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("frequency_penalty", 2.5),
        ("frequency_penalty", -2.01),
        ("seed", -1),
        ("seed", 1.5),
        ("top_n_tokens", -1),
        ("top_n_tokens", 1.0),
    ],
)
def test_invalid_values_raise_naming_field(field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("stop", [[""], ["ok", ""], [3]])
def test_invalid_stop_sequences(stop):
    with pytest.raises(ValueError, match="`stop`"):
        SamplingParams(stop=stop)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_new_tokens", 1),
        ("temperature", 0.01),
        ("temperature", 5.0),
        ("top_k", 1),
        ("top_p", 1.0),
        ("top_p", 0.01),
        ("typical_p", 1.0),
        ("typical_p", 0.5),
        ("repetition_penalty", 0.5),
        ("frequency_penalty", -2.0),
        ("frequency_penalty", 2.0),
        ("seed", 0),
        ("top_n_tokens", 0),
        ("top_n_tokens", 5),
    ],
)
def test_boundary_values_accepted(field, value):
    assert getattr(SamplingParams(**{field: value}), field) == value


def test_stop_normalized_to_tuple():
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    p = SamplingParams(stop=("x",))
    assert p.stop == ("x",)
    hash(p)  # frozen and hashable


def test_frozen():
    p = SamplingParams()
    with pytest.raises(AttributeError):
        p.temperature = 2.0


@pytest.mark.parametrize(
    ("kwargs", "greedy"),
    [
        ({}, True),
        ({"do_sample": True}, False),
        ({"temperature": 1.0}, True),  # temperature 1 is not a warper
        ({"temperature": 0.7}, False),
        ({"temperature": 1.3}, False),
        ({"top_k": 50}, False),
        ({"top_k": 1}, True),  # top_k=1 is argmax
        ({"top_k": 1, "do_sample": True}, True),
        ({"top_k": 1, "temperature": 0.5}, True),
        ({"top_p": 1.0}, True),
        ({"top_p": 0.9}, False),
        ({"typical_p": 1.0}, True),
        ({"typical_p": 0.9}, False),
        ({"repetition_penalty": 1.2}, True),  # a penalty is not a warper
        ({"frequency_penalty": 0.5}, True),
        ({"seed": 42}, True),  # a seed alone does not turn sampling on
    ],
)
def test_greedy_follows_tgi(kwargs, greedy):
    assert SamplingParams(**kwargs).greedy is greedy


@pytest.mark.parametrize(
    ("kwargs", "needs"),
    [
        ({}, False),
        ({"repetition_penalty": 1.0}, False),
        ({"repetition_penalty": 1.2}, True),
        ({"frequency_penalty": 0.0}, False),
        ({"frequency_penalty": -0.5}, True),
        ({"temperature": 0.5}, False),
    ],
)
def test_needs_processing(kwargs, needs):
    assert SamplingParams(**kwargs).needs_processing is needs

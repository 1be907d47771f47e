"""Streaming text never shows a stop string, part of one, or half a UTF-8 character."""

from __future__ import annotations

import pytest

from dsf_runtime.serve.text import TextStream


class CharTokenizer:
    """Token i is the i-th piece; decoding joins pieces (as byte-level BPE does)."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True) -> str:
        return "".join(self.pieces[i] for i in ids)


def _run(pieces: list[str], stops: tuple[str, ...]) -> tuple[list[str], bool, str]:
    stream = TextStream(CharTokenizer(pieces), stops)
    deltas = []
    stopped = False
    for i in range(len(pieces)):
        stopped = stream.add(i)
        deltas.append(stream.delta(final=stopped))
        if stopped:
            break
    if not stopped:
        deltas.append(stream.delta(final=True))
    return deltas, stopped, "".join(deltas)


@pytest.mark.parametrize(
    "pieces,stops,text,stopped",
    [
        (["Hel", "lo", " wor", "ld"], ("wor",), "Hello ", True),
        (["Hel", "lo", " wor", "ld"], ("o w",), "Hell", True),  # stop spans tokens
        (["a", "b", "c"], ("bd",), "abc", False),  # a partial match that never completes is released
        (["x", "STO", "P", "y"], ("STOP", "zz"), "x", True),
        (["ab"], (), "ab", False),
    ],
)
def test_stop_strings(pieces, stops, text, stopped):
    deltas, was_stopped, joined = _run(pieces, stops)
    assert joined == text and was_stopped == stopped
    for stop in stops:  # nothing sent ever contained a stop string
        assert all(stop not in d for d in deltas)


def test_partial_stop_is_held_back_until_resolved():
    stream = TextStream(CharTokenizer(["one ", "tw", "o"]), ("two",))
    stream.add(0)
    assert stream.delta() == "one "
    stream.add(1)
    assert stream.delta() == ""  # "tw" may become "two"
    assert stream.add(2) and stream.delta(final=True) == ""


def test_incomplete_utf8_is_held_back():
    stream = TextStream(CharTokenizer(["caf", "\ufffd", "é"]))
    stream.add(0)
    assert stream.delta() == "caf"
    stream.add(1)
    assert stream.delta() == ""
    stream.tokenizer.pieces[1] = ""  # the next byte completes the character
    stream.add(2)
    assert stream.delta() == "é"

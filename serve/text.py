"""Incremental detokenization with stop strings: what text a stream may send now."""

from __future__ import annotations


def _held_suffix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that begins some stop string (it may still complete)."""
    held = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:n]):
                held = n
                break
    return held


class TextStream:
    """Generated token ids -> text, released in deltas that never contain a stop string,
    a half-received stop string or a broken UTF-8 sequence."""

    def __init__(self, tokenizer, stops: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of ``text`` already released
        self.stopped = False

    def add(self, token: int) -> bool:
        """Append a token; True when a stop string appeared (the text is then cut before it)."""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stops:
            start = max(0, self.sent - max(len(s) for s in self.stops))
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
        return self.stopped

    def delta(self, final: bool = False) -> str:
        """The text that may be sent now (all of it when ``final``)."""
        end = len(self.text)
        if not final and not self.stopped:
            if self.text.endswith("\ufffd"):  # an incomplete multi-byte character
                end -= 1
            end -= _held_suffix(self.text[:end], self.stops)
        end = max(end, self.sent)
        out = self.text[self.sent : end]
        self.sent = end
        return out


def max_token_bytes(tokenizer) -> int | None:
    """An upper bound of the UTF-8 bytes one token stands for: the longest vocabulary entry's
    UTF-8 length (byte-level BPE writes each byte as one char of 1-2 bytes, SentencePiece's
    marker and byte-fallback entries are longer than what they stand for). A text of more than
    ``bound * n`` bytes cannot tokenize to n tokens or fewer, unless the tokenizer's normalizer
    drops characters (the caller leaves slack for that). None if the vocabulary is not readable."""
    try:
        vocab = tokenizer.get_vocab()
    except Exception:
        return None
    if not vocab:
        return None
    return max(len(str(token).encode("utf-8", "surrogatepass")) for token in vocab)

"""Incremental detokenization for streaming: the text of each step's new tokens in O(1) per step.

Decoding every token generated so far at each step costs O(n) per step (O(n²) per job), and at batch
64 that dominated the worker's loop. Instead, decode a short window that starts a few tokens back:
the tokens already sent give the window its context (word boundaries, leading spaces, characters
merged across tokens), and text ending in an incomplete character (U+FFFD) waits for the next token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["IncrementalDecoder"]


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas whose concatenation is the decoded text."""

    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self._decode = decode
        self.prefix_offset = 0  # tokens before it are never decoded again
        self.read_offset = 0  # tokens in [prefix_offset, read_offset) were sent already

    def delta(self, token_ids: Sequence[int]) -> str:
        """The text that `token_ids` adds to what earlier calls returned ("" while it is incomplete)."""
        before = self._decode(token_ids[self.prefix_offset : self.read_offset])
        text = self._decode(token_ids[self.prefix_offset :])
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(token_ids)
        return text[len(before) :]

"""A request's output text: incremental detokenizing, stop strings, and the final text.

`TextOutput` takes a sequence's generated tokens one at a time and keeps its text: the delta each
token adds that is safe to stream, stop strings looked for in the new text only, and the final text
(cut before a matched stop string). The deltas of one request, the last one included, add up to its
final text exactly. The engine makes one per sequence that streams text or has stop strings; the
others are decoded once, when they finish.

Decoding each step's delta costs O(1) per token, not a decode of the whole output (O(n) per step,
O(n²) per request): `tokenizers.decoders.DecodeStream` where the tokenizer has a `tokenizers`
backend whose decode is the tokenizer's own, else `IncrementalDecoder`, which decodes a short window
of tokens. Also here: `stop_prefix_len`, the text held back because a stop string may start in it.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

__all__ = ["IncrementalDecoder", "TextOutput", "stop_prefix_len", "stream_backend"]


def stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is the beginning of a stop string (0 if none)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas whose concatenation is the decoded text.

    For tokenizers without a `tokenizers` backend. Each call decodes a short window that starts a few
    tokens back: the tokens already sent give the window its context (word boundaries, leading
    spaces, characters merged across tokens), and text ending in an incomplete character (U+FFFD)
    waits for the next token.
    """

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


# Text with every pattern transformers' clean_up_tokenization rewrites (" ." -> ".", " n't" -> "n't", ...).
_CLEANUP_PROBE = "a . b ? c ! d , e ' f n't g 'm h 's i 've j 're k"
_backends: weakref.WeakKeyDictionary[Any, Tokenizer | None] = weakref.WeakKeyDictionary()


def stream_backend(tokenizer: Any) -> Tokenizer | None:
    """The `tokenizers.Tokenizer` a DecodeStream can decode `tokenizer`'s tokens with, or None.

    None where the tokenizer has no such backend (a slow tokenizer), or where its `decode` is not
    the backend's (clean_up_tokenization_spaces, a subclass's own decode): a stream could not give
    the text that `tokenizer.decode` gives. Checked once per tokenizer, on a text with the
    punctuation that transformers' clean-up rewrites.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        return None
    try:
        return _backends[tokenizer]
    except KeyError:
        pass
    except TypeError:  # not hashable or not weakly referenceable: checked at every call
        return backend if _decodes_like(tokenizer, backend) else None
    _backends[tokenizer] = backend if _decodes_like(tokenizer, backend) else None
    return _backends[tokenizer]


def _decodes_like(tokenizer: Any, backend: Tokenizer) -> bool:
    ids = backend.encode(_CLEANUP_PROBE, add_special_tokens=False).ids
    ours = tokenizer.decode(ids, skip_special_tokens=True)
    return bool(ours == backend.decode(ids, skip_special_tokens=True))


class TextOutput:
    """The text of one sequence's output, grown one generated token at a time.

        out = TextOutput(tokenizer, stop=["\\n\\n"])
        out.add(token_id)        # each token that belongs to the text (not the EOS/stop token)
        chunk = out.take()       # the text safe to stream since the last take
        if out.stop_hit: ...     # the text reached a stop string
        last = out.finish()      # the rest, once the output ended (for any reason)
        out.text                 # the final text: every take() and finish() joined

    Safe text is what can no longer change: an incomplete character at the end waits for its next
    tokens, and an end of the text that may be the start of a stop string is held back. A stop
    string ends the text just before its first occurrence. The final text is
    `tokenizer.decode(ids, skip_special_tokens=True)` of the tokens added, cut before a matched stop
    string; for a tokenizer whose decode rewrites the text across tokens (clean_up_tokenization_spaces,
    decoded by windows) it is the windows' text, which can differ from one full decode.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()):
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)  # an empty stop string would match anywhere
        self._ids: list[int] = []  # every token added
        # token id -> the text it completes (None or "" while a character is incomplete)
        self._next_text: Callable[[int], str | None]
        backend = stream_backend(tokenizer)
        if backend is not None:
            self._next_text = functools.partial(DecodeStream(skip_special_tokens=True).step, backend)
        else:
            window = IncrementalDecoder(self._decode)
            self._next_text = lambda _token: window.delta(self._ids)
        self._pending = 0  # tokens added since the decoder last gave text (an incomplete character)
        self._parts: list[str] = []  # the safe text, in order
        self._taken = 0  # parts already returned by take() or finish()
        self._held = ""  # decoded text held back: it may be the start of a stop string
        self.stop_hit = False  # the text reached a stop string (nothing is added after it)
        self.finished = False

    def add(self, token_id: int) -> None:
        """Add one generated token to the text; sets `stop_hit` when it completes a stop string."""
        if self.stop_hit or self.finished:
            raise RuntimeError("TextOutput.add after the output ended")
        self._ids.append(token_id)
        delta = self._next_text(token_id)
        if not delta:
            self._pending += 1
            return
        self._pending = 0
        if not self._stop:
            self._parts.append(delta)
            return
        # Only the held-back end plus the new text can hold a stop string's first occurrence: the
        # text before it was sent, so no stop string starts in it. Of the held text, a stop string
        # already complete would have been found, so a match starts at most len(stop) - 1 back.
        text, start = self._held + delta, len(self._held)
        found = (text.find(s, max(0, start - len(s) + 1)) for s in self._stop)
        cut = min((i for i in found if i >= 0), default=-1)
        if cut >= 0:
            self.stop_hit = True
            safe, self._held = text[:cut], ""
        else:
            held = stop_prefix_len(text, self._stop)
            safe, self._held = text[: len(text) - held], text[len(text) - held :]
        if safe:
            self._parts.append(safe)

    def take(self) -> str:
        """The safe text added since the last `take` (or `finish`); "" if none."""
        if self._taken == len(self._parts):
            return ""
        new = self._parts[self._taken :]
        self._taken = len(self._parts)
        return new[0] if len(new) == 1 else "".join(new)

    def finish(self) -> str:
        """End the output (any reason: length, EOS, stop, abort) and return the text not taken yet:
        what was held back, and the text of the tokens the decoder still holds (an incomplete
        character at the end shows as U+FFFD, as a full decode gives it). After a stop string, the
        text up to it only. Calling it again returns ""."""
        if not self.finished:
            self.finished = True
            if not self.stop_hit:
                rest = self._held + self._flush()
                if rest:
                    self._parts.append(rest)
            self._held = ""
        return self.take()

    @property
    def text(self) -> str:
        """The safe text so far (every `take` and `finish` joined); the final text after `finish`."""
        return "".join(self._parts)

    def _flush(self) -> str:
        """The text of the tokens added since the decoder last gave text."""
        if not self._pending:
            return ""
        # One full decode, at the end and only with tokens pending: where the text so far begins it
        # (byte-level BPE, byte-fallback and WordPiece tokenizers checked), the final text is then
        # exactly what decoding all the tokens gives. Else the pending tokens are decoded alone.
        done = "".join(self._parts) + self._held
        full = self._decode(self._ids)
        if full.startswith(done):
            return full[len(done) :]
        return self._decode(self._ids[-self._pending :])

    def _decode(self, token_ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(token_ids, skip_special_tokens=True))

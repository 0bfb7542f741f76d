"""Streaming text: the deltas of the incremental decoder add up to what decoding everything gives."""

from __future__ import annotations

import random

import pytest

from lorafleet.worker.engine import synthetic
from lorafleet.worker.engine.detokenize import IncrementalDecoder


@pytest.fixture(scope="module")
def tokenizer():
    return synthetic.build_tokenizer(2000)  # byte-level BPE, as the demo and tests serve


def stream(tokenizer, ids: list[int]) -> list[str]:
    """The deltas a job streaming `ids` one token per step would send."""
    decoder = IncrementalDecoder(lambda t: tokenizer.decode(t, skip_special_tokens=True))
    return [decoder.delta(ids[: n + 1]) for n in range(len(ids))]


@pytest.mark.parametrize(
    "text",
    [
        "the quick brown fox jumps over the lazy dog",
        "naïve café, smörgåsbord: ünïcödé everywhere",
        "emoji 👋🏽 and 漢字 split into several byte tokens each",
        "  leading spaces,\nnew lines\tand tabs  ",
    ],
)
def test_deltas_concatenate_to_the_decoded_text(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    deltas = stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)  # a character split across tokens is sent whole


def test_random_tokens_never_send_text_that_later_changes(tokenizer):
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(3, tokenizer.vocab_size) for _ in range(60)]
        sent = "".join(stream(tokenizer, ids))
        full = tokenizer.decode(ids, skip_special_tokens=True)
        assert full.startswith(sent)
        # only an incomplete character at the very end may still be held back
        assert len(full) - len(sent) <= 2
        assert set(full[len(sent) :]) <= {"\ufffd"}

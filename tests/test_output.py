"""Output text: streamed deltas add up to the decoded text, stop strings are held back and cut."""

from __future__ import annotations

import random

import pytest

from lorafleet.worker.engine import synthetic
from lorafleet.worker.engine.output import IncrementalDecoder, TextOutput, stop_prefix_len, stream_backend

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "naïve café, smörgåsbord: ünïcödé everywhere",
    "emoji 👋🏽 and 漢字 split into several byte tokens each",
    "  leading spaces,\nnew lines\tand tabs  ",
]


@pytest.fixture(scope="module")
def tokenizer():
    return synthetic.build_tokenizer(2000)  # byte-level BPE, as the demo and tests serve


class SlowTokenizer:
    """A tokenizer without a `tokenizers` backend: TextOutput falls back to IncrementalDecoder."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def decode(self, ids, skip_special_tokens=False):
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.fixture(params=["decode_stream", "window"])
def decoding(request, tokenizer):
    """The tokenizer TextOutput is given, for each of its two decoders."""
    return tokenizer if request.param == "decode_stream" else SlowTokenizer(tokenizer)


def stream(tokenizer, ids: list[int]) -> list[str]:
    """The deltas a job streaming `ids` one token per step would send."""
    decoder = IncrementalDecoder(lambda t: tokenizer.decode(t, skip_special_tokens=True))
    return [decoder.delta(ids[: n + 1]) for n in range(len(ids))]


def text_output(tokenizer, ids: list[int], stop=()) -> tuple[TextOutput, list[str]]:
    """Add `ids` one at a time (until a stop string); the steps' deltas, the last one from finish()."""
    out = TextOutput(tokenizer, stop)
    deltas = []
    for token in ids:
        out.add(token)
        if out.stop_hit:
            break
        deltas.append(out.take())
    deltas.append(out.finish())
    return out, deltas


@pytest.mark.parametrize("text", TEXTS)
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


def test_fast_tokenizers_stream_through_their_backend_and_slow_ones_through_windows(tokenizer):
    assert stream_backend(tokenizer) is tokenizer.backend_tokenizer
    assert stream_backend(SlowTokenizer(tokenizer)) is None


def test_a_tokenizer_whose_decode_cleans_up_spaces_is_not_streamed_through_its_backend():
    """transformers' clean_up_tokenization_spaces rewrites " ." and " ' " (WordPiece tokenizers): a
    DecodeStream would not give that text, so those tokenizers use the window decoder, whose windows
    are cleaned up one at a time (close to a full decode, not always equal); the deltas still add up
    to the final text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]"], show_progress=False)
    backend.train_from_iterator(["a . b ? c ! d , e ' f n't g 'm h 's i 've j 're k"] * 10, trainer=trainer)
    cleaning = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=True)
    assert stream_backend(cleaning) is None
    plain = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False)
    assert stream_backend(plain) is plain.backend_tokenizer
    ids = cleaning("a . b , c 's", add_special_tokens=False).input_ids
    out, deltas = text_output(cleaning, ids)
    assert cleaning.decode(ids, skip_special_tokens=True) == "a. b, c's"
    assert "".join(deltas) == out.text
    assert out.text.startswith("a. b, c")  # (" ' " is cleaned up in no window: "c ' s", not "c's")


@pytest.mark.parametrize("text", TEXTS)
def test_text_output_deltas_add_up_to_the_decoded_text(decoding, tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    out, deltas = text_output(decoding, ids)
    assert "".join(deltas) == out.text == text
    assert not any("\ufffd" in d for d in deltas)  # a character split across tokens is sent whole


def test_multi_byte_characters_split_across_tokens_are_sent_whole(decoding, tokenizer):
    text = "漢字 and 👋🏽"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)  # some character spans tokens
    _, deltas = text_output(decoding, ids)
    assert "".join(deltas) == text
    assert "" in deltas[:-1]  # a step that ends inside a character sends nothing
    assert not any("\ufffd" in d for d in deltas)


def test_random_tokens_and_specials_add_up_to_the_full_decode(decoding, tokenizer):
    """Whatever the tokens (invalid byte sequences, special tokens, a character cut off at the
    end), the final text is what decoding them all gives, and it is the deltas joined."""
    rng = random.Random(0)
    for _ in range(40):
        ids = [rng.randrange(0, tokenizer.vocab_size) for _ in range(rng.randrange(1, 50))]
        out, deltas = text_output(decoding, ids)
        assert "".join(deltas) == out.text == tokenizer.decode(ids, skip_special_tokens=True)


def test_stop_prefix_len():
    assert stop_prefix_len("the answer", ["answer is"]) == len("answer")
    assert stop_prefix_len("the answer ", ["answer is", "r i"]) == len("answer ")
    assert stop_prefix_len("the answer", ["x", "rx"]) == 1
    assert stop_prefix_len("the answer", ["zz"]) == 0
    assert stop_prefix_len("", ["ab"]) == 0


def test_a_stop_string_split_across_tokens_is_held_back_and_never_streamed(decoding, tokenizer):
    """Text that may be the start of a stop string waits; a false start ("answer was") is sent
    once it no longer can be one, and the text ends just before the stop string."""
    text = "the answer was two, the answer is three"
    stop = "answer is"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert not any(stop in tokenizer.decode([t]) for t in ids)  # it spans tokens
    out, deltas = text_output(decoding, ids, stop=[stop, "never"])
    final = text[: text.index(stop)]
    assert out.stop_hit
    assert "".join(deltas) == out.text == final
    sent = ""
    for n, delta in enumerate(deltas[:-1]):
        sent += delta
        decoded = tokenizer.decode(ids[: n + 1])
        assert decoded.startswith(sent)
        assert len(decoded) - len(sent) == stop_prefix_len(decoded, [stop, "never"])  # the held-back end
    assert "answer was" in sent  # the false start went out before the stop


def test_a_stop_string_in_one_token_cuts_its_text(decoding, tokenizer):
    ids = tokenizer("one two three four", add_special_tokens=False).input_ids
    out, deltas = text_output(decoding, ids, stop=["o t"])
    assert out.stop_hit
    assert "".join(deltas) == out.text == "one tw"  # cut before the "o t" of "two three"


def test_an_output_ended_on_a_possible_stop_start_sends_it_last(decoding, tokenizer):
    ids = tokenizer("the answer", add_special_tokens=False).input_ids
    out, deltas = text_output(decoding, ids, stop=["answer is"])
    assert not out.stop_hit
    assert "answer" not in "".join(deltas[:-1])
    assert deltas[-1].endswith("answer")
    assert "".join(deltas) == out.text == "the answer"
    assert out.finish() == ""  # finishing twice adds nothing

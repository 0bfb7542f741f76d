"""The gateway's pieces that need no server: request checks, the nesting scan, metric labels."""

from __future__ import annotations

import json

import pytest

from lorafleet.gateway.body import nesting_depth, parse_json
from lorafleet.gateway.errors import APIError
from lorafleet.gateway.metrics import OTHER, GatewayMetrics
from lorafleet.gateway.requests import CHAT, COMPLETION, parse_request
from lorafleet.producer.protocol import Usage

MESSAGES = [{"role": "user", "content": "hi"}]


def rejected(kind, body):
    with pytest.raises(APIError) as error:
        parse_request(kind, body, 60.0)
    assert error.value.status == 400
    return error.value


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        ('{"a": [1, [2, {"b": 3}]]}', 4),
        ('{"a": "[[[[[[[[["}', 1),  # brackets in a string
        ('{"a": "\\"[[[[", "b": [1]}', 2),  # an escaped quote does not end the string
        ('{"a": "\\\\", "b": [[1]]}', 3),  # an escaped backslash does not escape the quote after it
        ("[]", 1),
    ],
)
def test_nesting_depth_counts_structure_outside_strings(text, depth):
    assert nesting_depth(text.encode(), 100) == depth
    assert json.loads(text) is not None


def test_the_depth_limit_is_checked_before_parsing():
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(APIError, match="deeper than 32"):
        parse_json(deep, 32)
    assert parse_json(b'{"a": [[["x"]]]}', 32) == {"a": [[["x"]]]}


def test_chat_request_becomes_job_parameters():
    request = parse_request(
        CHAT,
        {
            "model": "bot@3", "messages": [{"role": "system", "content": [{"type": "text", "text": "be "},
            {"type": "text", "text": "brief"}]}, *MESSAGES], "max_completion_tokens": 7, "temperature": 0,
            "top_p": 0.5, "seed": 3, "stop": "\n", "user": "u1", "top_k": 4, "priority": -2,
            "stream": True, "stream_options": {"include_usage": True}, "n": 1, "logprobs": None,
        },
        60.0,
    )  # fmt: skip
    spec = request.spec
    assert spec["messages"][0] == {"role": "system", "content": "be brief"}
    assert (spec["max_new_tokens"], spec["temperature"], spec["top_p"], spec["seed"]) == (7, 0.0, 0.5, 3)
    assert (spec["stop"], spec["top_k"], spec["priority"], spec["stream"]) == (["\n"], 4, -2, True)
    assert request.include_usage
    assert request.user == "u1"
    assert spec["deadline"] > 0  # every job gets one


def test_completions_default_to_16_tokens_and_take_token_ids():
    assert parse_request(COMPLETION, {"model": "m", "prompt": "x"}, 60.0).spec["max_new_tokens"] == 16
    assert parse_request(COMPLETION, {"model": "m", "prompt": [[1, 2]]}, 60.0).spec["prompt_ids"] == [1, 2]


@pytest.mark.parametrize(
    ("kind", "body", "param"),
    [
        (CHAT, {"model": "m", "messages": MESSAGES, "n": 2}, "n"),
        (CHAT, {"model": "m", "messages": MESSAGES, "tools": [{"type": "function"}]}, "tools"),
        (CHAT, {"model": "m", "messages": MESSAGES, "stop": ["x"] * 17}, "stop"),
        (CHAT, {"model": "m", "messages": MESSAGES, "top_p": 0}, "top_p"),
        (CHAT, {"model": "m", "messages": MESSAGES, "seed": -1}, "seed"),
        (CHAT, {"model": "m", "messages": MESSAGES, "priority": 11}, "priority"),
        (CHAT, {"model": "m", "messages": MESSAGES, "deadline": 1.0}, "deadline"),
        (CHAT, {"model": "m", "messages": MESSAGES, "stream_options": {}}, "stream_options"),
        (CHAT, {"model": "m", "messages": MESSAGES, "max_tokens": 2, "max_completion_tokens": 3},
         "max_completion_tokens"),
        (CHAT, {"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        (CHAT, {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "messages[0].content"),
        (CHAT, {"model": "m", "messages": []}, "messages"),
        (CHAT, {"model": 3, "messages": MESSAGES}, "model"),
        (COMPLETION, {"model": "m", "prompt": ["a", "b"]}, "prompt"),
        (COMPLETION, {"model": "m", "prompt": ""}, "prompt"),
        (COMPLETION, {"model": "m", "prompt": "x", "echo": True}, "echo"),
        (COMPLETION, {"model": "m", "prompt": "x", "max_completion_tokens": 3}, "max_completion_tokens"),
    ],
)  # fmt: skip
def test_what_cannot_be_honoured_is_a_400_naming_the_field(kind, body, param):
    assert rejected(kind, body).param == param


def test_metric_labels_name_a_bounded_number_of_adapters():
    metrics = GatewayMetrics(max_adapters=2)
    for adapter in ("a", "b", "c", "d", "a"):
        metrics.add_usage(adapter, "t", Usage(1, 2))
    text = metrics.render().decode()
    labels = {line.split('adapter="')[1].split('"')[0] for line in text.splitlines()
              if line.startswith("lorafleet_gateway_tokens_total")}  # fmt: skip
    assert labels == {"a", "b", OTHER}
    assert 'lorafleet_gateway_tokens_total{adapter="other",kind="completion",tenant="t"} 4.0' in text


def test_usage_reports_prompt_tokens_served_from_a_prefix_cache():
    from types import SimpleNamespace

    from lorafleet.gateway.openai_shapes import usage

    assert usage(Usage(5, 2)) == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    cached = usage(SimpleNamespace(prompt_tokens=5, completion_tokens=2, cached_tokens=3))
    assert cached["prompt_tokens_details"] == {"cached_tokens": 3}

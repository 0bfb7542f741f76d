"""The OpenAI-compatible gateway driven by the official `openai` client, against a real
`lorafleet worker` process (tiny synthetic model, made here) on a real Redis."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest
import redis
from gateway_harness import serve
from harness import isolated_url

from lorafleet.gateway.config import GatewayConfig
from lorafleet.gateway.tenants import Tenants, hash_key, parse_tenants
from lorafleet.producer import Producer
from lorafleet.producer.cli import main
from lorafleet.producer.keys import Keys
from lorafleet.worker.adapters.registry import AdapterRecord, Registry
from lorafleet.worker.engine import synthetic

ADAPTERS = ("team-a", "team-b")
KEY_A, KEY_B = "lf-key-of-tenant-a", "lf-key-of-tenant-b"
CHAT = [{"role": "user", "content": "tell me about the sea"}]


@pytest.fixture(scope="module")
def url(redis_source):
    yield from isolated_url(redis_source)


@pytest.fixture(scope="module")
def worker(url, tmp_path_factory):
    """One real `lorafleet worker` process serving a tiny model and two plain adapter folders."""
    root = tmp_path_factory.mktemp("gateway-store")
    model = synthetic.write_model(root / "model", "llama", "tiny", seed=3)
    for i, name in enumerate(ADAPTERS):
        synthetic.write_adapter(
            root / "adapters" / name, model, rank=4, targets=synthetic.ALL_TARGETS, seed=i
        )
    args = [
        sys.executable,
        "-P",
        "-m",
        "lorafleet.producer.cli",
        "worker",
        "--redis-url",
        url,
        "--model",
        str(model),
        "--adapters",
        str(root / "adapters"),
        "--name",
        "gw-worker",
        "--max-batch",
        "8",
        "--kv-cache-tokens",
        "8192",
        "--log-level",
        "warning",
    ]
    env = {**os.environ, "LORAFLEET_CACHE_DIR": str(root / "cache")}
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, env=env)
    with Producer(url) as producer:  # ready once it answers a job
        producer.submit(prompt_ids=[1, 2], max_new_tokens=1).result(timeout=120)
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def gateway(url, worker):
    """An open gateway onto the worker; adapters are plain folders, so `models=any`."""
    served = serve(GatewayConfig(redis_url=url, models="any"))
    yield served
    served.stop()


@pytest.fixture(scope="module")
def client(gateway):
    return openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=60)


def _tenants():
    text = json.dumps(
        {
            "tenants": [
                {"name": "tenant-a", "key_sha256": hash_key(KEY_A), "models": ["team-a"]},
                {
                    "name": "tenant-b",
                    "key_sha256": hash_key(KEY_B),
                    "models": ["team-*", "base"],
                    "requests_per_minute": 3,
                },
            ]
        }
    )
    return Tenants(parse_tenants(text, "test"))


@pytest.fixture(scope="module")
def keyed(url, worker):
    """A gateway onto the same worker that needs API keys."""
    served = serve(GatewayConfig(redis_url=url, models="any"), _tenants())
    yield served
    served.stop()


def test_streamed_text_equals_the_whole_response_and_names_the_adapter_version(client):
    whole = client.chat.completions.create(model="team-a", messages=CHAT, max_tokens=12, temperature=0)
    stream = client.chat.completions.create(
        model="team-a",
        messages=CHAT,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.choices[0].message.content == streamed
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == []
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")  # (cached tokens may differ)
    assert [getattr(chunks[-1].usage, c) for c in counts] == [getattr(whole.usage, c) for c in counts]
    assert whole.usage.completion_tokens >= 1
    assert whole.usage.prompt_tokens > 3
    name, _, version = whole.model.partition("@")  # the version that served it
    assert name == "team-a"
    assert len(version) >= 8
    assert whole.system_fingerprint == whole.model
    assert chunks[-1].model == whole.model


async def test_async_client_completions_stream_and_whole_agree(gateway):
    client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=60)
    kwargs = dict(
        model="base", prompt="once upon a time", max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    whole, stream = await asyncio.gather(
        client.completions.create(**kwargs), client.completions.create(**kwargs, stream=True)
    )
    parts = [c async for c in stream]
    assert "".join(c.choices[0].text for c in parts) == whole.choices[0].text
    assert whole.usage.completion_tokens == 10
    assert whole.choices[0].finish_reason == "length" == parts[-1].choices[0].finish_reason
    assert whole.model == "base"
    assert whole.object == "text_completion"
    await client.close()


def test_sampling_parameters_reach_the_job(client):
    """A seed makes sampling repeatable; a token-id prompt works; stop and top_k are honoured."""
    kwargs = dict(
        model="team-b",
        messages=CHAT,
        max_tokens=8,
        temperature=1.0,
        top_p=0.9,
        seed=7,
        extra_body={"top_k": 20, "priority": 3, "ignore_eos": True},
    )
    first = client.chat.completions.create(**kwargs)
    second = client.chat.completions.create(**kwargs)
    assert first.choices[0].message.content == second.choices[0].message.content
    assert first.usage.completion_tokens == 8
    ids = client.completions.create(
        model="base", prompt=[5, 6, 7], max_tokens=3, extra_body={"ignore_eos": True}
    )
    assert ids.usage.prompt_tokens == 3
    assert ids.usage.completion_tokens == 3


def test_errors_come_in_openai_shape_with_the_status_clients_act_on(client, url):
    with pytest.raises(openai.NotFoundError) as missing:  # the worker's adapter_not_found
        client.chat.completions.create(model="ghost", messages=CHAT, max_tokens=2)
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="team-a", messages=CHAT, temperature=5)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as several:
        client.chat.completions.create(model="team-a", messages=CHAT, n=2)
    assert several.value.body["param"] == "n"
    assert "not supported" in several.value.body["message"]
    with pytest.raises(openai.BadRequestError) as unknown:
        client.chat.completions.create(model="team-a", messages=CHAT, extra_body={"max_token": 3})
    assert unknown.value.body["param"] == "max_token"
    with pytest.raises(openai.APIStatusError) as late:  # the worker answers deadline_exceeded
        client.chat.completions.create(
            model="team-a",
            messages=CHAT,
            max_tokens=2000,
            extra_body={"deadline": time.time() + 0.3, "ignore_eos": True},
        )
    assert late.value.status_code == 504


def test_queue_full_is_429_with_retry_after_and_redis_down_is_503(url):
    keys = Keys("full")
    with Producer(url, namespace="full") as producer:  # no worker reads this namespace
        producer.submit("waiting", adapter="team-a")
    full = serve(GatewayConfig(redis_url=url, namespace="full", models="any", max_waiting_per_adapter=1))
    down = serve(GatewayConfig(redis_url="redis://127.0.0.1:1/0", models="any"))
    try:
        client = openai.OpenAI(base_url=full.base_url, api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError) as limited:
            client.chat.completions.create(model="team-a", messages=CHAT)
        assert int(limited.value.response.headers["retry-after"]) >= 1
        assert redis.Redis.from_url(url).xlen(keys.jobs("team-a")) == 1
        client = openai.OpenAI(base_url=down.base_url, api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError) as unreachable:
            client.chat.completions.create(model="team-a", messages=CHAT)
        assert unreachable.value.status_code == 503
        assert httpx.get(down.url + "/health").status_code == 503
    finally:
        full.stop()
        down.stop()


def _job_keys(r, namespace):
    return set(r.scan_iter(match=f"{namespace}:job:*")) | set(r.scan_iter(match=f"{namespace}:jobs:*"))


def _nested(value, depth):
    for _ in range(depth):
        value = [value]
    return value


def test_bad_requests_get_4xx_and_never_reach_the_queue(url):
    served = serve(GatewayConfig(redis_url=url, namespace="bad", models="any", max_body_bytes=64 * 1024))
    endpoint = served.base_url + "/chat/completions"
    ok = {"model": "team-a", "messages": CHAT}
    bodies = {
        "malformed": b'{"model": "team-a", "messages": [',
        "not an object": b"[1, 2]",
        "not UTF-8": b'{"model": "\xff"}',
        "NaN": b'{"model": "team-a", "messages": [], "temperature": NaN}',
        "deep": b'{"x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
        "deep in messages": json.dumps({**ok, "messages": _nested(CHAT, 40)}).encode(),
        "wrong type": json.dumps({**ok, "max_tokens": "ten"}).encode(),
        "bool for int": json.dumps({**ok, "max_tokens": True}).encode(),
        "unknown field": json.dumps({**ok, "frobnicate": 1}).encode(),
        "bad message": json.dumps({**ok, "messages": [{"role": "user"}]}).encode(),
        "no model": json.dumps({"messages": CHAT}).encode(),
        "empty": b"",
    }
    try:
        with httpx.Client(timeout=10) as http:
            for what, body in bodies.items():
                answer = http.post(endpoint, content=body, headers={"content-type": "application/json"})
                assert answer.status_code == 400, what
                error = answer.json()["error"]
                assert error["type"] == "invalid_request_error", what
                assert error["message"], what
            huge = http.post(endpoint, content=b" " * (65 * 1024))
            assert huge.status_code == 413
            assert http.post(served.url + "/v1/nothing").status_code == 404
            assert http.get(endpoint).status_code == 405
            assert http.get(served.url + "/health").status_code == 200  # still serving
        wrong_type = json.loads(bodies["wrong type"])
        with httpx.Client() as http:
            assert http.post(endpoint, json=wrong_type).json()["error"]["param"] == "max_tokens"
        r = redis.Redis.from_url(url)
        assert _job_keys(r, "bad") == set()
    finally:
        served.stop()


def test_brackets_inside_strings_do_not_count_as_nesting(client):
    text = "[" * 100 + "{" * 100  # 200 levels if they counted; the limit is 32
    answer = client.chat.completions.create(
        model="base", messages=[{"role": "user", "content": text}], max_tokens=1
    )
    assert answer.usage.completion_tokens == 1


def test_api_keys_tenant_globs_and_rates(keyed, url):
    r = redis.Redis.from_url(url)
    anonymous = openai.OpenAI(base_url=keyed.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.chat.completions.create(model="team-a", messages=CHAT, max_tokens=2)
    assert httpx.get(keyed.base_url + "/models").status_code == 401  # no key at all
    a = openai.OpenAI(base_url=keyed.base_url, api_key=KEY_A, max_retries=0, timeout=60)
    before = _job_keys(r, "lorafleet")
    for model in ("team-b", "base", "team-b@0123456789"):
        with pytest.raises(openai.PermissionDeniedError):
            a.chat.completions.create(model=model, messages=CHAT, max_tokens=2)
    assert _job_keys(r, "lorafleet") == before  # nothing was queued
    assert a.chat.completions.create(model="team-a", messages=CHAT, max_tokens=2).usage.completion_tokens >= 1
    assert [m.id for m in a.models.list()] == []  # the base model is not tenant-a's; no registry here
    b = openai.OpenAI(base_url=keyed.base_url, api_key=KEY_B, max_retries=0, timeout=60)
    assert [m.id for m in b.models.list()] == ["base"]
    for model in ("team-a", "team-b", "base"):  # a glob and the base model, 3 requests per minute
        b.completions.create(model=model, prompt="hi", max_tokens=1)
    with pytest.raises(openai.RateLimitError) as limited:
        b.completions.create(model="team-a", prompt="hi", max_tokens=1)
    assert float(limited.value.response.headers["retry-after"]) >= 1


def _usage_row(url, capsys):
    """tenant-a's usage of team-a over the last day, read with `lorafleet usage --json`."""
    assert main(["usage", "--redis-url", url, "--key", "tenant-a", "--adapter", "team-a", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert len(rows) <= 1
    return rows[0] if rows else {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}


def test_usage_is_metered_per_adapter_and_key(keyed, url, capsys):
    a = openai.OpenAI(base_url=keyed.base_url, api_key=KEY_A, max_retries=0, timeout=60)
    before = _usage_row(url, capsys)
    usages = [a.completions.create(model="team-a", prompt=f"count {i}", max_tokens=3).usage for i in range(3)]
    stream = a.completions.create(
        model="team-a", prompt="streamed", max_tokens=3, stream=True, stream_options={"include_usage": True}
    )
    usages.append(list(stream)[-1].usage)  # a stream is metered as well
    row = _usage_row(url, capsys)
    assert (row["adapter"], row["tenant"]) == ("team-a", "tenant-a")
    assert row["requests"] - before["requests"] == 4
    assert row["prompt_tokens"] - before["prompt_tokens"] == sum(u.prompt_tokens for u in usages)
    assert row["completion_tokens"] - before["completion_tokens"] == sum(u.completion_tokens for u in usages)
    metrics = httpx.get(keyed.url + "/metrics").text
    line = 'lorafleet_gateway_tokens_total{adapter="team-a",kind="completion",tenant="tenant-a"}'
    exported = next(float(x.split()[-1]) for x in metrics.splitlines() if x.startswith(line))
    assert exported == row["completion_tokens"]
    assert main(["usage", "--redis-url", url, "--since", "1h"]) == 0
    table = capsys.readouterr().out
    assert "tenant-a" in table
    assert "total" in table


def test_a_client_that_disconnects_cancels_its_job(client, gateway, url):
    r = redis.Redis.from_url(url)
    stream = client.chat.completions.create(
        model="team-a", messages=CHAT, max_tokens=5000, stream=True, extra_body={"ignore_eos": True}
    )
    first = next(iter(stream))
    stream.close()
    job_id = first.id.removeprefix("chatcmpl-")
    cancel = Keys().cancel(job_id)
    deadline = time.monotonic() + 10
    while not r.exists(cancel) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert r.exists(cancel)


def _wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_gives_up_waiting_cancels_its_queued_job(url, stream):
    """No worker reads this namespace: the job waits, the client times out, the gateway cancels it
    (a stream waits for its first reply before it answers, so it is cancelled the same way)."""
    served = serve(GatewayConfig(redis_url=url, namespace=f"idle-{stream}", models="any"))
    r = redis.Redis.from_url(url)
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                served.base_url + "/completions",
                timeout=0.5,
                json={"model": "team-a", "prompt": "hello", "stream": stream},
            )
        (job,) = [key.decode().rsplit(":", 1)[1] for key in r.scan_iter(match=f"idle-{stream}:job:*")]
        assert _wait_for(lambda: r.exists(Keys(f"idle-{stream}").cancel(job)))
        assert r.get(Keys(f"idle-{stream}").cancels) == b"1"  # workers are told to look
    finally:
        served.stop()


def test_models_lists_the_base_model_and_ready_registry_adapters(url):
    keys = Keys("reg")
    registry = Registry(redis.Redis.from_url(url), keys)
    registry.set_pending(AdapterRecord("support", "v1"))
    registry.set_ready("support", "v1")
    registry.set_pending(AdapterRecord("support", "v2"))  # pushed, not validated yet
    registry.set_pending(AdapterRecord("draft", "v1"))
    served = serve(GatewayConfig(redis_url=url, namespace="reg", base_model="llama-tiny"))
    try:
        client = openai.OpenAI(base_url=served.base_url, api_key="x", max_retries=0)
        assert [(m.id, getattr(m, "version", None)) for m in client.models.list()] == [
            ("llama-tiny", None),
            ("support", "v1"),
        ]
        for model in ("draft", "support@v2", "nope", "../etc"):  # refused before anything is queued
            with pytest.raises(openai.NotFoundError):
                client.chat.completions.create(model=model, messages=CHAT)
        assert _job_keys(redis.Redis.from_url(url), "reg") == set()
    finally:
        served.stop()


def test_gateway_command_without_the_extra_names_the_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sse_starlette", None)
    assert main(["gateway"]) == 2
    assert "pip install 'lorafleet[gateway]'" in capsys.readouterr().err


def test_the_producer_command_line_does_not_load_the_web_stack():
    code = (
        "import sys, lorafleet.producer.cli as c; c.build_parser(); "
        "print(sorted(m for m in ('starlette', 'fastapi', 'uvicorn', 'sse_starlette') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_gateway_command_serves_and_warns_when_open(url):
    from gateway_harness import free_port

    port = free_port()
    env = {**os.environ, "LORAFLEET_REDIS_URL": url, "LORAFLEET_PORT": str(port)}
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "lorafleet.producer.cli", "gateway", "--log-level", "warning"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert health.json() == {"status": "ok"}
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert "NO API KEYS CONFIGURED" in err


def test_a_deadline_that_passes_mid_stream_ends_it_with_an_error_event(client):
    stream = client.chat.completions.create(
        model="team-b",
        messages=CHAT,
        max_tokens=5000,
        stream=True,
        extra_body={"deadline": time.time() + 1.5, "ignore_eos": True},
    )
    received = []

    def read_all():
        for chunk in stream:
            received.append(chunk)

    with pytest.raises(openai.APIError) as ended:
        read_all()
    assert received  # the stream had started: the error came as an event, not a status
    assert "deadline" in str(ended.value.message)


def test_neutral_values_of_unsupported_fields_are_accepted(client):
    answer = client.chat.completions.create(
        model="base",
        messages=CHAT,
        max_tokens=2,
        n=1,
        logprobs=False,
        frequency_penalty=0,
        presence_penalty=0,
        response_format={"type": "text"},
        user="someone",
    )
    assert answer.usage.completion_tokens >= 1


def test_gateway_key_prints_an_entry_the_keys_file_accepts(tmp_path, capsys):
    assert main(["gateway-key", "ops", "--models", "team-*", "base", "--requests-per-minute", "5"]) == 0
    captured = capsys.readouterr()
    key = captured.err.rsplit(":", 1)[1].strip()
    entry = json.loads(captured.out)
    assert key not in captured.out  # only the hash is printed for the file
    assert entry["key_sha256"] == hash_key(key)
    path = tmp_path / "tenants.json"
    path.write_text(json.dumps({"tenants": [entry]}))
    tenants = Tenants.load(str(path))
    tenant = tenants.authenticate(f"Bearer {key}")
    assert tenant.name == "ops"
    assert [tenant.allows(m) for m in ("team-x", "base", "other")] == [True, True, False]
    path.write_text(json.dumps({"tenants": [{"name": "x", "key": key}]}))
    with pytest.raises(ValueError, match="key"):
        Tenants.load(str(path))
    assert main(["gateway", "--api-keys-file", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_usage_hours_expire(keyed, url):
    a = openai.OpenAI(base_url=keyed.base_url, api_key=KEY_A, max_retries=0, timeout=60)
    a.completions.create(model="team-a", prompt="tick", max_tokens=1)
    r = redis.Redis.from_url(url)
    key = Keys().usage(int(time.time() // 3600))
    assert r.hget(key, "team-a|tenant-a|requests") is not None
    assert 0 < r.ttl(key) <= GatewayConfig().usage_ttl


def test_rates_are_shared_by_every_gateway_and_count_tokens(url, worker):
    tenants = json.dumps(
        {
            "tenants": [
                {"name": "shared", "key_sha256": hash_key("k-shared"), "requests_per_minute": 2},
                {"name": "wordy", "key_sha256": hash_key("k-wordy"), "tokens_per_minute": 5},
            ]
        }
    )
    first = serve(GatewayConfig(redis_url=url, models="any", api_keys=tenants))
    second = serve(GatewayConfig(redis_url=url, models="any", api_keys=tenants))
    try:
        clients = [
            openai.OpenAI(base_url=g.base_url, api_key="k-shared", max_retries=0) for g in (first, second)
        ]
        for client in clients:  # one request through each gateway: the tenant's two per minute
            client.completions.create(model="base", prompt="hi", max_tokens=1)
        with pytest.raises(openai.RateLimitError):
            clients[0].completions.create(model="base", prompt="hi", max_tokens=1)
        wordy = openai.OpenAI(base_url=second.base_url, api_key="k-wordy", max_retries=0)
        answer = wordy.completions.create(model="base", prompt="a prompt of a few words", max_tokens=1)
        assert answer.usage.total_tokens > 5  # more than a minute's worth: the bucket is in debt
        with pytest.raises(openai.RateLimitError) as limited:
            wordy.completions.create(model="base", prompt="hi", max_tokens=1)
        assert int(limited.value.response.headers["retry-after"]) > 1
    finally:
        first.stop()
        second.stop()

"""lorafleet.gateway: an OpenAI-compatible HTTP door onto the queue (`lorafleet gateway`).

The gateway is a producer: each request becomes one job submitted with the `AsyncProducer`, and its
replies become the response (or a stream of server-sent events). `model` names an adapter
(``name`` or ``name@version``) or the base model. API keys map tenants to the adapters they may
call; usage is metered per adapter and per key in Redis and as Prometheus counters.

Layers: `config` (settings), `body` (size and depth limits, JSON), `requests` (OpenAI request ->
job spec), `openai_shapes` (reply -> OpenAI response), `errors`, `tenants` (keys, rates), `models`
(the registry's catalog), `usage` and `metrics` (metering), `completions` (one request's life),
`app` (routes), `cli`. Only `app`, `completions` and `metrics` import the web stack (the `gateway`
extra); `cli`, `usage`, `tenants` and the rest load on the base install, so `lorafleet usage` works
without it.
"""

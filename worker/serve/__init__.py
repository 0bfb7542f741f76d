"""The worker loop behind the queue: `worker.Worker` pulls jobs from Redis streams, runs them through
the engine and publishes replies. Beside it: its settings (`config`), the scheduler's policy (pure,
no Redis), the fleet directory, recovery of jobs left by dead workers, the reply sender thread,
Prometheus metrics and JSON logs.

May import: engine/, adapters/, store/, lorafleet.producer (the wire protocol), Redis. Never cli/.
"""

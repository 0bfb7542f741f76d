"""The worker loop behind the queue: `worker.Worker` pulls jobs from Redis streams, runs them through
the engine and publishes replies.

    worker.py     the loop: housekeeping, admission, one engine step per turn; drain and shutdown
    intake.py     admission by the scheduler's plan, and starting, parking or refusing each job
    jobs.py       the job table: running and parked jobs, and every count derived from them
    residency.py  which adapters hold this worker's adapter slots (the one owner of residency)
    answers.py    replies: chunks, results, errors, dead letters, hand-backs
    scheduler.py  the admission and eviction policy (pure: no Redis, no clock); plan.py its values
    fleet.py      the fleet directory and load leases; recovery.py jobs left by dead workers
    reply_sender.py, metrics.py, config.py, logs.py

May import: engine/, adapters/, store/, lorafleet.producer (the wire protocol), Redis. Never cli/.
"""

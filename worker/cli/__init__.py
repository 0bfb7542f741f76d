"""The command line: `lorafleet worker|status|top|demo|adapters|models` (`main` dispatches).

The demo is `demo` (the run), `demo_run` (its settings and run folder), `demo_files` (the model and
adapters it makes), `demo_fleet` (Redis and the worker processes), `demo_jobs` (what it submits)
and `demo_report`; `redis_server` is the demo's embedded Redis server.

May import anything of lorafleet.worker.
"""

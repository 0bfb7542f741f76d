"""The command line: `lorafleet worker|status|top|demo|adapters|models` (`main` dispatches), the
demo's embedded Redis server (`redis_server`) and its report.

May import anything of lorafleet.worker.
"""

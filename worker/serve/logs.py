"""Logging: structlog JSON lines on stderr, bound with worker, job and adapter where known.

Modules that log through the standard library (the adapter manager, the model store, the control
plane) print the same JSON lines: a handler on the root logger renders their records with structlog.
Other libraries' records pass that handler too, from WARNING up, so that their INFO chatter stays out.
"""

from __future__ import annotations

import logging
import sys

import structlog

_STAMP = structlog.processors.TimeStamper(fmt="iso", utc=True)


def configure_logging(level: str = "info") -> None:
    """JSON logs at `level` (debug, info, warning, error) on stderr, structlog's and the stdlib's."""
    numeric = getattr(logging, level.upper(), None)
    if not isinstance(numeric, int):
        raise ValueError(f"log_level must be debug, info, warning or error, not {level!r}")
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            _STAMP,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_log_level, structlog.stdlib.add_logger_name, _STAMP],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(max(numeric, logging.WARNING))  # other libraries: warnings and errors only
    logging.getLogger("lorafleet").setLevel(numeric)

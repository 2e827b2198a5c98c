"""Per-node structured logging: JSON lines in ``<log_dir>/node-<id>.log``, readable lines on stderr.

Every line carries timestamp, level, node, term, role and event, plus the event's own fields.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import structlog

ContextFn = Callable[[], dict[str, Any]]


class _Tee:
    """Final processor: one JSON line to the file, one readable line to the console."""

    def __init__(self, file: TextIO, console: bool) -> None:
        self.file = file
        self.console = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()) if console else None

    def __call__(self, logger: Any, method: str, event: dict[str, Any]) -> str:
        self.file.write(json.dumps(event, default=str, separators=(",", ":")) + "\n")
        self.file.flush()
        if self.console is not None:
            sys.stderr.write(self.console(logger, method, dict(event)) + "\n")
        raise structlog.DropEvent


def setup_node_logging(log_file: Path, node_id: int, context: ContextFn, console: bool = True,
                       level: str = "info") -> Any:
    """Configure structlog for this process and return the node's bound logger.

    ``context`` is called for every line and returns the node's current term and role. Calls
    below ``level`` return at once, without building the line.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    fh = open(log_file, "a", encoding="utf-8")

    def add_context(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
        for k, v in context().items():
            event.setdefault(k, v)
        return event

    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            add_context,
            _Tee(fh, console),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        cache_logger_on_first_use=False,
    )
    return structlog.get_logger().bind(node=node_id)

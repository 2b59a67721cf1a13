"""Logging for people and machines: one setup for every Hivemart process, and progress that suits
where it is shown.

Every process logs one record per line: ``TIME LEVEL logger: message`` (``text``, for people) or
one JSON object per line (``json``, for log shippers: a traceback stays inside its record, its
newlines escaped). The provider agent takes ``--log-format``; the marketplace's processes (web,
worker, beat) read ``HIVEMART_LOG_FORMAT``.

Verbosity (``-v`` counts) decides what is shown:

- 0: warnings and errors, plus the INFO lines of ``info_loggers`` (a provider's start-up steps
  and state changes: what an operator wants to see by default) and of progress.
- 1: INFO of Hivemart's own packages.
- 2: DEBUG everywhere, including the libraries whose INFO is per-request chatter (httpx's
  "HTTP Request" line per heartbeat, hivemind's), which stay at WARNING below 2.

Progress (:func:`progress`) is a tqdm bar when it goes to a terminal and the format is text;
otherwise a plain log line every tenth of the way or every few seconds, so that a log file gets
readable lines instead of one huge line of carriage returns.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Protocol, TextIO

__all__ = [
    "CHATTY_LOGGERS",
    "LOG_FORMATS",
    "OWN_LOGGERS",
    "JsonFormatter",
    "Progress",
    "TextFormatter",
    "adopt_hivemind_logging",
    "configure_logging",
    "logging_config",
    "logs_held",
    "parse_log_format",
    "progress",
]

LOG_FORMATS = ("text", "json")
# Hivemart's own packages: INFO from -v on.
OWN_LOGGERS = ("hivemart", "hivemart_core", "client_sdk", "provider_agent", "marketplace", "scheduler")
# Libraries whose INFO is a line per request or per heartbeat: WARNING unless -vv.
CHATTY_LOGGERS = ("httpx", "httpcore", "hivemind", "urllib3", "filelock")
PROGRESS_LOGGER = "hivemart.progress"

# Standard names whatever hivemind renamed them to (it makes WARNING print as "WARN").
_LEVEL_NAMES = {
    logging.DEBUG: "DEBUG",
    logging.INFO: "INFO",
    logging.WARNING: "WARNING",
    logging.ERROR: "ERROR",
    logging.CRITICAL: "CRITICAL",
}
# Attributes every LogRecord has (and hivemind's own), so that only a caller's ``extra=`` fields
# are added to a JSON record.
_RECORD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "caller",
    "caller_block",
    "origin_created",
    "levelcolor",
    "bold",
    "reset",
}
_HANDLER_MARK = "_hivemart_console"

_current_format = "text"
# The level configure_logging gave the chatty libraries (hivemind's loggers get it when adopted).
_chatty_level = logging.WARNING


def parse_log_format(value: str) -> str:
    """``value`` as a log format; a ValueError that names the choices otherwise."""
    fmt = value.strip().lower()
    if fmt not in LOG_FORMATS:
        raise ValueError(f"unknown log format {value!r}: use {' or '.join(LOG_FORMATS)}")
    return fmt


def _level_name(record: logging.LogRecord) -> str:
    return _LEVEL_NAMES.get(record.levelno, record.levelname)


def _timestamp(record: logging.LogRecord) -> str:
    when = datetime.fromtimestamp(record.created, tz=UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    """``2026-12-07T23:12:01.123Z INFO provider_agent.agent: serving blocks 0:4 ...``: one line
    per record; a traceback follows on the lines after it, in the same record."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {_level_name(record)} {record.name}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per record on one line: ``time`` (UTC), ``level``, ``logger``, ``message``,
    ``exception`` (the traceback; JSON escapes its newlines) and the caller's ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _timestamp(record),
            "level": _level_name(record),
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
            if record.exc_info[0] is not None:
                entry["exception_type"] = record.exc_info[0].__name__
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and not key.startswith("_") and key not in entry:
                entry[key] = value
        return json.dumps(entry, default=str, ensure_ascii=False)


def _formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if parse_log_format(fmt) == "json" else TextFormatter()


def configure_logging(
    verbosity: int = 0,
    fmt: str = "text",
    *,
    stream: TextIO | None = None,
    info_loggers: Sequence[str] = (),
    hivemind: bool = False,
) -> logging.Handler:
    """Send every log record to ``stream`` (stderr) in ``fmt``, at the levels ``verbosity`` picks
    (see the module docstring). Calling it again replaces the handler it installed before.

    ``hivemind=True`` routes hivemind's loggers through this handler too (hivemind otherwise prints
    them itself, in its own format); it imports hivemind, so pass it only where hivemind is used.
    It happens anyway when hivemind is already imported.
    """
    global _current_format, _chatty_level
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(_formatter(fmt))
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    _current_format = parse_log_format(fmt)
    quiet = _chatty_level = logging.DEBUG if verbosity >= 2 else logging.WARNING
    if hivemind or "hivemind.utils.logging" in sys.modules:
        adopt_hivemind_logging()

    own = logging.DEBUG if verbosity >= 2 else logging.INFO if verbosity == 1 else logging.WARNING
    root.setLevel(logging.DEBUG if verbosity >= 2 else logging.INFO if verbosity == 1 else logging.WARNING)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(own)
    for name in info_loggers:
        logging.getLogger(name).setLevel(min(own, logging.INFO))
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(quiet)
    logging.getLogger(PROGRESS_LOGGER).setLevel(min(own, logging.INFO))
    logging.captureWarnings(True)  # Python warnings (torch's, ...) become records in the same format
    return handler


def logging_config(level: str = "INFO", fmt: str = "text") -> dict[str, Any]:
    """The same setup as a :func:`logging.config.dictConfig` dict (Django's ``LOGGING``, Celery's
    worker and beat): everything at ``level`` to stderr in ``fmt``, chatty libraries at WARNING
    unless ``level`` is DEBUG."""
    fmt = parse_log_format(fmt)
    level = level.strip().upper()
    if not isinstance(logging.getLevelName(level), int):
        raise ValueError(f"unknown log level {level!r}: use DEBUG, INFO, WARNING or ERROR")
    quiet = "DEBUG" if level == "DEBUG" else "WARNING"
    formatter = "hivemart_core.logs.JsonFormatter" if fmt == "json" else "hivemart_core.logs.TextFormatter"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"hivemart": {"()": formatter}},
        "handlers": {"hivemart": {"class": "logging.StreamHandler", "formatter": "hivemart"}},
        "root": {"handlers": ["hivemart"], "level": level},
        "loggers": {name: {"level": quiet} for name in CHATTY_LOGGERS},
    }


def adopt_hivemind_logging(level: int | None = None) -> None:
    """Route hivemind's loggers through the root logger's handlers: hivemind gives them a handler
    of its own (another format, colours) that does not propagate, so they would bypass the
    format chosen here and write to stderr in the middle of anything. Their level becomes
    ``level`` (default: what :func:`configure_logging` chose for chatty libraries)."""
    from hivemind.utils.logging import use_hivemind_log_handler

    use_hivemind_log_handler("nowhere")
    # Importing hivemind set its level, and handing its handler back reset it: set it again.
    logging.getLogger("hivemind").setLevel(_chatty_level if level is None else level)


class _Held(logging.Handler):
    """Keeps records back (the last ``limit``) to hand them to the real handler later."""

    def __init__(self, limit: int) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []
        self.dropped, self.limit = 0, limit

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) >= self.limit:
            self.records.pop(0)
            self.dropped += 1
        self.records.append(record)


@contextmanager
def logs_held(limit: int = 1000) -> Iterator[None]:
    """Hold back the lines the console handler would print until the block ends, then print them:
    for text streamed to the same terminal (a demo's generated tokens), which a log line must not
    cut in two. Only the handler :func:`configure_logging` installed is held."""
    root = logging.getLogger()
    consoles = [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]
    if not consoles:
        yield
        return
    held = _Held(limit)
    for handler in consoles:
        root.removeHandler(handler)
    root.addHandler(held)
    try:
        yield
    finally:
        root.removeHandler(held)
        for handler in consoles:
            root.addHandler(handler)
        if held.dropped:
            root.warning(f"{held.dropped} log lines held back during the stream were dropped")
        for record in held.records:
            for handler in consoles:
                if record.levelno >= handler.level:
                    handler.handle(record)


# --- progress --------------------------------------------------------------------------------


class Progress(Protocol):
    """What :func:`progress` returns (a tqdm bar, log lines, or nothing)."""

    def update(self, n: int = 1) -> None: ...

    def set_postfix(self, **values: Any) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> Progress: ...

    def __exit__(self, *exc: object) -> None: ...


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _BarProgress:
    """A tqdm bar (imported only here: a terminal is there to see it)."""

    def __init__(self, *, total: int | None, desc: str, unit: str, initial: int, stream: TextIO) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, file=stream, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def set_postfix(self, **values: Any) -> None:
        self.bar.set_postfix(values)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> _BarProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _LineProgress:
    """A plain line every tenth of ``total`` (at most one per ``min_gap_s``, so that quick work
    says only that it is done) or every ``every_s`` seconds (without a total, only that), and one
    at the end: through logging when it is set up (so the line has the process's format, JSON
    included), else straight to ``stream``."""

    def __init__(
        self,
        *,
        total: int | None,
        desc: str,
        unit: str,
        initial: int,
        stream: TextIO,
        every_s: float,
        min_gap_s: float,
    ) -> None:
        self.total, self.desc, self.unit, self.stream = total, desc, unit, stream
        self.every_s, self.min_gap_s = every_s, min_gap_s
        self.n = self.start = initial
        self.postfix: dict[str, Any] = {}
        self.started = self.last_line = time.monotonic()
        self.last_tenth = self._tenth()
        self.closed = False
        self.lines = 0
        self.logger = logging.getLogger(PROGRESS_LOGGER)

    def _tenth(self) -> int:
        return self.n * 10 // self.total if self.total else 0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        since = now - self.last_line
        if (self._tenth() > self.last_tenth and since >= self.min_gap_s) or since >= self.every_s:
            self.last_tenth, self.last_line = self._tenth(), now
            self._line(self._status())

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def _status(self) -> str:
        done = f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"
        if self.total:
            done += f" ({100 * self.n // self.total}%)"
        elapsed = time.monotonic() - self.started
        if elapsed > 0 and self.n > self.start:
            done += f", {(self.n - self.start) / elapsed:.2f} {self.unit}/s"
        return done + "".join(f", {key}={value}" for key, value in self.postfix.items())

    def _line(self, text: str) -> None:
        self.lines += 1
        message = f"{self.desc}: {text}"
        if self.logger.hasHandlers() and self.logger.isEnabledFor(logging.INFO):
            self.logger.info(message)
        elif not self.logger.hasHandlers():  # logging not set up (a script using the SDK): print it
            self.stream.write(message + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        elapsed = time.monotonic() - self.started
        if not self.lines and elapsed < self.min_gap_s:
            return  # quick work: the caller's own lines say enough
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        extra = "".join(f", {key}={value}" for key, value in self.postfix.items())
        self._line(f"done, {done} {self.unit} in {elapsed:.1f} s{extra}")

    def __enter__(self) -> _LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(
    total: int | None,
    desc: str,
    *,
    unit: str = "it",
    initial: int = 0,
    enabled: bool = True,
    stream: TextIO | None = None,
    every_s: float = 10.0,
    min_gap_s: float = 1.0,
) -> Progress:
    """Progress of long work (fine-tuning steps, blocks loaded, a bench's rounds): a tqdm bar on a
    terminal, periodic one-line messages anywhere else (a log file, a pipe, JSON logs), nothing
    when not ``enabled``. Use as ``with progress(30, "finetune") as bar: ... bar.update()``."""
    if not enabled:
        return _NoProgress()
    stream = stream if stream is not None else sys.stderr
    if _current_format == "text" and _isatty(stream):
        return _BarProgress(total=total, desc=desc, unit=unit, initial=initial, stream=stream)
    return _LineProgress(
        total=total, desc=desc, unit=unit, initial=initial, stream=stream, every_s=every_s, min_gap_s=min_gap_s
    )


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or file-less stream
        return False

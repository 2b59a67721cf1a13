"""hivemart_core.logs: one line per record (text or JSON), levels by verbosity, progress that is a
bar only on a terminal, and log lines held back while text streams."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

import hivemart_core.logs as logs
from hivemart_core.logs import configure_logging, logs_held, parse_log_format, progress

WATCHED = ("", *logs.OWN_LOGGERS, *logs.CHATTY_LOGGERS, logs.PROGRESS_LOGGER, "provider_agent")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """configure_logging changes process-wide state: put it back for the tests that follow."""
    root = logging.getLogger()
    handlers, levels, fmt = list(root.handlers), {n: logging.getLogger(n).level for n in WATCHED}, logs._current_format
    yield
    root.handlers[:] = handlers
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    logs._current_format = fmt
    logging.captureWarnings(False)


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_text_records_are_one_line_each_with_time_level_and_logger() -> None:
    out = io.StringIO()
    configure_logging(0, stream=out)
    logging.getLogger("provider_agent.agent").warning("the p2p daemon is gone")
    logging.getLogger("provider_agent.agent").info("not shown at the default verbosity")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    stamp, level, rest = lines[0].split(" ", 2)
    assert stamp.endswith("Z") and "T" in stamp  # UTC, ISO 8601
    assert (level, rest) == ("WARNING", "provider_agent.agent: the p2p daemon is gone")


def test_json_lines_parse_one_object_per_line_with_the_traceback_inside_its_record() -> None:
    out = io.StringIO()
    configure_logging(1, "json", stream=out)
    log = logging.getLogger("scheduler.services.probes")
    log.info("probing %d providers", 3, extra={"job_id": 7})
    try:
        raise ValueError("bad answer\non two lines")
    except ValueError:
        log.exception("probe failed")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # the traceback's newlines are escaped inside its record
    first, second = (json.loads(line) for line in lines)
    assert (first["level"], first["logger"], first["message"], first["job_id"]) == (
        "INFO",
        "scheduler.services.probes",
        "probing 3 providers",
        7,
    )
    assert (second["level"], second["message"], second["exception_type"]) == ("ERROR", "probe failed", "ValueError")
    assert second["exception"].startswith("Traceback") and "bad answer\non two lines" in second["exception"]


def test_hivemind_warn_is_written_warning_in_both_formats() -> None:
    before = logging.getLevelName(logging.WARNING)
    logging.addLevelName(logging.WARNING, "WARN")  # as importing hivemind does
    try:
        out = io.StringIO()
        configure_logging(0, "json", stream=out)
        logging.getLogger("hivemart.x").warning("w")
        configure_logging(0, "text", stream=out)
        logging.getLogger("hivemart.x").warning("w")
    finally:
        logging.addLevelName(logging.WARNING, before)
    first, second = out.getvalue().splitlines()
    assert json.loads(first)["level"] == "WARNING" and second.split(" ")[1] == "WARNING"


@pytest.mark.parametrize("bad", ["xml", "", "JSONL"])
def test_an_unknown_format_is_refused_with_the_choices(bad: str) -> None:
    with pytest.raises(ValueError, match="use text or json"):
        parse_log_format(bad)
    with pytest.raises(ValueError, match="use text or json"):
        configure_logging(0, bad, stream=io.StringIO())
    with pytest.raises(ValueError, match="use text or json"):
        logs.logging_config("INFO", bad)


def test_an_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown log level 'LOUD'"):
        logs.logging_config("loud", "text")


def test_per_request_chatter_stays_quiet_unless_vv() -> None:
    # httpx logs "HTTP Request: POST .../heartbeat" at INFO once per heartbeat.
    for verbosity, shown in ((0, False), (1, False), (2, True)):
        configure_logging(verbosity, stream=io.StringIO(), info_loggers=("provider_agent",))
        for name in ("httpx", "httpcore", "hivemind"):
            assert logging.getLogger(f"{name}.x").isEnabledFor(logging.INFO) is shown, (name, verbosity)
        # The provider's start-up steps always show; other own INFO from -v on.
        assert logging.getLogger("provider_agent.agent").isEnabledFor(logging.INFO)
        assert logging.getLogger("client_sdk.swarm").isEnabledFor(logging.INFO) is (verbosity >= 1)


def test_progress_off_a_terminal_is_periodic_lines_without_carriage_returns() -> None:
    out = io.StringIO()
    configure_logging(0, stream=out)  # INFO of other loggers hidden; progress still shows
    with progress(30, "finetune lora", unit="step", stream=out, min_gap_s=0) as bar:
        for step in range(30):
            bar.update()
            bar.set_postfix(loss=f"{3 - step / 10:.4f}")
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    # A line per tenth of the way, then one saying it is done.
    assert len(lines) == 11 and all("hivemart.progress: finetune lora: " in line for line in lines)
    assert "3/30 step (10%)" in lines[0] and "30/30 step (100%)" in lines[9]
    assert "done, 30/30 step in" in lines[10] and "loss=0.1000" in lines[10]


def test_progress_in_json_logs_is_json_even_on_a_terminal() -> None:
    out = Tty()
    configure_logging(0, "json", stream=out)
    with progress(4, "hashing", unit="block", stream=out, min_gap_s=0) as bar:
        for _ in range(4):
            bar.update()
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["message"] for r in records][-1].startswith("hashing: done, 4/4 block")


def test_progress_on_a_terminal_is_a_bar() -> None:
    out = Tty()
    configure_logging(0, stream=io.StringIO())
    with progress(5, "bench", stream=out) as bar:
        for _ in range(5):
            bar.update()
    assert "\r" in out.getvalue() and "5/5" in out.getvalue()


def test_disabled_progress_says_nothing() -> None:
    out = io.StringIO()
    configure_logging(0, stream=out)
    with progress(5, "quiet", stream=out, enabled=False) as bar:
        bar.update(5)
    assert out.getvalue() == ""


def test_log_lines_wait_until_the_streamed_text_has_ended_its_line() -> None:
    out = io.StringIO()
    configure_logging(0, stream=out)
    log = logging.getLogger("client_sdk.swarm.remote")
    with logs_held():
        out.write("Providers serve the")
        log.warning("provider 12D3 failed; failing over")
        logging.getLogger("client_sdk.swarm.session").info("below the level: dropped as usual")
        out.write(" blocks\n")
    lines = out.getvalue().splitlines()
    assert lines[0] == "Providers serve the blocks"
    assert len(lines) == 2 and lines[1].endswith("client_sdk.swarm.remote: provider 12D3 failed; failing over")
    log.warning("after the stream")
    assert out.getvalue().splitlines()[-1].endswith("after the stream")  # the handler is back


def test_configuring_twice_replaces_the_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging(0, stream=first)
    configure_logging(0, "json", stream=second)
    logging.getLogger("hivemart.x").warning("once")
    assert first.getvalue() == "" and json.loads(second.getvalue())["message"] == "once"


def test_hivemind_lines_take_the_configured_format_and_stay_quiet_below_vv() -> None:
    import hivemind.utils.logging as hivemind_logging

    before = hivemind_logging._current_mode
    try:
        out = io.StringIO()
        configure_logging(1, "json", stream=out)
        # As when hivemind is imported after logging is configured: its own handler, its own level...
        hivemind_logging.use_hivemind_log_handler("in_hivemind")
        logs.adopt_hivemind_logging()  # ...until `hivemart-provider run` adopts its loggers
        hivemind = logging.getLogger("hivemind.dht.node")
        hivemind.info("per-request chatter")
        hivemind.warning("a real problem")
    finally:
        hivemind_logging.use_hivemind_log_handler(before)
    assert [json.loads(line)["message"] for line in out.getvalue().splitlines()] == ["a real problem"]

"""The embedded broker (``hivemartfs://``) under concurrent publishers and consumers.

Kombu's filesystem transport let a consumer take a message file before its writer had
written it: the worker read an empty file, raised JSONDecodeError and stopped (issue 14,
``hivemart demo --keep`` died after ~10 idle minutes of beat traffic). Large messages and a
consumer that never sleeps make that window wide here.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import zlib
from pathlib import Path

import pytest
from kombu import Connection, Exchange, Queue

from scheduler import broker
from scheduler.celery import broker_config

PAYLOAD_BYTES = 128 * 1024


def _connection(folder: Path) -> Connection:
    return Connection(
        f"{broker.SCHEME}://",
        transport_options={
            "data_folder_in": str(folder),
            "data_folder_out": str(folder),
            "control_folder": str(folder / "control"),
            "polling_interval": 0,
        },
    )


def _queue(folder: Path) -> Queue:
    # Named after the folder: kombu keeps exchange bindings per process, and a binding made for
    # another test's folder would be taken as already made in this one.
    name = f"q-{zlib.crc32(str(folder).encode())}"
    return Queue(name, Exchange(name), name)


def _publish(folder: Path, producer_id: int, count: int) -> None:
    queue = _queue(folder)
    with _connection(folder) as conn:
        producer = conn.Producer(serializer="json")
        for i in range(count):
            producer.publish(
                {"id": f"{producer_id}-{i}", "pad": "x" * PAYLOAD_BYTES},
                exchange=queue.exchange,
                routing_key=queue.routing_key,
                declare=[queue],
            )


def _consume(folder: Path, expected: int, got: list[str], errors: list[BaseException], done: threading.Event) -> None:
    """Take messages into ``got`` until ``expected`` arrived, or none comes once ``done`` is set."""
    queue = _queue(folder)
    try:
        with _connection(folder) as conn:
            simple = conn.SimpleQueue(queue)
            while len(got) < expected:
                try:
                    message = simple.get(timeout=5)
                except simple.Empty:
                    if done.is_set():
                        return
                    continue
                got.append(message.payload["id"])
                message.ack()
    except BaseException as e:  # reported to the test thread
        errors.append(e)


def test_concurrent_publishers_and_consumers_lose_and_corrupt_nothing(tmp_path: Path):
    """Three threads and one other process publish large messages while two consumers poll
    without pause: every message arrives once, whole."""
    folder = tmp_path / "queue"
    (folder / "control").mkdir(parents=True)
    per_producer, threads_n = 30, 3
    expected = per_producer * (threads_n + 1)
    got: list[str] = []
    errors: list[BaseException] = []
    done = threading.Event()  # every publisher finished
    consumers = [threading.Thread(target=_consume, args=(folder, expected, got, errors, done)) for _ in range(2)]
    for consumer in consumers:
        consumer.start()
    other = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; "
            "from tests.scheduler.test_broker import _publish; "
            f"_publish(Path(sys.argv[1]), 99, {per_producer})",
            str(folder),
        ],
        cwd=Path(__file__).resolve().parents[2],
    )
    producers = [threading.Thread(target=_publish, args=(folder, n, per_producer)) for n in range(threads_n)]
    for producer in producers:
        producer.start()
    for producer in producers:
        producer.join()
    assert other.wait(120) == 0
    done.set()
    for consumer in consumers:
        consumer.join(120)
    assert errors == []
    assert sorted(got) == sorted([f"{n}-{i}" for n in [*range(threads_n), 99] for i in range(per_producer)])
    assert not [p for p in folder.iterdir() if p.is_file()]  # nothing half-written left behind


def _bind_and_route(folder: Path, queues: list[str], errors: list[BaseException]) -> None:
    try:
        with _connection(folder) as conn:
            channel = conn.default_channel
            channel.exchange_declare("shared", "direct")
            for name in queues:
                channel.queue_declare(name)
                channel.queue_bind(name, "shared", name)
                channel.get_table("shared")  # what a publisher reads to route
    except BaseException as e:  # reported to the test thread
        errors.append(e)


def test_queues_bound_at_once_are_all_routed_and_never_read_half_written(tmp_path: Path):
    # Kombu writes an exchange's table into a file it first creates empty: a publisher reading it
    # at that moment raised, and two binders at once kept only one's queues.
    folder = tmp_path / "queue"
    (folder / "control").mkdir(parents=True)
    errors: list[BaseException] = []
    names = [[f"q{t}-{i}" for i in range(10)] for t in range(6)]
    threads = [threading.Thread(target=_bind_and_route, args=(folder, queues, errors)) for queues in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    with _connection(folder) as conn:
        routed = {entry.queue for entry in conn.default_channel.get_table("shared")}
    assert routed == {name for queues in names for name in queues}


def test_an_undecodable_message_file_is_skipped_not_fatal(tmp_path: Path):
    folder = tmp_path / "queue"
    (folder / "control").mkdir(parents=True)
    _publish(folder, 1, 1)
    # what a torn write left behind in kombu's transport
    (folder / f"0_garbage.{_queue(folder).name}.msg").write_text("")
    got: list[str] = []
    errors: list[BaseException] = []
    done = threading.Event()
    done.set()
    _consume(folder, 1, got, errors, done)
    assert errors == [] and got == ["1-0"]


def test_the_scheduler_uses_the_safe_transport_without_redis(tmp_path: Path):
    config = broker_config(redis_url="", home=tmp_path, queue="hivemart")
    assert config["broker_url"] == "hivemartfs://"
    options = config["broker_transport_options"]
    assert Path(options["control_folder"]).is_dir() and Path(options["data_folder_in"]).is_dir()
    with Connection(config["broker_url"], transport_options=options) as conn:
        assert conn.transport_cls == "hivemartfs" and isinstance(conn.transport, broker.Transport)


@pytest.mark.parametrize("redis_url", ["redis://127.0.0.1:6379/9"])
def test_redis_stays_the_broker_when_configured(tmp_path: Path, redis_url: str):
    assert broker_config(redis_url=redis_url, home=tmp_path, queue="q")["broker_url"] == redis_url

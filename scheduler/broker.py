"""The embedded broker: kombu's filesystem transport, made safe for concurrent processes.

``hivemart demo`` and a marketplace without ``REDIS_URL`` run the web process, the worker
and beat on one machine with no broker service; they share a folder of message files. Kombu's
own filesystem transport creates a message file and only then writes it, while a consumer
takes (renames) files without the writer's lock: a worker polling at the wrong moment read
an empty file, raised ``JSONDecodeError`` and stopped ("Unrecoverable error"), typically
after some minutes of beat traffic. Here a message becomes visible only once complete (it is
written under a name consumers ignore and renamed into place, atomically on one filesystem),
a consumer claims it with an atomic rename as well, and a file that still does not decode is
logged and skipped rather than fatal. Exchange tables (which queues an exchange routes to) are
rewritten the same way, one binder at a time: kombu creates the table file empty and writes it
afterwards, so a publisher routing at that moment read an empty table and raised; and
another thread of the same process could route by the table before the binding it had just
seen declared was in it, so that its message went to no queue.

Select it with ``broker_url="hivemartfs://"`` (see :func:`scheduler.celery.broker_config`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from pathlib import Path
from queue import Empty
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES, filesystem, virtual
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads

__all__ = ["Channel", "Transport", "SCHEME"]

logger = logging.getLogger(__name__)

SCHEME = "hivemartfs"
# Consumers take only files named like "<stamp>_<uuid>.<queue>.msg": names starting with a dot
# (files being written, the claim folder) are never mistaken for messages.
_CLAIMED = ".claimed"
# kombu records a binding in the process's state before it writes the exchange's table file: a
# second thread that saw the binding routed by the file without it, and its message went nowhere.
_BINDING = threading.Lock()


class Channel(filesystem.Channel):
    """Atomic publish and claim over kombu's filesystem layout (same file names, same order)."""

    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        name = f"{int(round(time.monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        folder = Path(self.data_folder_out)
        partial = folder / f".{name}.part"
        try:
            partial.write_bytes(str_to_bytes(dumps(payload)))
            os.replace(partial, folder / name)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise ChannelError(f"cannot add a message to {folder}: {exc}") from exc

    def _get(self, queue: str) -> Any:
        folder = Path(self.data_folder_in)
        claims = folder / _CLAIMED
        claims.mkdir(exist_ok=True)
        wanted = f"{queue}.msg"
        for filename in sorted(os.listdir(folder)):
            if filename.partition(".")[2] != wanted:
                continue
            claimed = claims / filename
            try:
                os.rename(folder / filename, claimed)  # atomic: exactly one consumer gets it
            except FileNotFoundError:
                continue  # another consumer was first
            try:
                payload = claimed.read_bytes()
            except OSError as exc:
                raise ChannelError(f"cannot read message {claimed}: {exc}") from exc
            finally:
                claimed.unlink(missing_ok=True)
            try:
                return loads(bytes_to_str(payload))
            except ValueError as exc:
                logger.error("dropped an undecodable message %s from the embedded broker: %s", filename, exc)
        raise Empty()

    def queue_bind(self, *args: Any, **kwargs: Any) -> None:
        with _BINDING:  # see _BINDING
            super().queue_bind(*args, **kwargs)

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        table_file = self._exchange_file(exchange)
        self.control_folder.mkdir(exist_ok=True)
        entry = filesystem.exchange_queue_t(routing_key or "", pattern or "", queue or "")
        # One binder at a time, across processes: two of them would each write a table without
        # the other's queue.
        with open(self.control_folder / ".bindings.lock", "a+b") as guard:
            filesystem.lock(guard, filesystem.LOCK_EX)
            try:
                table = self.get_table(exchange)
                if entry in table:
                    return
                partial = table_file.with_name(f".{table_file.name}.{uuid.uuid4()}.part")
                try:
                    partial.write_bytes(str_to_bytes(dumps([entry, *table])))
                    os.replace(partial, table_file)  # readers see the old table or the new, whole
                except OSError as exc:
                    partial.unlink(missing_ok=True)
                    raise ChannelError(f"cannot bind {queue} to {exchange} in {self.control_folder}: {exc}") from exc
            finally:
                filesystem.unlock(guard)


class Transport(filesystem.Transport):
    """kombu transport ``hivemartfs://`` (see the module docstring)."""

    Channel = Channel
    global_state = virtual.BrokerState()  # its own: kombu's is shared by every filesystem transport
    driver_type = driver_name = SCHEME


TRANSPORT_ALIASES.setdefault(SCHEME, f"{__name__}:Transport")

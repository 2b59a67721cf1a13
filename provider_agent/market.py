"""The agent's link to the marketplace: platform key, registration, heartbeats, receipt uploads.

With ``--market URL`` the agent learns the platform key that signs job tickets from
``GET /api/platform/`` (unless ``--platform-key`` gave it); with ``--api-key`` too it
registers as a provider (a challenge signed with its identity, its offer: catalogued model,
blocks, ``--price``, hardware), heartbeats with its state and self-measured throughput, and
uploads its latest receipt per (ticket, session) in batches every few seconds and at shutdown.

The marketplace may be down at any time: every call is retried with exponential backoff
(bounded delay, jitter), failures are logged, and the agent keeps serving meanwhile. Until
the platform key is known the agent refuses billable work (``not_accepting``) rather than
serve it for free. Receipts that could not be uploaded stay queued (only the newest per
(ticket, session), so the queue is bounded by the work done) and go out with the next batch.

HTTP calls run on one worker thread of their own, so the swarm's event loop never waits on
the marketplace.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from hivemind.utils.logging import get_logger

from hivemart_core.api import Client
from hivemart_core.api.types import PlatformInfo, ReceiptResult
from hivemart_core.errors import (
    AuthenticationError,
    ConflictError,
    HivemartError,
    NotFoundError,
    PermissionDeniedError,
    ValidationError,
)
from hivemart_core.protocol.identity import Identity, is_valid_public_key
from hivemart_core.protocol.receipts import MAX_RECEIPTS_PER_UPLOAD, WorkReceipt
from hivemart_core.protocol.tickets import HEX64_PATTERN
from provider_agent.config import AgentConfig
from provider_agent.metering import TicketBook

__all__ = ["MarketLink", "MarketSetupError", "Offer", "fetch_platform_key", "hardware"]

logger = get_logger(__name__)

T = TypeVar("T")

_BACKOFF_FIRST_S = 1.0
_BACKOFF_MAX_S = 60.0
# A setup problem only the operator can fix (model not catalogued, digests differ): retry slowly.
_SETUP_RETRY_S = 60.0
_SHUTDOWN_UPLOAD_S = 10.0


class MarketSetupError(HivemartError):
    """The marketplace refuses this agent's offer for a reason only its operator can fix."""


@dataclass(frozen=True)
class Offer:
    """What the agent registers: blocks ``[start, end)`` of ``model_id`` whose weights have
    ``block_digests``, at ``price`` micro-credits per million work units, on this hardware."""

    model_id: str
    start: int
    end: int
    block_digests: tuple[str, ...]
    price: int
    gpu: str = ""
    gpu_memory_mb: int = 0


def hardware(device: str) -> tuple[str, int]:
    """(GPU name, GPU memory in MiB) of ``device``; ("cpu", 0) without CUDA."""
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        return "cpu", 0
    props = torch.cuda.get_device_properties(torch.device(device))
    return props.name[:100], props.total_memory // (1024 * 1024)


def fetch_platform_key(client: Client) -> bytes:
    """The marketplace's platform public key (``GET /api/platform/``, no authentication)."""
    return platform_key_of(client.platform.get())


def platform_key_of(info: PlatformInfo) -> bytes:
    """``info``'s platform public key, checked (it decides which tickets the agent trusts)."""
    key = info.public_key
    if not isinstance(key, str) or not HEX64_PATTERN.match(key) or not is_valid_public_key(bytes.fromhex(key)):
        raise HivemartError(f"the marketplace answered a malformed platform key: {key!r}")
    return bytes.fromhex(key)


class MarketLink:
    """Runs the agent's conversation with the marketplace (see the module docstring).

    ``offer`` and ``status`` are called on the event loop: the current offer (it changes when
    the agent moves to other blocks) and ``(state, throughput)`` for heartbeats.
    """

    def __init__(
        self,
        config: AgentConfig,
        identity: Identity,
        book: TicketBook,
        *,
        offer: Callable[[], Offer],
        status: Callable[[], tuple[str, float]],
        client: Client | None = None,
    ) -> None:
        if not config.market_url:
            raise ValueError("a market link needs a marketplace URL")
        self.config, self.identity, self.book = config, identity, book
        self.offer, self.status = offer, status
        self.client = client or Client(api_key=config.api_key, base_url=config.market_url, timeout=15.0, max_retries=1)
        self.provider_id: int | None = None
        self.registered: Offer | None = None
        self.uploaded: dict[str, int] = {"accepted": 0, "stale": 0, "rejected": 0}
        # Receipts per upload: the shared default until the marketplace's platform info says.
        self.upload_limit = MAX_RECEIPTS_PER_UPLOAD
        self._http = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hivemart-market")
        # Heartbeat state, for logging its changes only: accepted once, failing since, failures.
        self._heartbeat_seen = False
        self._failing_since: float | None = None
        self._heartbeat_failures = 0
        self._tasks: list[asyncio.Task] = []

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._http, lambda: fn(*args, **kwargs))

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the background loops (platform key first when it is not known yet)."""
        self._tasks.append(asyncio.ensure_future(self._run()))

    async def _run(self) -> None:
        if self.book.platform_key is None:
            await self._retrying("fetch the platform key", self._learn_platform_key)
        if not self.config.api_key:
            logger.warning(
                "no --api-key: this agent checks tickets but cannot register with the marketplace or "
                "upload its receipts, so nobody pays it"
            )
            return
        self._tasks.append(asyncio.ensure_future(self._upload_loop()))
        await self._heartbeat_loop()

    async def close(self) -> None:
        """Stop the loops, upload what is left (bounded in time) and say goodbye."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.config.api_key:
            try:
                await asyncio.wait_for(self._upload_all(), _SHUTDOWN_UPLOAD_S)
            except Exception as e:
                left = self.book.pending_count()
                logger.warning(
                    f"could not upload {left} receipts before shutdown ({e!r}); they are lost to this "
                    f"agent, but clients upload their countersigned copies"
                )
            if self.provider_id is not None:
                try:
                    await asyncio.wait_for(
                        self._call(self.client.providers.heartbeat, self.provider_id, state="offline"), 5.0
                    )
                except Exception as e:
                    logger.info(f"could not tell the marketplace we are going offline: {e!r}")
        self._http.shutdown(wait=False, cancel_futures=True)
        self.client.close()

    async def _retrying(self, what: str, fn: Callable[[], Any]) -> None:
        """Await ``fn()`` until it succeeds: exponential backoff with jitter for outages, a
        slow fixed pace for setup problems (logged as errors, for the operator)."""
        delay = _BACKOFF_FIRST_S
        while True:
            try:
                await fn()
                return
            except MarketSetupError as e:
                logger.error(f"cannot {what}: {e} (retrying every {_SETUP_RETRY_S:.0f} s)")
                await asyncio.sleep(_SETUP_RETRY_S)
            except Exception as e:  # an outage, or a malformed answer: this loop must outlive both
                logger.warning(f"cannot {what} ({e!r}); retrying in {delay:.0f} s, still serving meanwhile")
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, _BACKOFF_MAX_S)

    # --- platform key and registration ---------------------------------------------------------

    async def _learn_platform_key(self) -> None:
        info = await self._call(self.client.platform.get)
        key = platform_key_of(info)
        self.upload_limit = info.receipts_per_upload
        self.book.platform_key = key
        logger.info(f"trusting tickets signed by the marketplace's platform key {key.hex()[:16]}...")

    async def _register(self) -> None:
        offer = self.offer()
        await self._call(self._check_catalog, offer)
        try:
            provider = await self._call(
                self.client.providers.register,
                identity=self.identity,
                model=offer.model_id,
                block_start=offer.start,
                block_end=offer.end,
                price=offer.price,
                gpu=offer.gpu,
                gpu_memory_mb=offer.gpu_memory_mb,
            )
        except (AuthenticationError, PermissionDeniedError, ConflictError, ValidationError) as e:
            # A wrong API key, a peer id registered by another user, a refused offer: waiting will not help.
            raise MarketSetupError(f"the marketplace refuses to register us: {e}") from e
        self.provider_id, self.registered = provider.id, offer
        logger.info(
            f"registered with the marketplace as provider {provider.id}: blocks {offer.start}:{offer.end} "
            f"of {offer.model_id} at {offer.price} micro-credits per million units"
        )

    def _check_catalog(self, offer: Offer) -> None:
        """The marketplace must list the model, with the very weights this agent serves."""
        try:
            model = self.client.models.get(offer.model_id)
        except NotFoundError:
            raise MarketSetupError(
                f"model {offer.model_id} is not in the catalog of {self.config.market_url}; marketplace staff add it "
                f"with `hivemart models register PATH` on a copy of this checkpoint"
            ) from None
        expected = tuple(model.block_digests[offer.start : offer.end])
        if expected != offer.block_digests:
            raise MarketSetupError(
                f"the weights of blocks {offer.start}:{offer.end} differ from those the catalog lists for "
                f"{offer.model_id}; serve the catalogued checkpoint"
            )

    async def _update_offer(self, offer: Offer) -> None:
        await self._call(self._check_catalog, offer)
        await self._call(
            self.client.providers.update_offer,
            self.provider_id,
            block_start=offer.start,
            block_end=offer.end,
            price=offer.price,
        )
        self.registered = offer
        logger.info(f"told the marketplace we now serve blocks {offer.start}:{offer.end}")

    # --- heartbeats -------------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        await self._retrying("register with the marketplace", self._register)
        while True:
            try:
                await self.heartbeat()
            except MarketSetupError as e:
                logger.error(f"the marketplace refuses our new offer: {e}")
            except Exception as e:
                self._heartbeat_failed(e)
            else:
                self._heartbeat_ok()
            await asyncio.sleep(self.config.heartbeat_period)

    # A heartbeat is logged only when the link changes state (first accepted, failing, recovered):
    # one line per period would bury everything else in the log of a provider that runs for weeks.

    def _heartbeat_ok(self) -> None:
        if self._failing_since is not None:
            logger.info(
                f"heartbeats recovered after {self._heartbeat_failures} failed "
                f"({time.monotonic() - self._failing_since:.0f} s)"
            )
        elif not self._heartbeat_seen:
            logger.info(f"online at the marketplace: heartbeat every {self.config.heartbeat_period:g} s")
        self._heartbeat_seen, self._failing_since, self._heartbeat_failures = True, None, 0

    def _heartbeat_failed(self, error: Exception) -> None:
        self._heartbeat_failures += 1
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            logger.warning(
                f"heartbeat failed ({error!r}); still serving, retrying every {self.config.heartbeat_period:g} s "
                f"(logged again when it recovers)"
            )
        else:
            logger.debug(f"heartbeat failed again ({self._heartbeat_failures} in a row): {error!r}")

    async def heartbeat(self) -> None:
        """Report state and throughput; first move the offer if the agent changed blocks."""
        offer = self.offer()
        if self.registered is not None and (offer.start, offer.end) != (self.registered.start, self.registered.end):
            await self._update_offer(offer)
        state, throughput = self.status()
        await self._call(self.client.providers.heartbeat, self.provider_id, state=state, throughput=throughput)

    # --- receipts -----------------------------------------------------------------------------------

    async def _upload_loop(self) -> None:
        delay = self.config.upload_period
        while True:
            await asyncio.sleep(delay)
            try:
                await self._upload_all()
                delay = self.config.upload_period
                self.book.prune()  # forget expired tickets whose receipts are all uploaded
            except Exception as e:
                delay = min(max(delay * 2, self.config.upload_period), _BACKOFF_MAX_S)
                logger.warning(
                    f"receipt upload failed ({e!r}); {self.book.pending_count()} receipts wait, "
                    f"next try in {delay:.0f} s"
                )

    async def _upload_all(self) -> None:
        """Upload every pending receipt, in batches; a failed batch goes back to the queue."""
        while batch := self.book.take_pending(self.upload_limit):
            try:
                results = await self._call(self.client.receipts.upload, batch, batch_size=self.upload_limit)
            except ValidationError as e:
                # The batch itself is malformed in the marketplace's eyes: resending cannot help.
                logger.error(f"the marketplace refused a batch of {len(batch)} receipts: {e}")
                continue
            except BaseException:
                self.book.requeue(batch)
                raise
            self._count(batch, results)

    def _count(self, batch: list[WorkReceipt], results: list[ReceiptResult]) -> None:
        if len(results) != len(batch):
            logger.warning(f"the marketplace answered {len(results)} results for {len(batch)} receipts")
        for receipt, result in zip(batch, results, strict=False):
            self.uploaded[result.status] = self.uploaded.get(result.status, 0) + 1
            if result.status == "rejected":
                logger.warning(
                    f"the marketplace rejected our receipt {receipt.ticket_id}/{receipt.session_id}#"
                    f"{receipt.seq}: {result.code}: {result.message}"
                )

"""Paid jobs on the swarm: the marketplace's plan as the route, tickets, receipts, verification.

>>> job = MarketJob.create(client, model=model.info.model_id, budget=5_000_000, max_price=2_000_000,
...                        verify_rate=0.05)
>>> job.attach(model)                       # routes, tickets and receipts now come from the job
>>> model.generate(input_ids, max_new_tokens=20)
>>> summary = job.finish()                  # last receipts uploaded, job settling

(or ``with MarketJob.create(...) as job:``, which finishes the job on the way out.)

A :class:`MarketJob` creates the job over REST with a fresh client key (an Ed25519
:class:`~hivemart_core.protocol.identity.Identity` kept in memory: its public key is bound into
every ticket, and it countersigns receipts), waits for the scheduler's plan, and fetches the
plan's tickets. :class:`JobPlan` turns them into routes: for each segment the primary, else
the best-ranked backup that is alive and not avoided, so a planned route always takes
precedence over the DHT's minimum-latency routing, and failover replacements come from the
plan's backups. Every hop carries the ticket of its provider.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hivemind.utils.logging import get_logger

from client_sdk.swarm.routing import RouteHop
from client_sdk.swarm.verify import Equivocation, Mismatch, ShadowVerifier
from hivemart_core.errors import (
    APIError,
    ConflictError,
    HivemartError,
    NoProvidersError,
    ProtocolError,
    ProviderUnavailableError,
    SwarmError,
)
from hivemart_core.protocol.framing import encode_message
from hivemart_core.protocol.identity import Identity
from hivemart_core.protocol.receipts import MAX_RECEIPTS_PER_UPLOAD
from hivemart_core.protocol.records import ServerRecord
from hivemart_core.protocol.tickets import JobTicket, verify_ticket
from hivemart_core.swarm.connection import SpanBilling
from hivemart_core.swarm.dht import fetch_span_records
from hivemart_core.swarm.receipts import DisputeReceipt, ReceiptCollector, UploadReceipts

if TYPE_CHECKING:
    from client_sdk.swarm.model import DistributedModelForCausalLM
    from hivemart_core.api import Client, Job

__all__ = ["PlannedProvider", "JobPlan", "SwarmJob", "MarketJob", "JobPlanError", "DEFAULT_VERIFY_RATE"]

logger = get_logger(__name__)

DEFAULT_VERIFY_RATE = 0.05
# Tickets are renewed when the first of them expires within this many seconds.
RENEW_MARGIN_S = 300
_PLANNED_STATES = ("planned", "running")
_DEAD_STATES = ("failed", "cancelled", "done", "settling")


class JobPlanError(SwarmError):
    """The job has no usable plan (yet): no plan in time, a malformed one, or no provider left."""


class PlanExhaustedError(JobPlanError):
    """No planned provider is left for a segment: ``candidates`` are its primary and backups."""

    def __init__(self, message: str, candidates: Sequence[PlannedProvider]) -> None:
        super().__init__(message)
        self.candidates = list(candidates)


@dataclass(frozen=True)
class PlannedProvider:
    """One provider of a plan segment and the ticket that pays it."""

    segment: int
    role: str  # "primary" or "backup"
    rank: int  # 0 for the primary, then backups best first
    peer_id: str
    start: int
    end: int
    ticket: JobTicket
    provider_id: int | None = None  # the marketplace's id of the provider (to report it for a re-plan)


def _field(entry: Any, name: str) -> Any:
    return entry[name] if isinstance(entry, Mapping) else getattr(entry, name)


class JobPlan:
    """A job's plan as its tickets tell it: segments tiling the model's blocks, each with its
    primary and ranked backups. Pure: routes are computed from DHT records passed in."""

    def __init__(self, providers: Sequence[PlannedProvider]) -> None:
        if not providers:
            raise JobPlanError("the job's plan has no tickets")
        by_segment: dict[int, list[PlannedProvider]] = {}
        for provider in providers:
            by_segment.setdefault(provider.segment, []).append(provider)
        self.segments = [sorted(by_segment[i], key=lambda p: (p.role != "primary", p.rank)) for i in sorted(by_segment)]
        boundary = 0
        for candidates in self.segments:
            spans = {(p.start, p.end) for p in candidates}
            if len(spans) != 1 or next(iter(spans))[0] != boundary:
                raise JobPlanError(f"the plan's segments do not tile the blocks from 0 (at block {boundary}: {spans})")
            boundary = candidates[0].end
        self.num_blocks = boundary

    @classmethod
    def from_tickets(
        cls,
        entries: Sequence[Any],
        *,
        platform_key: bytes,
        job_id: int,
        client_key: str,
        model_id: str | None = None,
        now: float | None = None,
    ) -> JobPlan:
        """Check every ticket of ``GET /api/jobs/<id>/tickets/`` (platform signature, this job,
        this client key, the provider and blocks the entry names) and build the plan."""
        providers = []
        for entry in entries:
            try:
                fields = {
                    name: _field(entry, name)
                    for name in ("segment", "role", "rank", "provider_peer", "start", "end", "ticket")
                }
            except (KeyError, AttributeError, TypeError) as e:
                raise ProtocolError(f"the marketplace sent a malformed ticket entry (missing {e})") from None
            ticket = verify_ticket(
                fields["ticket"],
                platform_key=platform_key,
                provider_peer=fields["provider_peer"],
                model_id=model_id,
                now=now,
            )
            start, end, role, rank, segment = (fields[k] for k in ("start", "end", "role", "rank", "segment"))
            if (ticket.job_id, ticket.client_key, ticket.start, ticket.end) != (job_id, client_key, start, end):
                raise ProtocolError(f"ticket {ticket.ticket_id} is not for job {job_id}'s key and blocks {start}:{end}")
            if role not in ("primary", "backup") or type(rank) is not int or type(segment) is not int or segment < 0:
                raise ProtocolError(
                    f"ticket {ticket.ticket_id}: bad segment {segment!r}, role {role!r} or rank {rank!r}"
                )
            provider_id = entry.get("provider") if isinstance(entry, Mapping) else getattr(entry, "provider", None)
            providers.append(
                PlannedProvider(
                    segment,
                    role,
                    rank,
                    ticket.provider_peer,
                    start,
                    end,
                    ticket,
                    provider_id if type(provider_id) is int else None,
                )
            )
        return cls(providers)

    def providers(self) -> list[PlannedProvider]:
        return [p for candidates in self.segments for p in candidates]

    def ticket_for(self, peer_id: str, start: int, end: int) -> JobTicket | None:
        """The ticket of ``peer_id`` covering blocks [start, end), if the plan has one."""
        for provider in self.providers():
            if provider.peer_id == peer_id and provider.ticket.covers(start, end):
                return provider.ticket
        return None

    def route(
        self,
        records: Mapping[str, ServerRecord],
        start: int,
        end: int,
        avoid: frozenset[str] | set[str],
        *,
        model_id: str = "the model",
    ) -> list[RouteHop]:
        """Hops over blocks [start, end): per segment, the first of primary and backups that
        is not avoided and has a live record covering the part needed."""
        hops, boundary = [], start
        while boundary < end:
            candidates = next((c for c in self.segments if c[0].start <= boundary < c[0].end), None)
            if candidates is None:
                raise NoProvidersError(model_id, boundary, end, hint="the job's plan does not cover these blocks")
            stop = min(candidates[0].end, end)
            hop = next(
                (
                    RouteHop(p.peer_id, boundary, stop, records[p.peer_id])
                    for p in candidates
                    if p.peer_id not in avoid and _serves(records.get(p.peer_id), boundary, stop)
                ),
                None,
            )
            if hop is None:
                raise PlanExhaustedError(
                    f"no planned provider is left for blocks {boundary}:{stop} (the primary and "
                    f"{len(candidates) - 1} backups failed, were excluded or are offline); ask "
                    f"the marketplace for a new plan",
                    candidates,
                )
            hops.append(hop)
            boundary = stop
        return hops

    def references(
        self, records: Mapping[str, ServerRecord], start: int, end: int, avoid: frozenset[str] | set[str]
    ) -> list[tuple[RouteHop, JobTicket]]:
        """Planned providers other than ``avoid`` whose tickets and live records cover blocks
        [start, end): who may recompute a step of them (primaries of the segment first)."""
        found = []
        for provider in self.providers():
            if (
                provider.peer_id not in avoid
                and provider.ticket.covers(start, end)
                and _serves(records.get(provider.peer_id), start, end)
            ):
                found.append((RouteHop(provider.peer_id, start, end, records[provider.peer_id]), provider.ticket))
        return found


def _serves(record: ServerRecord | None, start: int, end: int) -> bool:
    return record is not None and record.start <= start and end <= record.end


class SwarmJob:
    """A job's plan, client key, receipt collector and verifier, attached to a model.

    Without a marketplace (``upload``/``file_audit`` None) it still routes by the plan,
    mirrors and countersigns receipts, and verifies; :class:`MarketJob` adds the REST side.
    """

    def __init__(
        self,
        plan: JobPlan,
        identity: Identity,
        *,
        job_id: int,
        verify_rate: float = DEFAULT_VERIFY_RATE,
        upload: UploadReceipts | None = None,
        file_audit: Callable[[Mismatch | Equivocation], Any] | None = None,
        receipt_batch: int = 64,
        rng: random.Random | None = None,
        dispute: DisputeReceipt | None = None,
        upload_limit: int = MAX_RECEIPTS_PER_UPLOAD,
    ) -> None:
        self.plan, self.identity, self.job_id = plan, identity, job_id
        self.collector = ReceiptCollector(
            identity,
            upload=upload,
            batch_size=min(receipt_batch, upload_limit),
            dispute=dispute,
            upload_limit=upload_limit,
        )
        self.excluded: set[str] = set()  # caught returning wrong outputs: never used again by this job
        self.equivocations: list[Equivocation] = []  # providers caught pushing one output and returning another
        self.audits: list[Any] = []  # what file_audit returned for each mismatch
        self.audit_errors: list[str] = []
        self._file_audit = file_audit
        self.verifier: ShadowVerifier | None = (
            ShadowVerifier(rate=verify_rate, find_references=self._find_references, on_mismatch=self._report, rng=rng)
            if verify_rate > 0
            else None
        )
        self._lanes: dict[tuple[str, object], str] = {}  # (ticket id, lane) -> session id of forwards/backwards
        self._model: DistributedModelForCausalLM | None = None

    # --- attaching to a model ----------------------------------------------------------------------

    def attach(self, model: DistributedModelForCausalLM) -> None:
        """Make ``model`` route by this job's plan and bill its sessions and calls to its tickets."""
        if model.info.num_blocks != self.plan.num_blocks:
            raise JobPlanError(f"the plan covers {self.plan.num_blocks} blocks, the model has {model.info.num_blocks}")
        self._model = model
        model.job = self
        model.remote.billing = self.span_billing

    def detach(self) -> None:
        if self._model is not None:
            self._model.job = None
            self._model.remote.billing = None
            self._model = None

    def _records_model(self) -> DistributedModelForCausalLM:
        if self._model is None:
            raise SwarmError("attach the job to a model first: job.attach(model)")
        return self._model

    async def _records(self, start: int, end: int) -> dict[str, ServerRecord]:
        model = self._records_model()
        return await fetch_span_records(model.runtime.dht, model.info.model_id, range(start, end))

    # --- what sessions and calls ask ------------------------------------------------------------------

    async def find_route(self, start: int, end: int, avoid: frozenset[str] = frozenset()) -> list[RouteHop]:
        """The planned route over blocks [start, end) without ``avoid`` and excluded providers."""
        records = await self._records(start, end)
        return self.plan.route(records, start, end, avoid | self.excluded, model_id=self._records_model().info.model_id)

    def ticket_for(self, peer_id: str, start: int, end: int) -> JobTicket | None:
        return self.plan.ticket_for(peer_id, start, end)

    def exclude(self, peer_id: str) -> None:
        self.excluded.add(peer_id)

    def span_billing(self, hop: RouteHop, lane: object) -> SpanBilling | None:
        """Billing of forwards/backwards to ``hop``: its ticket and the session id of ``lane``
        (one per concurrent chunk, so each receipt chain sees its requests in order)."""
        ticket = self.ticket_for(hop.peer_id, hop.start, hop.end)
        if ticket is None:
            return None
        key = (ticket.ticket_id, lane)
        session_id = self._lanes.get(key)
        if session_id is None:
            session_id = self._lanes[key] = secrets.token_urlsafe(12)

        def lost() -> None:  # the provider may have counted work we never saw: start a new chain
            self._lanes.pop(key, None)

        async def verify(header: dict[str, Any], sent: Sequence[Any], reply: Any) -> None:
            await self._verify_forward(hop, ticket, session_id, header, sent[0], reply.tensors[0])

        checked = self.verifier is not None and lane != "verify"  # never verify the verification itself
        return SpanBilling(ticket, session_id, self.collector, lost, verify if checked else None)

    async def _verify_forward(
        self, hop: RouteHop, ticket: JobTicket, session_id: str, header: dict[str, Any], hidden: Any, output: Any
    ) -> None:
        """Spot-check a forward (scoring, training without deep prompts or adapters, whose
        outputs another provider can reproduce): on a mismatch the provider is excluded, an
        audit filed, and the request fails so that the caller re-routes it."""
        if self.verifier is None or "prompts" in header or "adapter_id" in header or not self.verifier.due():
            return
        mismatch = await self.verifier.check(self._records_model().runtime.p2p, hop, ticket, session_id, hidden, output)
        if mismatch is None:
            return
        self.exclude(hop.peer_id)
        await self.verifier.report(mismatch)
        raise ProviderUnavailableError(
            hop.peer_id,
            f"its outputs differ from {mismatch.reference_peer}'s ({mismatch.comparison}); reported and replaced",
        )

    async def _find_references(
        self, start: int, end: int, avoid: frozenset[str]
    ) -> list[tuple[RouteHop, SpanBilling | None]]:
        records = await self._records(start, end)
        found = self.plan.references(records, start, end, avoid | self.excluded | self._banned())
        return [(hop, self.span_billing(hop, "verify")) for hop, _ in found]

    def _banned(self) -> frozenset[str]:
        return self._model.bans.banned() if self._model is not None else frozenset()

    # --- mismatches ---------------------------------------------------------------------------------

    async def _report(self, mismatch: Mismatch | Equivocation) -> None:
        self.exclude(mismatch.peer_id)
        if self._file_audit is None:
            return
        try:
            # Off the swarm loop: the upload carries up to three tensors over HTTP.
            self.audits.append(await asyncio.to_thread(self._file_audit, mismatch))
        except HivemartError as e:
            logger.warning(f"could not file an audit against {mismatch.peer_id}: {e}")
            self.audit_errors.append(str(e))

    async def report_equivocation(self, equivocation: Equivocation) -> None:
        """A session caught a provider pushing one output and returning another: exclude it
        and file an audit whose evidence is its two differing step records."""
        self.equivocations.append(equivocation)
        await self._report(equivocation)

    # --- the end ---------------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """Receipts, verification and audits of the job so far."""
        verification = (
            self.verifier.stats.to_dict()
            if self.verifier is not None
            else {"checked": 0, "mismatches": 0, "skipped": 0, "caught": []}
        )
        return {
            "job": self.job_id,
            "receipts": self.collector.summary(),
            "verification": verification,
            "excluded": sorted(self.excluded),
            "audits": [getattr(a, "id", a) for a in self.audits],
            "equivocations": [e.peer_id for e in self.equivocations],
            "audit_errors": list(self.audit_errors),
        }

    @property
    def steps_verified(self) -> int:
        return self.verifier.stats.checked if self.verifier is not None else 0

    @property
    def mismatches(self) -> int:
        return self.verifier.stats.mismatches if self.verifier is not None else 0


def encode_tensor(tensor: Any) -> bytes:
    """A tensor as audit evidence: one framed message, so dtype and shape travel with it."""
    return b"".join(bytes(part) for part in encode_message({}, [tensor.detach().cpu().contiguous()]))


class MarketJob(SwarmJob):
    """A :class:`SwarmJob` created and settled through the marketplace's REST API."""

    def __init__(
        self,
        client: Client,
        job: Job,
        plan: JobPlan,
        identity: Identity,
        *,
        platform_key: bytes,
        upload_receipts: bool = True,
        auto_replan: bool = True,
        **kwargs: Any,
    ) -> None:
        """``upload_receipts=False`` keeps countersigned receipts local (the providers' own
        uploads still get them paid, provider-signed only). ``auto_replan``: when every planned
        provider of a segment failed, report its primary and continue on the new plan."""
        self.client, self.job, self.platform_key, self.auto_replan = client, job, platform_key, auto_replan
        super().__init__(
            plan,
            identity,
            job_id=job.id,
            upload=self._upload if upload_receipts else None,
            file_audit=self._file,
            dispute=self._dispute,
            **kwargs,
        )

    @classmethod
    def create(
        cls,
        client: Client,
        *,
        model: str,
        budget: int,
        max_price: int,
        kind: str = "inference",
        min_throughput: float | None = None,
        plan_timeout: float = 120.0,
        poll_interval: float = 0.5,
        identity: Identity | None = None,
        **kwargs: Any,
    ) -> MarketJob:
        """Create a job (holding ``budget``) with a fresh client key, wait for its plan and
        fetch its tickets. ``kwargs`` go to :class:`SwarmJob` (``verify_rate``, ...)."""
        identity = identity or Identity.generate()
        job = client.jobs.create(
            model=model,
            kind=kind,
            budget=budget,
            max_price=max_price,
            min_throughput=min_throughput,
            client_key=identity.public_key,
        )
        return cls.open(client, job.id, identity, plan_timeout=plan_timeout, poll_interval=poll_interval, **kwargs)

    @classmethod
    def open(
        cls,
        client: Client,
        job_id: int,
        identity: Identity,
        *,
        plan_timeout: float = 120.0,
        poll_interval: float = 0.5,
        **kwargs: Any,
    ) -> MarketJob:
        """An existing job whose client key is ``identity`` (e.g. resumed from a checkpoint)."""
        job = wait_for_plan(client, job_id, timeout=plan_timeout, poll_interval=poll_interval)
        if job.client_key and job.client_key != identity.public_key.hex():
            raise JobPlanError(f"job {job_id} was created with another client key; open it with that identity")
        platform = client.platform.get()
        platform_key = platform.public_key_bytes
        plan = JobPlan.from_tickets(
            client.jobs.tickets(job_id), platform_key=platform_key, job_id=job_id, client_key=identity.public_key.hex()
        )
        # Uploads are split by what this marketplace takes per request, as it serves it.
        kwargs.setdefault("upload_limit", platform.receipts_per_upload)
        return cls(client, job, plan, identity, platform_key=platform_key, **kwargs)

    async def find_route(self, start: int, end: int, avoid: frozenset[str] = frozenset()) -> list[RouteHop]:
        """The planned route, with tickets renewed first when they are about to expire."""
        if self.tickets_expiring():
            await asyncio.to_thread(self.renew_tickets)
        try:
            return await super().find_route(start, end, avoid)
        except PlanExhaustedError as e:
            primary = e.candidates[0]
            if not self.auto_replan or primary.provider_id is None:
                raise
            await asyncio.to_thread(self.replan, primary.provider_id)
        return await super().find_route(start, end, avoid)

    def replan(self, failed_provider: int) -> None:
        """Ask the scheduler to replace ``failed_provider`` (a primary) and switch to the new
        plan's tickets; :class:`JobPlanError` when nobody else serves its blocks."""
        logger.warning(
            f"job {self.job_id}: no planned provider left for the blocks of provider {failed_provider}; "
            f"asking for a new plan"
        )
        try:
            self.client.jobs.replan(self.job_id, provider=failed_provider)
        except ConflictError as e:
            raise JobPlanError(f"job {self.job_id} cannot be re-planned: {e}") from e
        self.plan = JobPlan.from_tickets(
            self.client.jobs.tickets(self.job_id),
            platform_key=self.platform_key,
            job_id=self.job_id,
            client_key=self.identity.public_key.hex(),
        )

    def tickets_expiring(self, now: float | None = None) -> bool:
        soonest = min(p.ticket.expires_at for p in self.plan.providers())
        return soonest - (time.time() if now is None else now) < RENEW_MARGIN_S

    def renew_tickets(self) -> None:
        """New tickets (new ids, a later expiry) for the job's current plan. Open sessions
        keep the tickets they were opened with; new sessions and requests use the new ones."""
        entries = self.client.jobs.renew_tickets(self.job_id)
        self.plan = JobPlan.from_tickets(
            entries, platform_key=self.platform_key, job_id=self.job_id, client_key=self.identity.public_key.hex()
        )
        logger.info(f"renewed the {len(entries)} tickets of job {self.job_id}")

    def attach(self, model: DistributedModelForCausalLM) -> None:
        for provider in self.plan.providers():
            if provider.ticket.model_id != model.info.model_id:
                raise JobPlanError(
                    f"job {self.job_id} is for model {provider.ticket.model_id}, not {model.info.model_id}"
                )
        super().attach(model)
        if self.job.state == "planned":
            try:
                self.job = self.client.jobs.transition(self.job_id, to_state="running", reason="client started")
            except ConflictError:
                pass  # someone (another process of ours, the scheduler) moved it already

    def _upload(self, receipts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            {"status": r.status, "code": r.code, "message": r.message}
            for r in self.client.receipts.upload(receipts, batch_size=self.collector.upload_limit)
        ]

    def _dispute(self, receipt: dict[str, Any], code: str, message: str) -> Any:
        return self.client.receipts.dispute(self.job_id, receipt, code=code, message=message)

    def _file(self, mismatch: Mismatch | Equivocation) -> Any:
        if isinstance(mismatch, Equivocation):
            if mismatch.ticket is None:
                raise JobPlanError(f"no ticket of job {self.job_id} names {mismatch.peer_id}: nothing to audit")
            return self.client.audits.create_equivocation(
                job=self.job_id,
                ticket_id=mismatch.ticket.ticket_id,
                records=[r.to_dict() for r in (mismatch.returned, mismatch.pushed)],
            )
        if mismatch.ticket is None:
            raise JobPlanError(f"no ticket of job {self.job_id} names {mismatch.peer_id}: nothing to audit")
        evidence = self.collector.evidence(mismatch.ticket, mismatch.session_id, mismatch.claimed)
        deposit = 0
        if evidence is None:
            # Without proof the provider signed for the output, the audit puts credits at stake.
            deposit = self.client.platform.get().audit_deposit
            logger.warning(
                f"no receipt of {mismatch.peer_id} covers the disputed output; auditing without evidence "
                f"on a deposit of {deposit} micro-credits"
            )
        return self.client.audits.create(
            job=self.job_id,
            ticket_id=mismatch.ticket.ticket_id,
            session_id=mismatch.session_id,
            start=mismatch.start,
            end=mismatch.end,
            dtype=mismatch.dtype,
            reference_peer=mismatch.reference_peer,
            inputs=encode_tensor(mismatch.inputs),
            claimed=encode_tensor(mismatch.claimed),
            reference=encode_tensor(mismatch.reference),
            evidence=evidence,
            deposit=deposit,
        )

    def __enter__(self) -> MarketJob:
        return self

    def __exit__(self, *exc: object) -> None:
        """Finish the job even after an error: the work done so far is paid and the rest of the
        hold comes back once it is settled."""
        if self.job.state not in _DEAD_STATES:
            self.finish()

    def finish(self) -> dict[str, Any]:
        """Upload the remaining receipts, move the job to settling, and return the summary."""
        self.detach()
        try:
            self.collector.close()
        finally:
            try:
                self.job = self.client.jobs.finish(self.job_id).job
            except APIError as e:
                logger.warning(f"could not finish job {self.job_id}: {e}")
                raise
        return {**self.summary(), "state": self.job.state}


def _why(client: Client, job_id: int) -> str:
    """``: <reason>`` of the job's last transition (what the scheduler said), or nothing."""
    try:
        transitions = client.jobs.transitions(job_id)
    except APIError:
        return ""  # the state alone still says what happened
    reason = transitions[-1].reason if transitions else ""
    return f": {reason}" if reason else ""


def wait_for_plan(client: Client, job_id: int, *, timeout: float = 120.0, poll_interval: float = 0.5) -> Job:
    """Poll the job until the scheduler planned it; :class:`JobPlanError` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.jobs.get(job_id)
        if job.state in _PLANNED_STATES:
            return job
        if job.state in _DEAD_STATES:
            raise JobPlanError(f"job {job_id} is {job.state}; it will not be planned{_why(client, job_id)}")
        if time.monotonic() >= deadline:
            raise JobPlanError(
                f"job {job_id} has no plan after {timeout:.0f} s (state {job.state}): no online "
                f"providers may cover its model within its max_price, or the scheduler is not "
                f"running; see `hivemart jobs show {job_id}`"
            )
        time.sleep(poll_interval)

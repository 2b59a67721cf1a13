"""What the marketplace API returns, as typed dataclasses.

Each class is built from the API's JSON by ``from_json``, which reads the fields it knows and
ignores the rest, so that a newer server with more fields does not break an older client.
Money is integer micro-credits; prices are micro-credits per million work units; times are
timezone-aware datetimes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

from hivemart_core.errors import HivemartError
from hivemart_core.protocol.receipts import MAX_RECEIPTS_PER_UPLOAD

__all__ = [
    "User",
    "ApiKey",
    "CreatedApiKey",
    "SignupResult",
    "CatalogModel",
    "Measurement",
    "Provider",
    "MarketProvider",
    "Uptime",
    "Offer",
    "Challenge",
    "HoldSummary",
    "Job",
    "JobCost",
    "JobTransition",
    "PlanBackup",
    "PlanSegment",
    "Plan",
    "Account",
    "Posting",
    "Hold",
    "TransactionLeg",
    "Transaction",
    "Page",
    "PlatformInfo",
    "JobTicketEntry",
    "ReceiptResult",
    "StoredReceipt",
    "Settlement",
    "FinishResult",
    "Audit",
    "Offence",
    "Dispute",
    "TopUp",
    "PayoutRequest",
]

T = TypeVar("T")


def _dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _at(value: str) -> datetime:
    """A timestamp the API always sends (the field is not nullable in its schema)."""
    return datetime.fromisoformat(value)


@dataclass(frozen=True)
class User:
    id: int
    username: str
    email: str
    is_staff: bool
    wallet_balance: int

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> User:
        return cls(
            id=d["id"],
            username=d["username"],
            email=d.get("email", ""),
            is_staff=d["is_staff"],
            wallet_balance=d["wallet_balance"],
        )


@dataclass(frozen=True)
class ApiKey:
    id: int
    name: str
    prefix: str
    username: str
    active: bool
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None

    @classmethod
    def _fields(cls, d: dict[str, Any]) -> dict[str, Any]:
        return dict(
            id=d["id"],
            name=d["name"],
            prefix=d["prefix"],
            username=d["username"],
            active=d["active"],
            created_at=_at(d["created_at"]),
            last_used_at=_dt(d.get("last_used_at")),
            revoked_at=_dt(d.get("revoked_at")),
        )

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ApiKey:
        return cls(**cls._fields(d))


@dataclass(frozen=True)
class CreatedApiKey(ApiKey):
    """A key just created: ``key`` is the secret, returned this once."""

    key: str = field(default="", repr=False)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CreatedApiKey:
        return cls(**cls._fields(d), key=d["key"])


@dataclass(frozen=True)
class SignupResult:
    user: User
    api_key: CreatedApiKey

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SignupResult:
        return cls(user=User.from_json(d["user"]), api_key=CreatedApiKey.from_json(d["api_key"]))


@dataclass(frozen=True)
class CatalogModel:
    model_id: str
    name: str
    arch: str
    num_blocks: int
    hidden_size: int
    dtype: str
    weights_digest: str
    client_digest: str
    block_digests: list[str]
    active: bool
    created_at: datetime

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CatalogModel:
        return cls(
            model_id=d["model_id"],
            name=d.get("name", ""),
            arch=d["arch"],
            num_blocks=d["num_blocks"],
            hidden_size=d["hidden_size"],
            dtype=d["dtype"],
            weights_digest=d["weights_digest"],
            client_digest=d.get("client_digest", ""),
            block_digests=list(d.get("block_digests", [])),
            active=d["active"],
            created_at=_at(d["created_at"]),
        )


@dataclass(frozen=True)
class Measurement:
    """Figures the scheduler measured (not self-reported)."""

    id: int
    throughput: float  # work units per second
    latency_ms: float
    success_rate: float  # 0..1
    samples: int
    measured_at: datetime

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Measurement:
        return cls(
            id=d["id"],
            throughput=d["throughput"],
            latency_ms=d["latency_ms"],
            success_rate=d["success_rate"],
            samples=d["samples"],
            measured_at=_at(d["measured_at"]),
        )


@dataclass(frozen=True)
class Provider:
    id: int
    peer_id: str
    public_key: str  # hex
    name: str
    gpu: str
    gpu_memory_mb: int
    region: str
    model: str  # model_id
    block_start: int
    block_end: int  # exclusive
    price: int  # micro-credits per million work units
    state: str  # joining, online, draining, offline
    last_heartbeat_at: datetime | None
    reported_throughput: float | None
    reported_latency_ms: float | None
    measurement: Measurement | None  # when present, it is what counts
    suspended: bool
    suspension_reason: str
    earnings_account: int
    registered_at: datetime
    reputation: int = 100  # 0..100, falls with every offence (failed audit, wrong probe answer)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Provider:
        return cls(
            id=d["id"],
            peer_id=d["peer_id"],
            public_key=d["public_key"],
            name=d.get("name", ""),
            gpu=d.get("gpu", ""),
            gpu_memory_mb=d.get("gpu_memory_mb", 0),
            region=d.get("region", ""),
            model=d["model"],
            block_start=d["block_start"],
            block_end=d["block_end"],
            price=d["price"],
            state=d["state"],
            last_heartbeat_at=_dt(d.get("last_heartbeat_at")),
            reported_throughput=d.get("reported_throughput"),
            reported_latency_ms=d.get("reported_latency_ms"),
            measurement=Measurement.from_json(d["measurement"]) if d.get("measurement") else None,
            suspended=d.get("suspended", False),
            suspension_reason=d.get("suspension_reason", ""),
            earnings_account=d["earnings_account"],
            registered_at=_at(d["registered_at"]),
            reputation=d.get("reputation", 100),
        )


@dataclass(frozen=True)
class Uptime:
    """Share of ``observed_s`` a provider spent online; ``observed_s`` is ``window_s``, or less
    for a provider younger than the window. ``text`` states both ("97.0% over the last 24 h")."""

    fraction: float | None
    observed_s: float
    window_s: float
    text: str

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Uptime:
        return cls(fraction=d.get("fraction"), observed_s=d["observed_s"], window_s=d["window_s"], text=d["text"])


@dataclass(frozen=True)
class MarketProvider:
    """Any provider in the market, as anyone may see it (``GET /api/market/providers/``): no
    owner, key or account. ``mine`` is True for the caller's own (``providers.get`` has more)."""

    id: int
    peer_id: str
    name: str
    gpu: str
    gpu_memory_mb: int
    region: str
    model: str
    block_start: int
    block_end: int  # exclusive
    price: int  # micro-credits per million work units
    price_per_million_tokens: int  # micro-credits per million tokens through the whole span
    state: str
    suspended: bool
    reputation: int
    throughput: float | None  # work units (tokens through one block) per second
    latency_ms: float | None
    success_rate: float | None
    measured: bool  # figures from the marketplace's probes, not self-reported
    measured_at: datetime | None
    uptime: Uptime
    last_heartbeat_at: datetime | None
    registered_at: datetime
    mine: bool

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MarketProvider:
        return cls(
            id=d["id"],
            peer_id=d["peer_id"],
            name=d.get("name", ""),
            gpu=d.get("gpu", ""),
            gpu_memory_mb=d.get("gpu_memory_mb", 0),
            region=d.get("region", ""),
            model=d["model"],
            block_start=d["block_start"],
            block_end=d["block_end"],
            price=d["price"],
            price_per_million_tokens=d["price_per_million_tokens"],
            state=d["state"],
            suspended=d.get("suspended", False),
            reputation=d.get("reputation", 100),
            throughput=d.get("throughput"),
            latency_ms=d.get("latency_ms"),
            success_rate=d.get("success_rate"),
            measured=d.get("measured", False),
            measured_at=_dt(d.get("measured_at")),
            uptime=Uptime.from_json(d["uptime"]),
            last_heartbeat_at=_dt(d.get("last_heartbeat_at")),
            registered_at=_at(d["registered_at"]),
            mine=d.get("mine", False),
        )


@dataclass(frozen=True)
class Offer:
    """A provider's offer; figures are measured when ``measured``, else self-reported."""

    provider_id: int
    peer_id: str
    model_id: str
    block_start: int
    block_end: int
    price: int
    throughput: float | None
    latency_ms: float | None
    success_rate: float | None
    measured: bool
    measured_at: datetime | None
    region: str
    state: str
    last_heartbeat_at: datetime | None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Offer:
        return cls(
            provider_id=d["provider_id"],
            peer_id=d["peer_id"],
            model_id=d["model_id"],
            block_start=d["block_start"],
            block_end=d["block_end"],
            price=d["price"],
            throughput=d.get("throughput"),
            latency_ms=d.get("latency_ms"),
            success_rate=d.get("success_rate"),
            measured=d["measured"],
            measured_at=_dt(d.get("measured_at")),
            region=d.get("region", ""),
            state=d["state"],
            last_heartbeat_at=_dt(d.get("last_heartbeat_at")),
        )


@dataclass(frozen=True)
class Challenge:
    """A registration challenge. Sign :meth:`message` with the provider's Ed25519 key."""

    challenge: str  # 64 hex characters
    expires_at: datetime
    message_prefix: str

    def message(self) -> bytes:
        """The exact bytes to sign: the ASCII prefix, then the 32 raw challenge bytes."""
        return self.message_prefix.encode("ascii") + bytes.fromhex(self.challenge)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Challenge:
        return cls(challenge=d["challenge"], expires_at=_at(d["expires_at"]), message_prefix=d["message_prefix"])


@dataclass(frozen=True)
class HoldSummary:
    id: int
    amount: int
    left: int
    state: str

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> HoldSummary:
        return cls(id=d["id"], amount=d["amount"], left=d["left"], state=d["state"])


@dataclass(frozen=True)
class JobCost:
    """Where a job's hold is, in micro-credits: the marketplace's one computation, which its
    web pages show too. ``held + spent + refunded + forfeited`` is what was placed."""

    held: int
    spent: int
    refunded: int
    forfeited: int = 0

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> JobCost:
        return cls(held=d["held"], spent=d["spent"], refunded=d["refunded"], forfeited=d.get("forfeited", 0))


@dataclass(frozen=True)
class Job:
    id: int
    kind: str  # inference or finetune
    model: str
    state: str  # pending, planned, running, settling, done, failed, cancelled
    budget: int
    max_price: int
    min_throughput: float | None
    idempotency_key: str
    hold: HoldSummary | None
    created_at: datetime
    updated_at: datetime
    client_key: str = ""  # hex Ed25519 public key that countersigns receipts; empty when none
    cost: JobCost | None = None  # None for a job without a hold (or from an older marketplace)
    failure_reason: str = ""  # why the job failed (the scheduler's reason); empty unless it did

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Job:
        return cls(
            id=d["id"],
            kind=d["kind"],
            model=d["model"],
            state=d["state"],
            budget=d["budget"],
            max_price=d["max_price"],
            min_throughput=d.get("min_throughput"),
            idempotency_key=d["idempotency_key"],
            hold=HoldSummary.from_json(d["hold"]) if d.get("hold") else None,
            created_at=_at(d["created_at"]),
            updated_at=_at(d["updated_at"]),
            client_key=d.get("client_key", ""),
            cost=JobCost.from_json(d["cost"]) if d.get("cost") else None,
            failure_reason=d.get("failure_reason") or "",
        )


@dataclass(frozen=True)
class JobTransition:
    id: int
    from_state: str
    to_state: str
    reason: str
    actor: str | None
    at: datetime

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> JobTransition:
        return cls(
            id=d["id"],
            from_state=d["from_state"],
            to_state=d["to_state"],
            reason=d.get("reason", ""),
            actor=d.get("actor"),
            at=_at(d["at"]),
        )


@dataclass(frozen=True)
class PlanBackup:
    rank: int
    provider: int
    peer_id: str
    price: int

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PlanBackup:
        return cls(rank=d["rank"], provider=d["provider"], peer_id=d["peer_id"], price=d["price"])


@dataclass(frozen=True)
class PlanSegment:
    index: int
    block_start: int
    block_end: int
    provider: int
    peer_id: str
    price: int
    backups: list[PlanBackup]

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PlanSegment:
        return cls(
            index=d["index"],
            block_start=d["block_start"],
            block_end=d["block_end"],
            provider=d["provider"],
            peer_id=d["peer_id"],
            price=d["price"],
            backups=[PlanBackup.from_json(b) for b in d["backups"]],
        )


@dataclass(frozen=True)
class Plan:
    job: int
    version: int
    reason: str
    created_at: datetime
    segments: list[PlanSegment]

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Plan:
        return cls(
            job=d["job"],
            version=d["version"],
            reason=d.get("reason", ""),
            created_at=_at(d["created_at"]),
            segments=[PlanSegment.from_json(s) for s in d["segments"]],
        )


@dataclass(frozen=True)
class Account:
    id: int
    kind: str  # wallet, earnings, escrow (staff also see fees, external)
    label: str
    balance: int
    created_at: datetime

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Account:
        return cls(
            id=d["id"], kind=d["kind"], label=d.get("label", ""), balance=d["balance"], created_at=_at(d["created_at"])
        )


@dataclass(frozen=True)
class Posting:
    id: int
    transaction: str
    kind: str  # grant, hold, capture, release, payout
    account: int
    account_kind: str
    amount: int  # positive: credited to the account; negative: debited
    memo: str
    created_at: datetime

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Posting:
        return cls(
            id=d["id"],
            transaction=d["transaction"],
            kind=d["kind"],
            account=d["account"],
            account_kind=d["account_kind"],
            amount=d["amount"],
            memo=d.get("memo", ""),
            created_at=_at(d["created_at"]),
        )


@dataclass(frozen=True)
class Hold:
    id: int
    state: str
    amount: int
    left: int
    payer: int
    escrow: int
    memo: str
    created_at: datetime
    closed_at: datetime | None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Hold:
        return cls(
            id=d["id"],
            state=d["state"],
            amount=d["amount"],
            left=d["left"],
            payer=d["payer"],
            escrow=d["escrow"],
            memo=d.get("memo", ""),
            created_at=_at(d["created_at"]),
            closed_at=_dt(d.get("closed_at")),
        )


@dataclass(frozen=True)
class TransactionLeg:
    account: int
    amount: int


@dataclass(frozen=True)
class Transaction:
    id: str
    kind: str
    idempotency_key: str | None
    memo: str
    created_at: datetime
    postings: list[TransactionLeg]

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Transaction:
        return cls(
            id=d["id"],
            kind=d["kind"],
            idempotency_key=d.get("idempotency_key"),
            memo=d.get("memo", ""),
            created_at=_at(d["created_at"]),
            postings=[TransactionLeg(account=p["account"], amount=p["amount"]) for p in d["postings"]],
        )


@dataclass(frozen=True)
class PlatformInfo:
    """The marketplace's platform key (signs job tickets), its fee, and its limits.

    ``receipts_per_upload`` is the most receipts one upload may carry on this marketplace
    (``limits.receipts_per_upload``); a marketplace too old to serve it takes the shared
    default, ``hivemart_core.protocol.receipts.MAX_RECEIPTS_PER_UPLOAD``."""

    public_key: str  # hex Ed25519
    peer_id: str
    fee_bps: int
    audit_deposit: int = 0  # micro-credits an audit without evidence must put down
    receipts_per_upload: int = MAX_RECEIPTS_PER_UPLOAD

    @property
    def public_key_bytes(self) -> bytes:
        return bytes.fromhex(self.public_key)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PlatformInfo:
        return cls(
            public_key=d["public_key"],
            peer_id=d["peer_id"],
            fee_bps=d["fee_bps"],
            audit_deposit=d.get("audit_deposit", 0),
            receipts_per_upload=_served_limit(d, "receipts_per_upload", MAX_RECEIPTS_PER_UPLOAD),
        )


def _served_limit(d: dict[str, Any], name: str, default: int) -> int:
    """``d["limits"][name]``: a positive integer, ``default`` when the server serves no limits
    (an older marketplace); a malformed value is the server's error, not a reason to guess."""
    limits = d.get("limits")
    if limits is None:
        return default
    if not isinstance(limits, dict):
        raise HivemartError(f"the marketplace answered malformed limits: {limits!r}")
    if name not in limits:
        return default
    value = limits[name]
    if type(value) is not int or value < 1:
        raise HivemartError(f"the marketplace answered a malformed limit {name}: {value!r}")
    return value


@dataclass(frozen=True)
class JobTicketEntry:
    """One ticket of a job's current plan: who (``provider_peer``) may bill which blocks, as
    ``primary`` or ``backup`` (``rank``) of plan segment ``segment``. ``ticket`` is the signed
    dict to attach to requests (``hivemart_core.protocol.tickets.JobTicket.from_dict``)."""

    segment: int
    role: str
    rank: int
    provider: int
    provider_peer: str
    start: int
    end: int
    ticket: dict[str, Any]

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> JobTicketEntry:
        return cls(
            segment=d["segment"],
            role=d["role"],
            rank=d["rank"],
            provider=d["provider"],
            provider_peer=d["provider_peer"],
            start=d["start"],
            end=d["end"],
            ticket=dict(d["ticket"]),
        )


@dataclass(frozen=True)
class ReceiptResult:
    """What the marketplace did with one uploaded receipt: ``accepted``, ``stale`` (not newer
    than the stored one) or ``rejected`` (``code`` says why)."""

    status: str
    code: str
    message: str
    ticket_id: str
    session_id: str
    seq: int

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ReceiptResult:
        return cls(
            status=d["status"],
            code=d.get("code", ""),
            message=d.get("message", ""),
            ticket_id=d.get("ticket_id", ""),
            session_id=d.get("session_id", ""),
            seq=d.get("seq", 0),
        )


@dataclass(frozen=True)
class StoredReceipt:
    """The newest receipt the marketplace holds for one (ticket, session)."""

    id: int
    ticket_id: str
    job: int
    provider: int
    provider_peer: str
    session_id: str
    seq: int
    units: int
    steps: int
    chain: str
    settled_units: int
    countersigned: bool
    voided: bool
    updated_at: datetime

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StoredReceipt:
        return cls(
            id=d["id"],
            ticket_id=d["ticket_id"],
            job=d["job"],
            provider=d["provider"],
            provider_peer=d["provider_peer"],
            session_id=d["session_id"],
            seq=d["seq"],
            units=d["units"],
            steps=d["steps"],
            chain=d["chain"],
            settled_units=d["settled_units"],
            countersigned=d["countersigned"],
            voided=d["voided"],
            updated_at=_at(d["updated_at"]),
        )


@dataclass(frozen=True)
class Settlement:
    """One settlement payment: ``amount`` captured from the job's hold for ``units`` work units
    (the provider receives it minus the platform fee); ``shortfall`` was owed beyond the hold."""

    id: int
    job: int
    provider: int
    units: int
    amount: int
    shortfall: int
    transaction: str | None
    created_at: datetime

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Settlement:
        return cls(
            id=d["id"],
            job=d["job"],
            provider=d["provider"],
            units=d["units"],
            amount=d["amount"],
            shortfall=d["shortfall"],
            transaction=d.get("transaction"),
            created_at=_at(d["created_at"]),
        )


@dataclass(frozen=True)
class FinishResult:
    job: Job
    results: list[ReceiptResult]

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FinishResult:
        return cls(job=Job.from_json(d["job"]), results=[ReceiptResult.from_json(r) for r in d["results"]])


@dataclass(frozen=True)
class Audit:
    """A reported output mismatch and its verdict (``provider_cheated``, ``reporter_wrong``,
    ``backup_cheated``, ``inconclusive``; empty while ``open``)."""

    id: int
    job: int
    ticket_id: str
    session_id: str
    provider: int
    reference_provider: int | None
    start: int
    end: int
    dtype: str
    state: str
    verdict: str
    detail: str
    created_at: datetime
    decided_at: datetime | None
    claimed_proven: bool = False  # the claimed output was proven signed for (audit evidence)
    deposit: int = 0  # micro-credits put down without evidence
    deposit_state: str = "none"  # none, held (until the verdict), returned, forfeited

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Audit:
        return cls(
            id=d["id"],
            job=d["job"],
            ticket_id=d["ticket_id"],
            session_id=d["session_id"],
            provider=d["provider"],
            reference_provider=d.get("reference_provider"),
            start=d["start"],
            end=d["end"],
            dtype=d["dtype"],
            state=d["state"],
            verdict=d.get("verdict", ""),
            detail=d.get("detail", ""),
            created_at=_at(d["created_at"]),
            decided_at=_dt(d.get("decided_at")),
            claimed_proven=d.get("claimed_proven", False),
            deposit=d.get("deposit", 0),
            deposit_state=d.get("deposit_state", "none"),
        )


@dataclass(frozen=True)
class Dispute:
    """A receipt the client refused to countersign, reported to the marketplace (``code``: the
    check it failed). While open, the ticket's provider is paid only for countersigned work."""

    id: int
    job: int
    ticket_id: str
    provider: int
    session_id: str
    seq: int
    units: int
    code: str
    state: str
    verdict: str
    created_at: datetime

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Dispute:
        return cls(
            id=d["id"],
            job=d["job"],
            ticket_id=d["ticket_id"],
            provider=d["provider"],
            session_id=d["session_id"],
            seq=d["seq"],
            units=d["units"],
            code=d["code"],
            state=d["state"],
            verdict=d.get("verdict", ""),
            created_at=_at(d["created_at"]),
        )


@dataclass(frozen=True)
class Offence:
    """Something a provider was found doing: ``audit`` (failed an audit) or ``probe`` (answered
    a probe wrongly). Each lowers its reputation; enough of them suspend it."""

    id: int
    provider: int
    kind: str
    job: int | None
    audit: int | None
    detail: str
    at: datetime

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Offence:
        return cls(
            id=d["id"],
            provider=d["provider"],
            kind=d["kind"],
            job=d.get("job"),
            audit=d.get("audit"),
            detail=d.get("detail", ""),
            at=_at(d["at"]),
        )


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a list: ``items``, the total ``count``, and whether another page follows."""

    items: list[T]
    count: int
    page: int
    has_next: bool

    def __iter__(self) -> Iterator[T]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    @classmethod
    def from_json(cls, d: dict[str, Any], parse: Callable[[dict[str, Any]], T], page: int) -> Page[T]:
        return cls(
            items=[parse(item) for item in d["results"]],
            count=d["count"],
            page=page,
            has_next=d.get("next") is not None,
        )


@dataclass(frozen=True)
class TopUp:
    """Credits being bought: pay at ``checkout_url``; the wallet is credited when the payment
    provider reports the payment (``state`` becomes ``paid``)."""

    id: int
    state: str  # pending, paid, expired
    provider: str  # stripe, test
    credits: int  # micro-credits bought
    amount_minor: int  # the price, in the currency's smallest unit
    currency: str
    checkout_url: str
    created_at: datetime
    paid_at: datetime | None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TopUp:
        return cls(
            id=d["id"],
            state=d["state"],
            provider=d["provider"],
            credits=d["credits"],
            amount_minor=d["amount_minor"],
            currency=d["currency"],
            checkout_url=d.get("checkout_url", ""),
            created_at=_at(d["created_at"]),
            paid_at=_dt(d.get("paid_at")),
        )


@dataclass(frozen=True)
class PayoutRequest:
    """A request to pay out a provider's earnings: ``requested`` (held), ``approved`` (paid out of
    the platform), ``paid`` (sent; ``note`` is the reference) or ``rejected`` (returned)."""

    id: int
    state: str
    provider: int
    amount: int  # micro-credits
    memo: str
    note: str
    created_at: datetime
    decided_at: datetime | None
    paid_at: datetime | None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PayoutRequest:
        return cls(
            id=d["id"],
            state=d["state"],
            provider=d["provider"],
            amount=d["amount"],
            memo=d.get("memo", ""),
            note=d.get("note", ""),
            created_at=_at(d["created_at"]),
            decided_at=_dt(d.get("decided_at")),
            paid_at=_dt(d.get("paid_at")),
        )

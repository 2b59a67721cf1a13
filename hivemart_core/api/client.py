"""``Client``: the typed REST client for the Hivemart marketplace, one resource per area."""

from __future__ import annotations

import base64
import builtins
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any, Protocol, Required, TypedDict, TypeVar

import httpx

from hivemart_core.api._client import DEFAULT_BASE_URL, HTTPCore, env_api_key, new_idempotency_key
from hivemart_core.api.types import (
    Account,
    ApiKey,
    Audit,
    CatalogModel,
    Challenge,
    CreatedApiKey,
    Dispute,
    FinishResult,
    Hold,
    Job,
    JobTicketEntry,
    JobTransition,
    MarketProvider,
    Measurement,
    Offence,
    Offer,
    Page,
    PayoutRequest,
    Plan,
    PlatformInfo,
    Posting,
    Provider,
    ReceiptResult,
    Settlement,
    SignupResult,
    StoredReceipt,
    TopUp,
    Transaction,
    User,
)
from hivemart_core.errors import ProtocolError
from hivemart_core.protocol.receipts import MAX_RECEIPTS_PER_UPLOAD

__all__ = ["Client", "Signer", "SegmentPlan"]

T = TypeVar("T")


class Signer(Protocol):
    """What provider registration needs from an identity (``hivemart_core.protocol.identity.Identity`` is one)."""

    peer_id: str
    public_key: bytes

    def sign(self, message: bytes) -> bytes: ...


# The marketplace takes at most this many receipts per upload (unless its platform info serves
# another ``receipts_per_upload``); longer lists are sent in batches.
RECEIPT_BATCH = MAX_RECEIPTS_PER_UPLOAD


def _receipt_dict(receipt: Any) -> dict[str, Any]:
    """A receipt as JSON: a ``WorkReceipt`` (anything with ``to_dict``) or a dict already."""
    return receipt.to_dict() if hasattr(receipt, "to_dict") else dict(receipt)


class _Resource:
    def __init__(self, core: HTTPCore) -> None:
        self._core = core

    def _page(
        self, path: str, parse: Callable[[dict[str, Any]], T], page: int, page_size: int | None, **params: Any
    ) -> Page[T]:
        body = self._core.request("GET", path, params={"page": page, "page_size": page_size, **params})
        return Page.from_json(body, parse, page)

    def _iter(self, path: str, parse: Callable[[dict[str, Any]], T], page_size: int, **params: Any) -> Iterator[T]:
        page = 1
        while True:
            current = self._page(path, parse, page, page_size, **params)
            yield from current.items
            if not current.has_next:
                return
            page += 1


class Accounts(_Resource):
    def signup(self, *, username: str, password: str, email: str = "") -> SignupResult:
        """Create an account (when the marketplace allows sign-up); returns the user and a first API key."""
        body = self._core.request(
            "POST", "/api/auth/signup/", auth=False, json={"username": username, "password": password, "email": email}
        )
        return SignupResult.from_json(body)

    def me(self) -> User:
        return User.from_json(self._core.request("GET", "/api/me/"))


class Keys(_Resource):
    def list(self, *, page: int = 1, page_size: int | None = None) -> Page[ApiKey]:
        return self._page("/api/keys/", ApiKey.from_json, page, page_size)

    def iter(self, *, page_size: int = 100) -> Iterator[ApiKey]:
        return self._iter("/api/keys/", ApiKey.from_json, page_size)

    def get(self, key_id: int) -> ApiKey:
        return ApiKey.from_json(self._core.request("GET", f"/api/keys/{int(key_id)}/"))

    def create(self, *, name: str = "") -> CreatedApiKey:
        """A new API key; ``.key`` holds the secret, which the marketplace will not show again."""
        return CreatedApiKey.from_json(self._core.request("POST", "/api/keys/", json={"name": name}))

    def revoke(self, key_id: int) -> ApiKey:
        return ApiKey.from_json(self._core.request("DELETE", f"/api/keys/{int(key_id)}/"))


class Models(_Resource):
    def list(
        self, *, include_inactive: bool = False, page: int = 1, page_size: int | None = None
    ) -> Page[CatalogModel]:
        return self._page(
            "/api/models/",
            CatalogModel.from_json,
            page,
            page_size,
            include_inactive="true" if include_inactive else None,
        )

    def iter(self, *, page_size: int = 100) -> Iterator[CatalogModel]:
        return self._iter("/api/models/", CatalogModel.from_json, page_size)

    def get(self, model_id: str) -> CatalogModel:
        return CatalogModel.from_json(self._core.request("GET", f"/api/models/{model_id}/"))

    def create(
        self,
        *,
        model_id: str,
        arch: str,
        num_blocks: int,
        hidden_size: int,
        dtype: str,
        weights_digest: str,
        block_digests: Sequence[str],
        client_digest: str = "",
        name: str = "",
    ) -> CatalogModel:
        """Staff: add a model to the catalog (digests as ``hivemart_core.models`` computes them)."""
        body = {
            "model_id": model_id,
            "arch": arch,
            "num_blocks": num_blocks,
            "hidden_size": hidden_size,
            "dtype": dtype,
            "weights_digest": weights_digest,
            "block_digests": list(block_digests),
            "client_digest": client_digest,
            "name": name,
        }
        return CatalogModel.from_json(self._core.request("POST", "/api/models/", json=body))

    def set_active(self, model_id: str, active: bool) -> CatalogModel:
        """Staff: withdraw a model (``active=False``) or return it to the marketplace."""
        return CatalogModel.from_json(self._core.request("PATCH", f"/api/models/{model_id}/", json={"active": active}))

    def offers(self, model_id: str) -> builtins.list[Offer]:
        """Offers of online providers for the model, by span then price."""
        return [Offer.from_json(o) for o in self._core.request("GET", f"/api/models/{model_id}/offers/")]

    def placement(self, model_id: str, blocks: int) -> tuple[int, int]:
        """The blocks ``[start, end)`` a provider able to hold ``blocks`` blocks of the model
        should serve: where the swarm's measured throughput is weakest."""
        answer = self._core.request("GET", "/api/placement/", params={"model": model_id, "blocks": blocks})
        start, end = answer.get("block_start"), answer.get("block_end")
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end):
            raise ProtocolError(f"the marketplace answered a malformed placement: {answer!r}")
        return start, end


class Providers(_Resource):
    def challenge(self) -> Challenge:
        return Challenge.from_json(self._core.request("POST", "/api/providers/challenge/"))

    def register(
        self,
        *,
        identity: Signer,
        model: str,
        block_start: int,
        block_end: int,
        price: int,
        name: str = "",
        gpu: str = "",
        gpu_memory_mb: int = 0,
        region: str = "",
    ) -> Provider:
        """Register (or re-register) the provider ``identity``: asks for a challenge, signs it
        with the identity's key, and submits the offer (blocks ``[block_start, block_end)`` of
        ``model`` at ``price`` micro-credits per million work units)."""
        challenge = self.challenge()
        body = {
            "peer_id": identity.peer_id,
            "public_key": identity.public_key.hex(),
            "challenge": challenge.challenge,
            "signature": identity.sign(challenge.message()).hex(),
            "model": model,
            "block_start": block_start,
            "block_end": block_end,
            "price": price,
            "name": name,
            "gpu": gpu,
            "gpu_memory_mb": gpu_memory_mb,
            "region": region,
        }
        return Provider.from_json(self._core.request("POST", "/api/providers/", json=body))

    def list(self, *, page: int = 1, page_size: int | None = None) -> Page[Provider]:
        return self._page("/api/providers/", Provider.from_json, page, page_size)

    def iter(self, *, page_size: int = 100) -> Iterator[Provider]:
        return self._iter("/api/providers/", Provider.from_json, page_size)

    def get(self, provider_id: int) -> Provider:
        """One of your own providers (staff: any), with its account and self-reported figures."""
        return Provider.from_json(self._core.request("GET", f"/api/providers/{int(provider_id)}/"))

    def market(
        self, *, model: str | None = None, online: bool = False, page: int = 1, page_size: int | None = None
    ) -> Page[MarketProvider]:
        """Every provider in the market, public fields only, online first then by price."""
        return self._page(
            "/api/market/providers/", MarketProvider.from_json, page, page_size, model=model, online=int(online)
        )

    def iter_market(
        self, *, model: str | None = None, online: bool = False, page_size: int = 100
    ) -> Iterator[MarketProvider]:
        return self._iter(
            "/api/market/providers/", MarketProvider.from_json, page_size, model=model, online=int(online)
        )

    def get_public(self, provider_id: int) -> MarketProvider:
        """Any provider's public fields."""
        return MarketProvider.from_json(self._core.request("GET", f"/api/market/providers/{int(provider_id)}/"))

    def update_offer(
        self,
        provider_id: int,
        *,
        model: str | None = None,
        block_start: int | None = None,
        block_end: int | None = None,
        price: int | None = None,
    ) -> Provider:
        body = {
            k: v
            for k, v in dict(model=model, block_start=block_start, block_end=block_end, price=price).items()
            if v is not None
        }
        return Provider.from_json(self._core.request("PATCH", f"/api/providers/{int(provider_id)}/", json=body))

    def heartbeat(
        self, provider_id: int, *, state: str, throughput: float | None = None, latency_ms: float | None = None
    ) -> Provider:
        """Report liveness, ``state`` (joining, online, draining, offline) and self-measured figures."""
        body = {"state": state, "throughput": throughput, "latency_ms": latency_ms}
        return Provider.from_json(
            self._core.request("POST", f"/api/providers/{int(provider_id)}/heartbeat/", json=body)
        )

    def measurements(self, provider_id: int, *, page: int = 1, page_size: int | None = None) -> Page[Measurement]:
        return self._page(f"/api/providers/{int(provider_id)}/measurements/", Measurement.from_json, page, page_size)

    def record_measurement(
        self,
        provider_id: int,
        *,
        throughput: float,
        latency_ms: float,
        success_rate: float,
        samples: int = 1,
        measured_at: datetime | None = None,
    ) -> Measurement:
        """Staff (the scheduler): store figures measured by probing the provider."""
        body = {
            "throughput": throughput,
            "latency_ms": latency_ms,
            "success_rate": success_rate,
            "samples": samples,
            "measured_at": measured_at.isoformat() if measured_at else None,
        }
        if measured_at is None:
            del body["measured_at"]
        return Measurement.from_json(
            self._core.request("POST", f"/api/providers/{int(provider_id)}/measurements/", json=body)
        )

    def suspend(self, provider_id: int, *, reason: str) -> Provider:
        return Provider.from_json(
            self._core.request("POST", f"/api/providers/{int(provider_id)}/suspend/", json={"reason": reason})
        )

    def payout(
        self, provider_id: int, *, amount: int, memo: str = "", idempotency_key: str | None = None
    ) -> PayoutRequest:
        """Ask for ``amount`` micro-credits of the provider's settled earnings to be paid out (your
        provider): held at once, paid when staff approve (``client.payouts``)."""
        key = idempotency_key or new_idempotency_key()
        body = {"provider": int(provider_id), "amount": amount, "memo": memo, "idempotency_key": key}
        return PayoutRequest.from_json(self._core.request("POST", "/api/payouts/", json=body, idempotency_key=key))

    def offences(self, provider_id: int, *, page: int = 1, page_size: int | None = None) -> Page[Offence]:
        """What the provider was found doing (failed audits, wrong probe answers), newest first."""
        return self._page("/api/offences/", Offence.from_json, page, page_size, provider=int(provider_id))

    def reinstate(self, provider_id: int) -> Provider:
        return Provider.from_json(self._core.request("POST", f"/api/providers/{int(provider_id)}/reinstate/"))


class SegmentPlan(TypedDict, total=False):
    """One segment of a plan for :meth:`Jobs.store_plan`."""

    block_start: Required[int]
    block_end: Required[int]  # exclusive
    provider: Required[int]  # the primary's id
    backups: list[int]  # provider ids, best first
    price: int  # defaults to the primary's current price


class Jobs(_Resource):
    def create(
        self,
        *,
        model: str,
        kind: str,
        budget: int,
        max_price: int,
        min_throughput: float | None = None,
        idempotency_key: str | None = None,
        client_key: bytes | str | None = None,
    ) -> Job:
        """Create a job and hold ``budget`` micro-credits for it.

        The request carries an idempotency key (a new random one unless given; the same one on
        every retry), so a retried or repeated call returns the same job instead of a second
        job and a second hold. ``client_key`` (raw bytes or hex) is the Ed25519 public key
        that will countersign this job's work receipts; it is bound into every ticket.
        """
        body = {
            "model": model,
            "kind": kind,
            "budget": budget,
            "max_price": max_price,
            "min_throughput": min_throughput,
        }
        if client_key is not None:
            body["client_key"] = client_key.hex() if isinstance(client_key, bytes) else client_key
        return Job.from_json(self._core.request("POST", "/api/jobs/", json=body, idempotency_key=idempotency_key))

    def get(self, job_id: int) -> Job:
        return Job.from_json(self._core.request("GET", f"/api/jobs/{int(job_id)}/"))

    def list(self, *, state: str | None = None, page: int = 1, page_size: int | None = None) -> Page[Job]:
        return self._page("/api/jobs/", Job.from_json, page, page_size, state=state)

    def iter(self, *, state: str | None = None, page_size: int = 100) -> Iterator[Job]:
        return self._iter("/api/jobs/", Job.from_json, page_size, state=state)

    def cancel(self, job_id: int, *, reason: str = "") -> Job:
        """Cancel the job; what is left of its hold returns to your wallet."""
        return Job.from_json(self._core.request("POST", f"/api/jobs/{int(job_id)}/cancel/", json={"reason": reason}))

    def transition(self, job_id: int, *, to_state: str, reason: str = "") -> Job:
        """Ask for a state change (owners: running, settling, cancelled; staff: any allowed one)."""
        return Job.from_json(
            self._core.request(
                "POST", f"/api/jobs/{int(job_id)}/transitions/", json={"to_state": to_state, "reason": reason}
            )
        )

    def transitions(self, job_id: int) -> builtins.list[JobTransition]:
        return [JobTransition.from_json(t) for t in self._core.request("GET", f"/api/jobs/{int(job_id)}/transitions/")]

    def plan(self, job_id: int) -> Plan:
        """The job's current plan (NotFoundError before the scheduler made one)."""
        return Plan.from_json(self._core.request("GET", f"/api/jobs/{int(job_id)}/plan/"))

    def replan(self, job_id: int, *, provider: int) -> Plan:
        """Report that ``provider`` (a primary of the plan) failed: the scheduler stores a new plan
        whose segments replace it (ConflictError ``no_plan`` when nobody else serves its
        blocks); fetch the new plan's tickets with :meth:`tickets`. Reporting it again is harmless."""
        body = self._core.request("POST", f"/api/jobs/{int(job_id)}/replan/", json={"provider": int(provider)})
        return Plan.from_json(body["plan"])

    def store_plan(self, job_id: int, *, segments: Sequence[SegmentPlan], reason: str = "") -> Plan:
        """Staff (the scheduler): store a plan, segments as ``{"block_start", "block_end",
        "provider", "backups": [provider ids], "price": optional}``."""
        return Plan.from_json(
            self._core.request(
                "POST", f"/api/jobs/{int(job_id)}/plan/", json={"segments": list(segments), "reason": reason}
            )
        )

    def tickets(self, job_id: int) -> builtins.list[JobTicketEntry]:
        """The signed tickets of the job's current plan, one per segment and provider (primaries
        and backups); attach ``entry.ticket`` to the requests sent to ``entry.provider_peer``."""
        return [JobTicketEntry.from_json(t) for t in self._core.request("GET", f"/api/jobs/{int(job_id)}/tickets/")]

    def renew_tickets(self, job_id: int) -> builtins.list[JobTicketEntry]:
        """New tickets (new ids, a later expiry) for the current plan, e.g. before the old ones expire."""
        return [
            JobTicketEntry.from_json(t) for t in self._core.request("POST", f"/api/jobs/{int(job_id)}/tickets/renew/")
        ]

    def finish(self, job_id: int, *, receipts: Iterable[Any] = ()) -> FinishResult:
        """Upload the last receipts and move the job to settling; settlement pays the providers
        and then closes the job (what is left of the hold returns to your wallet)."""
        batch = [_receipt_dict(r) for r in receipts]
        if len(batch) > RECEIPT_BATCH:
            Receipts(self._core).upload(batch[:-RECEIPT_BATCH])
            batch = batch[-RECEIPT_BATCH:]
        # Finishing twice is harmless (settling -> settling is a no-op), so the POST may be retried.
        return FinishResult.from_json(
            self._core.request("POST", f"/api/jobs/{int(job_id)}/finish/", json={"receipts": batch})
        )


def _tensor_b64(value: Any) -> str:
    """An audit tensor as base64: ``encode_message({}, [tensor])`` bytes, or a tensor to encode."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        from hivemart_core.protocol.framing import encode_message  # only reached with a torch tensor in hand

        value = b"".join(bytes(frame) for frame in encode_message({}, [value]))
    return base64.b64encode(bytes(value)).decode("ascii")


class Audits(_Resource):
    def create(
        self,
        *,
        job: int,
        ticket_id: str,
        session_id: str,
        start: int,
        end: int,
        dtype: str,
        inputs: Any,
        claimed: Any,
        reference: Any,
        reference_peer: str,
        evidence: dict[str, Any] | None = None,
        deposit: int = 0,
    ) -> Audit:
        """Report that the provider of ``ticket_id`` returned ``claimed`` for blocks [start, end)
        where the backup ``reference_peer`` returned ``reference``, both on ``inputs`` (the full
        prefix of hidden states at block ``start``). Tensors, or their ``encode_message`` bytes,
        of at most 8 MiB each. The scheduler recomputes the span and decides.

        ``evidence`` proves ``claimed`` came from the provider: ``{"receipt": the provider's
        signed receipt for the session (a WorkReceipt or its dict), "digests": [hex
        tensor_digest of every output of the session, in order], "step": the claimed output's
        index}`` (required where the marketplace sets HIVEMART_AUDIT_REQUIRE_EVIDENCE). Without
        evidence, ``deposit`` micro-credits (at least ``client.platform.get().audit_deposit``) are
        held from your wallet until the verdict: returned if the provider cheated, forfeited if
        the audit proves nothing."""
        body = {
            "job": job,
            "ticket_id": ticket_id,
            "session_id": session_id,
            "start": start,
            "end": end,
            "dtype": dtype,
            "inputs": _tensor_b64(inputs),
            "claimed": _tensor_b64(claimed),
            "reference": _tensor_b64(reference),
            "reference_peer": reference_peer,
        }
        if evidence is not None:
            body["evidence"] = {**evidence, "receipt": _receipt_dict(evidence["receipt"])}
        if deposit:
            body["deposit"] = int(deposit)
        return Audit.from_json(self._core.request("POST", "/api/audits/", json=body))

    def create_equivocation(self, *, job: int, ticket_id: str, records: Sequence[dict[str, Any]]) -> Audit:
        """Report that the provider of ``ticket_id`` signed two different step records for one
        step (``hivemart_core.protocol.commitments``): it pushed the next provider another output
        than it returned. Decided at once from the signatures."""
        body = {"job": job, "ticket_id": ticket_id, "records": [dict(r) for r in records]}
        return Audit.from_json(self._core.request("POST", "/api/audits/equivocation/", json=body))

    def get(self, audit_id: int) -> Audit:
        return Audit.from_json(self._core.request("GET", f"/api/audits/{int(audit_id)}/"))

    def list(self, *, job: int | None = None, page: int = 1, page_size: int | None = None) -> Page[Audit]:
        """Audits of your jobs (staff: all), newest first."""
        return self._page("/api/audits/", Audit.from_json, page, page_size, job=job)


class Platform(_Resource):
    def get(self) -> PlatformInfo:
        """The marketplace's platform public key (it signs job tickets) and fee; no API key needed."""
        return PlatformInfo.from_json(self._core.request("GET", "/api/platform/", auth=False))


class Receipts(_Resource):
    def upload(self, receipts: Iterable[Any], *, batch_size: int = RECEIPT_BATCH) -> list[ReceiptResult]:
        """Upload signed work receipts (``WorkReceipt`` objects or their dicts), in batches of at
        most ``batch_size`` (pass ``client.platform.get().receipts_per_upload`` when the
        marketplace may take another number than the shared default); one result per receipt,
        in order. Uploading the same receipt again is harmless (``stale``), so failed requests
        are retried."""
        if type(batch_size) is not int or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, not {batch_size!r}")
        items = [_receipt_dict(r) for r in receipts]
        results: list[ReceiptResult] = []
        for offset in range(0, len(items), batch_size):
            body = self._core.request(
                "POST",
                "/api/receipts/",
                json={"receipts": items[offset : offset + batch_size]},
            )
            results += [ReceiptResult.from_json(r) for r in body["results"]]
        return results

    def list(self, *, job: int | None = None, page: int = 1, page_size: int | None = None) -> Page[StoredReceipt]:
        """Stored receipts of your jobs and your providers, newest first."""
        return self._page("/api/receipts/", StoredReceipt.from_json, page, page_size, job=job)

    def iter(self, *, job: int | None = None, page_size: int = 100) -> Iterator[StoredReceipt]:
        return self._iter("/api/receipts/", StoredReceipt.from_json, page_size, job=job)

    def settlements(
        self, *, job: int | None = None, provider: int | None = None, page: int = 1, page_size: int | None = None
    ) -> Page[Settlement]:
        """What settlement paid, per job and provider, newest first."""
        return self._page("/api/settlements/", Settlement.from_json, page, page_size, job=job, provider=provider)

    def dispute(self, job_id: int, receipt: Any, *, code: str, message: str = "") -> Dispute:
        """Report a receipt you refused to countersign (``code``: the check it failed, e.g.
        ``receipt_units``), with the receipt as the provider signed it. Until staff decide, its
        ticket pays only for work you countersigned. Reporting it again returns the same dispute."""
        body = self._core.request(
            "POST",
            f"/api/jobs/{int(job_id)}/disputes/",
            json={"receipt": _receipt_dict(receipt), "code": code, "message": message[:300]},
        )
        return Dispute.from_json(body)

    def disputes(self, *, job: int | None = None, page: int = 1, page_size: int | None = None) -> Page[Dispute]:
        """Disputes of your jobs and against your providers, newest first."""
        return self._page("/api/disputes/", Dispute.from_json, page, page_size, job=job)


class Ledger(_Resource):
    def accounts(self, *, page: int = 1, page_size: int | None = None) -> Page[Account]:
        return self._page("/api/ledger/accounts/", Account.from_json, page, page_size)

    def account(self, account_id: int) -> Account:
        return Account.from_json(self._core.request("GET", f"/api/ledger/accounts/{int(account_id)}/"))

    def postings(self, *, account: int | None = None, page: int = 1, page_size: int | None = None) -> Page[Posting]:
        return self._page("/api/ledger/postings/", Posting.from_json, page, page_size, account=account)

    def iter_postings(self, *, account: int | None = None, page_size: int = 100) -> Iterator[Posting]:
        return self._iter("/api/ledger/postings/", Posting.from_json, page_size, account=account)

    def holds(self, *, page: int = 1, page_size: int | None = None) -> Page[Hold]:
        return self._page("/api/ledger/holds/", Hold.from_json, page, page_size)

    def hold(self, hold_id: int) -> Hold:
        return Hold.from_json(self._core.request("GET", f"/api/ledger/holds/{int(hold_id)}/"))

    def grant(self, *, username: str, amount: int, memo: str = "", idempotency_key: str | None = None) -> Transaction:
        """Staff: grant ``amount`` micro-credits to a user (idempotent by key, generated unless given)."""
        # The key goes in the body too: the ledger keeps it for good, past the API's retention.
        key = idempotency_key or new_idempotency_key()
        body = {"username": username, "amount": amount, "memo": memo, "idempotency_key": key}
        return Transaction.from_json(self._core.request("POST", "/api/ledger/grants/", json=body, idempotency_key=key))

    def payout(self, *, account: int, amount: int, memo: str = "", idempotency_key: str | None = None) -> Transaction:
        """Staff: pay ``amount`` micro-credits out of a provider's earnings account at once (a payout
        made outside the request flow; providers use ``client.payouts.request``)."""
        # The key goes in the body too: the ledger keeps it for good, past the API's retention.
        key = idempotency_key or new_idempotency_key()
        body = {"account": account, "amount": amount, "memo": memo, "idempotency_key": key}
        return Transaction.from_json(self._core.request("POST", "/api/ledger/payouts/", json=body, idempotency_key=key))


class Payments(_Resource):
    """Buying credits: a top-up is paid on its ``checkout_url``, then credited."""

    def topup(self, *, credits: int, idempotency_key: str | None = None) -> TopUp:
        """Start buying ``credits`` whole credits; open ``checkout_url`` to pay."""
        key = idempotency_key or new_idempotency_key()
        body = {"credits": credits, "idempotency_key": key}
        return TopUp.from_json(self._core.request("POST", "/api/payments/topups/", json=body, idempotency_key=key))

    def topups(self, *, page: int = 1, page_size: int | None = None) -> Page[TopUp]:
        return self._page("/api/payments/topups/", TopUp.from_json, page, page_size)

    def get(self, topup_id: int) -> TopUp:
        return TopUp.from_json(self._core.request("GET", f"/api/payments/topups/{int(topup_id)}/"))

    def test_pay(self, topup_id: int) -> TopUp:
        """Pay one of your test top-ups (only where the marketplace runs the test payment provider)."""
        return TopUp.from_json(self._core.request("POST", f"/api/payments/topups/{int(topup_id)}/test-pay/"))


class Payouts(_Resource):
    """Payout requests: providers ask, staff approve (or reject) and mark paid."""

    def request(
        self, *, provider: int, amount: int, memo: str = "", idempotency_key: str | None = None
    ) -> PayoutRequest:
        """Ask for ``amount`` micro-credits of your provider's earnings to be paid out (held until decided)."""
        key = idempotency_key or new_idempotency_key()
        body = {"provider": provider, "amount": amount, "memo": memo, "idempotency_key": key}
        return PayoutRequest.from_json(self._core.request("POST", "/api/payouts/", json=body, idempotency_key=key))

    def list(self, *, page: int = 1, page_size: int | None = None) -> Page[PayoutRequest]:
        return self._page("/api/payouts/", PayoutRequest.from_json, page, page_size)

    def get(self, request_id: int) -> PayoutRequest:
        return PayoutRequest.from_json(self._core.request("GET", f"/api/payouts/{int(request_id)}/"))

    def approve(self, request_id: int, *, note: str = "") -> PayoutRequest:
        """Staff: pay the request's held credits out of the platform."""
        return self._decide(request_id, "approve", {"note": note})

    def reject(self, request_id: int, *, note: str = "") -> PayoutRequest:
        """Staff: return the request's held credits to the provider's earnings."""
        return self._decide(request_id, "reject", {"note": note})

    def mark_paid(self, request_id: int, *, reference: str) -> PayoutRequest:
        """Staff: record the outside payment's reference for an approved request."""
        return self._decide(request_id, "paid", {"reference": reference})

    def _decide(self, request_id: int, action: str, body: dict[str, str]) -> PayoutRequest:
        return PayoutRequest.from_json(
            self._core.request("POST", f"/api/payouts/{int(request_id)}/{action}/", json=body)
        )


class Client:
    """The Hivemart marketplace REST client.

    >>> client = Client(api_key="hm_...", base_url="https://market.example")
    >>> job = client.jobs.create(model="llama-8x512-3fa9c0d1e2b4", kind="inference",
    ...                          budget=5_000_000, max_price=2_000)

    ``api_key`` defaults to the ``HIVEMART_API_KEY`` environment variable. Failed connections,
    429s and (for requests that are safe to repeat) 5xx answers are retried up to
    ``max_retries`` times with jittered exponential backoff; every other failure raises an
    :class:`~hivemart_core.errors.APIError` subclass. ``transport`` routes requests through any
    httpx transport (``httpx.WSGITransport(app=...)`` to call a Django app in-process, a mock
    in tests). Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str = DEFAULT_BASE_URL,
        timeout: float = 30.0,
        max_retries: int = 2,
        *,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._core = HTTPCore(
            api_key=env_api_key(api_key),
            base_url=base_url,
            timeout=timeout,
            max_retries=max_retries,
            transport=transport,
        )
        self.accounts = Accounts(self._core)
        self.keys = Keys(self._core)
        self.models = Models(self._core)
        self.providers = Providers(self._core)
        self.jobs = Jobs(self._core)
        self.ledger = Ledger(self._core)
        self.platform = Platform(self._core)
        self.receipts = Receipts(self._core)
        self.audits = Audits(self._core)
        self.payments = Payments(self._core)
        self.payouts = Payouts(self._core)

    @property
    def api_key(self) -> str | None:
        return self._core.api_key

    @api_key.setter
    def api_key(self, value: str | None) -> None:
        """Switch keys (after ``accounts.signup``, say) without a new client."""
        self._core.api_key = value

    def close(self) -> None:
        self._core.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Headers of the swarm RPCs, as small dataclasses with explicit validation.

Every request a provider reads from the network goes through ``from_header``, which checks
types, ranges and lengths and raises :class:`ProtocolError` with a message fit to send back.
Tensor checks that need the server's state (hidden size, dtype, span) happen in the server.

RPC names (libp2p protocol handlers) carry the protocol version, ``hivemart.v{N}.<name>``:
- ``info``      request ``{}`` -> ``InfoReply``
- ``forward``   ``SpanRequest`` + hidden[b, t, h] -> ``OutputReply`` + hidden[b, t, h]
- ``backward``  ``SpanRequest`` + hidden, grad_output -> ``GradReply`` + grad_input
- ``inference`` bidirectional: ``OpenSession`` -> ``OpenedReply``, then ``Step`` + hidden per step
  -> ``StepOutputReply``, ``RelinkedReply``, ``ReceiptReply``, ``ErrorReply``
- ``push``      provider to provider: ``Step`` + hidden for the next span of a chain -> errors only
- ``adapter``   ``AdapterRequest`` (+ weights) -> ``AdapterReply`` (+ weights)
Forward and backward take fine-tuning fields (``SpanTuning``): deep prompts and a LoRA adapter.
Errors come back as ``ErrorReply``: ``{"type": "error", "code": ..., "message": ..., "step_id": ...}``
with a code of ``hivemart_core.protocol.error_codes``.

Replies are parsed as strictly as requests: a reply with a missing or mistyped field, or of an
unexpected type, raises :class:`ProtocolError` naming the field (a faulty provider is then
failed over like one that broke its stream, never a ``KeyError`` or ``ValueError`` in the client).

Versions (see docs/protocol.md): :data:`PROTOCOL_VERSION` is in every ``info`` reply, in the
provider's signed DHT record and in the RPC names. A provider also answers the names of older
versions, with ``unsupported_version``; a client routes only to records of a version it speaks.

Billing: with a marketplace, ``OpenSession`` and ``SpanRequest`` carry a job ``ticket``
(``hivemart_core.protocol.tickets``); the provider answers with signed cumulative receipts
(``hivemart_core.protocol.receipts``): ``{"type": "receipt", "receipt": {...}}`` messages on
an inference stream, a ``"receipt"`` entry in forward/backward reply headers.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from hivemart_core.errors import ProtocolError

__all__ = [
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "LEGACY_RPC_NAMES",
    "rpc_name",
    "RPC_INFO",
    "RPC_FORWARD",
    "RPC_BACKWARD",
    "RPC_INFERENCE",
    "RPC_PUSH",
    "RPC_ADAPTER",
    "OpenSession",
    "Step",
    "Relink",
    "SpanRequest",
    "SpanTuning",
    "AdapterRequest",
    "error_header",
    "receipt_ack",
    "ErrorReply",
    "InfoReply",
    "OutputReply",
    "GradReply",
    "AdapterReply",
    "OpenedReply",
    "StepOutputReply",
    "RelinkedReply",
    "ReceiptReply",
    "StreamReply",
    "parse_stream_reply",
    "version_mismatch",
]

# The wire protocol this code speaks. Version 1 had unversioned RPC names ("hivemart.info"),
# no version in info replies or records; version 2 is version 1 with versioned names, the
# version in info and records, and the ``unsupported_version`` error for older names.
PROTOCOL_VERSION = 2
# The versions a client of this code plans routes over (records of others are skipped).
SUPPORTED_VERSIONS: frozenset[int] = frozenset({PROTOCOL_VERSION})
_RPCS = ("info", "forward", "backward", "inference", "push", "adapter")


def rpc_name(name: str, version: int = PROTOCOL_VERSION) -> str:
    """The libp2p handler name of RPC ``name`` in protocol ``version`` (1 had no version in it)."""
    return f"hivemart.{name}" if version == 1 else f"hivemart.v{version}.{name}"


RPC_INFO = rpc_name("info")
RPC_FORWARD = rpc_name("forward")
RPC_BACKWARD = rpc_name("backward")
RPC_INFERENCE = rpc_name("inference")
RPC_PUSH = rpc_name("push")
RPC_ADAPTER = rpc_name("adapter")
# Names of older versions a provider still registers, to refuse them with a clear error.
LEGACY_RPC_NAMES: dict[str, int] = {rpc_name(n, v): v for v in range(1, PROTOCOL_VERSION) for n in _RPCS}

_SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
_MAX_TICKET_FIELDS = 16
_PEER_ID = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{32,128}$")  # base58btc
_MAX_INT = 2**31 - 1


def _int(header: dict[str, Any], key: str, *, low: int = 0, high: int = _MAX_INT) -> int:
    value = header.get(key)
    if type(value) is not int:  # bool is an int subclass: reject it too
        raise ProtocolError(f"'{key}' must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise ProtocolError(f"'{key}' must be in [{low}, {high}], got {value}")
    return value


def _optional_str(header: dict[str, Any], key: str, pattern: re.Pattern[str], what: str) -> str | None:
    value = header.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not pattern.match(value):
        raise ProtocolError(f"'{key}' must be {what}")
    return value


def _session_id(header: dict[str, Any], key: str = "session_id") -> str:
    value = _optional_str(header, key, _SESSION_ID, "8 to 64 characters of [A-Za-z0-9_-]")
    if value is None:
        raise ProtocolError(f"'{key}' is required")
    return value


def _span(header: dict[str, Any]) -> tuple[int, int]:
    start, end = _int(header, "start"), _int(header, "end")
    if end <= start:
        raise ProtocolError(f"empty block range {start}:{end}")
    return start, end


def _ticket(header: dict[str, Any]) -> dict[str, Any] | None:
    """The job ticket a billable request carries, as a map; checked by the provider against
    the platform key (``hivemart_core.protocol.tickets.verify_ticket``)."""
    value = header.get("ticket")
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > _MAX_TICKET_FIELDS:
        raise ProtocolError("'ticket' must be a map of ticket fields")
    return value


def receipt_ack(header: dict[str, Any]) -> dict[str, Any] | None:
    """The client's acknowledgement a request or an ``ack`` message carries: its countersigned
    copy of the provider's latest receipt, as a map (checked by the provider's ``TicketBook``)."""
    value = header.get("ack")
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > _MAX_TICKET_FIELDS:
        raise ProtocolError("'ack' must be a map of receipt fields")
    return value


def error_header(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message, **extra}


@dataclass(frozen=True)
class SpanRequest:
    """A forward or backward over blocks [start, end) of the provider's span.

    A billable request carries its job ``ticket``; ``session_id`` names the client's run
    (a training loop, say) whose work one cumulative receipt counts; ``ack`` is the client's
    countersignature of the latest receipt it got for that run (the payment channel).
    """

    start: int
    end: int
    ticket: dict[str, Any] | None = None
    session_id: str | None = None
    # Fine-tuning (see SpanTuning): deep prompts travel as an extra tensor, the adapter by id.
    tuning: SpanTuning | None = None
    ack: dict[str, Any] | None = None

    def to_header(self) -> dict[str, Any]:
        header = {"type": "span", "start": self.start, "end": self.end}
        if self.ticket is not None:
            header["ticket"] = self.ticket
        if self.ack is not None:
            header["ack"] = self.ack
        if self.session_id is not None:
            header["session_id"] = self.session_id
        if self.tuning is not None:
            header.update(self.tuning.to_header())
        return header

    @classmethod
    def from_header(cls, header: dict[str, Any]) -> SpanRequest:
        start, end = _span(header)
        session_id = None if header.get("session_id") is None else _session_id(header)
        return cls(
            start,
            end,
            ticket=_ticket(header),
            session_id=session_id,
            tuning=SpanTuning.from_header(header),
            ack=receipt_ack(header),
        )


@dataclass(frozen=True)
class SpanTuning:
    """Fine-tuning fields of a forward or backward.

    ``prompts``: the request carries, after its hidden states (and output gradients), deep
    prompts ``[blocks, batch or 1, prefix, hidden]`` added to the first ``prefix`` positions
    of each block's input; a backward then also returns their gradient. ``adapter_id``: run
    with that LoRA adapter (see ``AdapterRequest``); ``lora_grads`` asks a backward to return
    the adapter's weight gradient too, as one flat float32 tensor ``[blocks, per_block]``.
    ``graph_id``: a forward keeps its autograd graph under this id (for a while, within a
    memory budget) and a backward with the same id and the same inputs uses it instead of
    recomputing the forward; a backward whose graph is gone recomputes it.
    """

    prompts: bool = False
    adapter_id: str | None = None
    lora_grads: bool = False
    graph_id: str | None = None

    def to_header(self) -> dict[str, Any]:
        header: dict[str, Any] = {}
        if self.prompts:
            header["prompts"] = True
        if self.adapter_id is not None:
            header["adapter_id"] = self.adapter_id
        if self.lora_grads:
            header["lora_grads"] = True
        if self.graph_id is not None:
            header["graph_id"] = self.graph_id
        return header

    @classmethod
    def from_header(cls, header: dict[str, Any]) -> SpanTuning | None:
        prompts, lora_grads = header.get("prompts", False), header.get("lora_grads", False)
        if not isinstance(prompts, bool) or not isinstance(lora_grads, bool):
            raise ProtocolError("'prompts' and 'lora_grads' must be booleans")
        adapter_id = _optional_str(header, "adapter_id", _SESSION_ID, "8 to 64 characters of [A-Za-z0-9_-]")
        if lora_grads and adapter_id is None:
            raise ProtocolError("'lora_grads' needs an 'adapter_id'")
        graph_id = _optional_str(header, "graph_id", _SESSION_ID, "8 to 64 characters of [A-Za-z0-9_-]")
        if not prompts and adapter_id is None and graph_id is None:
            return None
        return cls(prompts=prompts, adapter_id=adapter_id, lora_grads=lora_grads, graph_id=graph_id)


_ADAPTER_OPS = ("create", "set", "get", "delete")
_MAX_TARGETS = 7


@dataclass(frozen=True)
class AdapterRequest:
    """``hivemart.adapter``: manage one LoRA adapter kept on the provider for a job.

    - ``create``: a new adapter ``adapter_id`` for blocks ``[start, end)`` with ``rank``,
      ``alpha`` and ``targets``; its weights come from ``seed`` (PEFT's initialisation,
      ``hivemart_core.models.lora.init_weights``) or, without a seed, from one tensor
      ``[blocks, per_block]`` sent along.
    - ``set``: replace its weights with the tensor sent along (the client's optimizer step).
    - ``get``: answer with its weights. ``delete``: forget it.
    Only the peer that created an adapter may use it. A provider that requires job tickets
    also requires one covering ``[start, end)`` to ``create`` (an adapter holds its memory).
    """

    op: str
    adapter_id: str
    start: int = 0
    end: int = 0
    rank: int = 0
    alpha: float = 0.0
    targets: tuple[str, ...] = ()
    seed: int | None = None
    ticket: dict[str, Any] | None = None

    def to_header(self) -> dict[str, Any]:
        header: dict[str, Any] = {"type": "adapter", "op": self.op, "adapter_id": self.adapter_id}
        if self.op == "create":
            header.update(
                start=self.start,
                end=self.end,
                rank=self.rank,
                alpha=self.alpha,
                targets=list(self.targets),
                seed=self.seed,
            )
            if self.ticket is not None:
                header["ticket"] = self.ticket
        return header

    @classmethod
    def from_header(cls, header: dict[str, Any]) -> AdapterRequest:
        if header.get("type") != "adapter":
            raise ProtocolError(f"expected an 'adapter' message, got {header.get('type')!r}")
        op = header.get("op")
        if op not in _ADAPTER_OPS:
            raise ProtocolError(f"'op' must be one of {', '.join(_ADAPTER_OPS)}")
        adapter_id = _session_id(header, "adapter_id")
        if op != "create":
            return cls(op=op, adapter_id=adapter_id)
        start, end = _span(header)
        alpha: Any  # checked by type() below, which mypy does not narrow on
        alpha, targets = header.get("alpha"), header.get("targets")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 < alpha < 1e6:
            raise ProtocolError("'alpha' must be a number in (0, 1e6)")
        if (
            not isinstance(targets, list)
            or not 0 < len(targets) <= _MAX_TARGETS
            or not all(isinstance(t, str) and len(t) <= 32 for t in targets)
        ):
            raise ProtocolError(f"'targets' must be a list of 1 to {_MAX_TARGETS} module names")
        seed = None if header.get("seed") is None else _int(header, "seed")
        return cls(
            op=op,
            adapter_id=adapter_id,
            start=start,
            end=end,
            rank=_int(header, "rank", low=1, high=4096),
            alpha=float(alpha),
            targets=tuple(targets),
            seed=seed,
            ticket=_ticket(header),
        )


@dataclass(frozen=True)
class OpenSession:
    """First message of an inference stream.

    ``next_peer``/``next_session`` name the provider of the following span: the server
    pushes each step's output there directly instead of through the client. ``prev_peer``
    is the only peer allowed to push steps into this session. ``return_outputs`` asks for
    every step's output on this stream too (the last span of a chain always returns it).
    ``ticket`` is the job ticket that pays for the session (required by providers that
    trust a marketplace); the provider answers with signed ``receipt`` messages.
    ``adapter_id`` names a LoRA adapter the same peer created on this provider (the
    ``adapter`` RPC) covering the session's blocks: every step then applies it.
    """

    session_id: str
    start: int
    end: int
    max_length: int
    batch_size: int = 1
    prev_peer: str | None = None
    next_peer: str | None = None
    next_session: str | None = None
    return_outputs: bool = True
    ticket: dict[str, Any] | None = None
    adapter_id: str | None = None

    def to_header(self) -> dict[str, Any]:
        header = {"type": "open", **asdict(self)}
        for optional in ("ticket", "adapter_id"):
            if header[optional] is None:
                del header[optional]
        return header

    @classmethod
    def from_header(cls, header: dict[str, Any]) -> OpenSession:
        if header.get("type") != "open":
            raise ProtocolError("an inference stream must start with an 'open' message")
        start, end = _span(header)
        next_peer = _optional_str(header, "next_peer", _PEER_ID, "a base58 peer id")
        next_session = None if next_peer is None else _session_id(header, "next_session")
        return_outputs = header.get("return_outputs", True)
        if not isinstance(return_outputs, bool):
            raise ProtocolError("'return_outputs' must be a boolean")
        return cls(
            session_id=_session_id(header),
            start=start,
            end=end,
            max_length=_int(header, "max_length", low=1),
            batch_size=_int(header, "batch_size", low=1),
            prev_peer=_optional_str(header, "prev_peer", _PEER_ID, "a base58 peer id"),
            next_peer=next_peer,
            next_session=next_session,
            return_outputs=return_outputs or next_peer is None,
            ticket=_ticket(header),
            adapter_id=None if header.get("adapter_id") is None else _session_id(header, "adapter_id"),
        )


# Most positions a step's padding mask may cover (batch x tokens): it travels in the header.
MAX_MASK_ENTRIES = 32 * 1024


@dataclass(frozen=True)
class Step:
    """One inference step: hidden states for positions ``position ..`` of a session.

    ``step_id`` identifies the step so that a step delivered twice (pushed by the previous
    provider and re-sent by the client) is applied once. A ``position`` below the session's
    length rolls the cache back to it first; one above it is an error.

    ``mask`` (``[batch][tokens]`` of 0/1, like ``transformers``' ``attention_mask``) marks the
    step's padding tokens (0): no later token attends to them, and position ids count only
    real tokens, as a local model does with a left-padded batch. Left out, every token is
    real. ``reorder`` (one row index per batch row) first replaces the session's cached rows
    by ``rows[reorder[i]]``: beam search keeps the caches of the hypotheses it continues.
    """

    session_id: str
    step_id: int
    position: int
    mask: tuple[tuple[int, ...], ...] | None = None
    reorder: tuple[int, ...] | None = None

    def to_header(self) -> dict[str, Any]:
        header: dict[str, Any] = {
            "type": "step",
            "session_id": self.session_id,
            "step_id": self.step_id,
            "position": self.position,
        }
        if self.mask is not None:
            header["mask"] = [list(row) for row in self.mask]
        if self.reorder is not None:
            header["reorder"] = list(self.reorder)
        return header

    @classmethod
    def from_header(cls, header: dict[str, Any]) -> Step:
        if header.get("type") != "step":
            raise ProtocolError(f"expected a 'step' message, got {header.get('type')!r}")
        return cls(
            session_id=_session_id(header),
            step_id=_int(header, "step_id", high=2**62),
            position=_int(header, "position"),
            mask=_step_mask(header.get("mask")),
            reorder=_step_reorder(header.get("reorder")),
        )


def _step_mask(raw: Any) -> tuple[tuple[int, ...], ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw or not all(isinstance(row, list) and row for row in raw):
        raise ProtocolError("'mask' must be a non-empty list of non-empty rows of 0/1, one row per batch row")
    if len({len(row) for row in raw}) != 1 or len(raw) * len(raw[0]) > MAX_MASK_ENTRIES:
        raise ProtocolError(f"'mask' rows must have the same length, at most {MAX_MASK_ENTRIES} entries in all")
    if not all(type(v) is int and v in (0, 1) for row in raw for v in row):
        raise ProtocolError("'mask' entries must be 0 (padding) or 1 (a real token)")
    return tuple(tuple(row) for row in raw)


def _step_reorder(raw: Any) -> tuple[int, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw or not all(type(v) is int and 0 <= v < _MAX_INT for v in raw):
        raise ProtocolError("'reorder' must be a non-empty list of row indices (non-negative integers)")
    return tuple(raw)


@dataclass(frozen=True)
class Relink:
    """Re-wires an open session after a neighbour in the chain was replaced.

    Sent by the session's client on its own stream: ``prev_peer`` becomes the only peer
    allowed to push steps here; ``next_peer``/``next_session`` (both or neither) become
    where outputs are pushed. A field left out keeps its value; ``clear_next`` stops pushing.
    """

    session_id: str
    prev_peer: str | None = None
    next_peer: str | None = None
    next_session: str | None = None
    clear_next: bool = False

    def to_header(self) -> dict[str, Any]:
        return {"type": "relink", **asdict(self)}

    @classmethod
    def from_header(cls, header: dict[str, Any]) -> Relink:
        if header.get("type") != "relink":
            raise ProtocolError(f"expected a 'relink' message, got {header.get('type')!r}")
        next_peer = _optional_str(header, "next_peer", _PEER_ID, "a base58 peer id")
        clear_next = header.get("clear_next", False)
        if not isinstance(clear_next, bool) or (clear_next and next_peer is not None):
            raise ProtocolError("'clear_next' must be a boolean and excludes 'next_peer'")
        return cls(
            session_id=_session_id(header),
            prev_peer=_optional_str(header, "prev_peer", _PEER_ID, "a base58 peer id"),
            next_peer=next_peer,
            next_session=None if next_peer is None else _session_id(header, "next_session"),
            clear_next=clear_next,
        )


# --- replies ---------------------------------------------------------------------------------
# Parsed by clients, the marketplace's probes and providers relaying a next hop's errors. Each
# ``from_header`` raises ProtocolError naming the field; fields a newer provider adds are ignored.

_MAX_CODE_LEN = 64
_MAX_MESSAGE_LEN = 4096
_MAX_DIGESTS = 4096
_DTYPES = ("float32", "float16", "bfloat16")


def _reply_type(header: Any, expected: str) -> dict[str, Any]:
    if not isinstance(header, dict):
        raise ProtocolError(f"a reply must be a map, got {type(header).__name__}")
    kind = header.get("type")
    if kind != expected:
        raise ProtocolError(f"reply field 'type' must be {expected!r}, got {kind!r}")
    return header


def _reply_int(header: dict[str, Any], key: str, *, high: int = 2**62) -> int:
    try:
        return _int(header, key, high=high)
    except ProtocolError as e:
        raise ProtocolError(f"reply field {e}") from None


def _reply_optional_int(header: dict[str, Any], key: str) -> int | None:
    return None if header.get(key) is None else _reply_int(header, key)


def _reply_bool(header: dict[str, Any], key: str, default: bool | None = None) -> bool:
    value = header.get(key, default)
    if type(value) is not bool:
        raise ProtocolError(f"reply field '{key}' must be a boolean, got {type(value).__name__}")
    return value


def _reply_str(header: dict[str, Any], key: str, *, max_len: int = 256) -> str:
    value = header.get(key)
    if not isinstance(value, str) or len(value) > max_len:
        raise ProtocolError(f"reply field '{key}' must be a string of at most {max_len} characters")
    return value


def _reply_map(header: dict[str, Any], key: str, *, required: bool) -> dict[str, Any] | None:
    value = header.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, dict) or len(value) > _MAX_TICKET_FIELDS:
        raise ProtocolError(f"reply field '{key}' must be a map of at most {_MAX_TICKET_FIELDS} fields")
    return value


def _reply_session_id(header: dict[str, Any], key: str = "session_id", *, required: bool = True) -> str | None:
    if header.get(key) is None and not required:
        return None
    try:
        return _session_id(header, key)
    except ProtocolError as e:
        raise ProtocolError(f"reply field {e}") from None


def version_mismatch(theirs: int, ours: int = PROTOCOL_VERSION) -> str:
    """What to tell a user whose peer speaks another protocol version."""
    upgrade = "the provider" if theirs < ours else "this client (pip install -U hivemart)"
    return f"provider speaks protocol v{theirs}, this client v{ours}; upgrade {upgrade}"


@dataclass(frozen=True)
class ErrorReply:
    """``{"type": "error", "code", "message", step_id?, peer_id?, session_id?}``. ``peer_id``
    names the provider at fault when it is not the one answering (``next_hop_failed``)."""

    code: str
    message: str
    step_id: int | None = None
    peer_id: str | None = None
    session_id: str | None = None

    @property
    def extra(self) -> dict[str, Any]:
        fields = {"step_id": self.step_id, "peer_id": self.peer_id, "session_id": self.session_id}
        return {k: v for k, v in fields.items() if v is not None}

    @classmethod
    def from_header(cls, header: Any) -> ErrorReply:
        header = _reply_type(header, "error")
        code = _reply_str(header, "code", max_len=_MAX_CODE_LEN)
        if not code:
            raise ProtocolError("reply field 'code' must not be empty")
        peer_id = header.get("peer_id")
        if peer_id is not None and (not isinstance(peer_id, str) or not _PEER_ID.match(peer_id)):
            raise ProtocolError("reply field 'peer_id' must be a base58 peer id")
        return cls(
            code=code,
            message=_reply_str(header, "message", max_len=_MAX_MESSAGE_LEN),
            step_id=_reply_optional_int(header, "step_id"),
            peer_id=peer_id,
            session_id=_reply_session_id(header, required=False),
        )


@dataclass(frozen=True)
class InfoReply:
    """What a provider says about itself on ``info`` (``ProviderServer.info``)."""

    protocol_version: int
    peer_id: str
    model_id: str
    start: int
    end: int
    dtype: str
    hidden_size: int
    block_digests: tuple[str, ...]
    accepting: bool
    sessions: int
    max_sessions: int
    cache_bytes_left: int
    cache_tokens_left: int
    max_session_length: int
    max_batch_size: int
    max_request_tokens: int
    adapter_bytes_left: int
    max_adapter_rank: int
    graphs_kept: int
    graph_bytes_used: int
    graph_bytes: int

    def to_header(self) -> dict[str, Any]:
        return {"type": "info", **asdict(self), "block_digests": list(self.block_digests)}

    @classmethod
    def from_header(cls, header: Any) -> InfoReply:
        """Parse an info reply; one of another protocol version (absent: version 1) raises
        ProtocolError ``unsupported_version`` saying which side to upgrade."""
        header = _reply_type(header, "info")
        version = 1 if header.get("protocol_version") is None else _reply_int(header, "protocol_version", high=2**16)
        if version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"reply field 'protocol_version': {version_mismatch(version)}", code="unsupported_version"
            )
        start, end = _reply_int(header, "start"), _reply_int(header, "end")
        if end <= start:
            raise ProtocolError(f"reply fields 'start' and 'end' must be a non-empty span, got {start}:{end}")
        digests = header.get("block_digests")
        if (
            not isinstance(digests, list)
            or len(digests) > _MAX_DIGESTS
            or not all(isinstance(d, str) and len(d) <= 128 for d in digests)
        ):
            raise ProtocolError("reply field 'block_digests' must be a list of digest strings")
        dtype = _reply_str(header, "dtype", max_len=16)
        if dtype not in _DTYPES:
            raise ProtocolError(f"reply field 'dtype' must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        counts = {
            key: _reply_int(header, key)
            for key in (
                "hidden_size",
                "sessions",
                "max_sessions",
                "cache_bytes_left",
                "cache_tokens_left",
                "max_session_length",
                "max_batch_size",
                "max_request_tokens",
                "adapter_bytes_left",
                "max_adapter_rank",
                "graphs_kept",
                "graph_bytes_used",
                "graph_bytes",
            )
        }
        peer_id = _reply_str(header, "peer_id", max_len=128)
        if not _PEER_ID.match(peer_id):
            raise ProtocolError("reply field 'peer_id' must be a base58 peer id")
        return cls(
            protocol_version=version,
            peer_id=peer_id,
            model_id=_reply_str(header, "model_id", max_len=128),
            start=start,
            end=end,
            dtype=dtype,
            block_digests=tuple(digests),
            accepting=_reply_bool(header, "accepting"),
            **counts,
        )


@dataclass(frozen=True)
class OutputReply:
    """A forward's reply: ``kept`` whether a training forward's graph was kept (None when
    none was asked for); ``receipt`` the provider's signed receipt (billed requests)."""

    kept: bool | None = None
    receipt: dict[str, Any] | None = None

    @classmethod
    def from_header(cls, header: Any) -> OutputReply:
        header = _reply_type(header, "output")
        kept = None if header.get("kept") is None else _reply_bool(header, "kept")
        return cls(kept=kept, receipt=_reply_map(header, "receipt", required=False))


@dataclass(frozen=True)
class GradReply:
    """A backward's reply: which extra gradients follow ``grad_input`` (``prompts``, then
    ``lora_grads``) and whether the forward was recomputed (its graph was not kept)."""

    prompts: bool = False
    lora_grads: bool = False
    recomputed: bool = True
    receipt: dict[str, Any] | None = None

    @classmethod
    def from_header(cls, header: Any) -> GradReply:
        header = _reply_type(header, "grad")
        return cls(
            prompts=_reply_bool(header, "prompts", False),
            lora_grads=_reply_bool(header, "lora_grads", False),
            recomputed=_reply_bool(header, "recomputed", True),
            receipt=_reply_map(header, "receipt", required=False),
        )


@dataclass(frozen=True)
class AdapterReply:
    """An adapter operation's reply; ``create`` also says the adapter's span and size."""

    op: str
    adapter_id: str
    start: int | None = None
    end: int | None = None
    numel: int | None = None

    @classmethod
    def from_header(cls, header: Any) -> AdapterReply:
        header = _reply_type(header, "adapter")
        op = header.get("op")
        if op not in _ADAPTER_OPS:
            raise ProtocolError(f"reply field 'op' must be one of {', '.join(_ADAPTER_OPS)}, got {op!r}")
        adapter_id = _reply_session_id(header, "adapter_id")
        assert adapter_id is not None  # required=True
        return cls(
            op=op,
            adapter_id=adapter_id,
            start=_reply_optional_int(header, "start"),
            end=_reply_optional_int(header, "end"),
            numel=_reply_optional_int(header, "numel"),
        )


@dataclass(frozen=True)
class OpenedReply:
    """The provider opened the session (and reserved its cache)."""

    session_id: str
    cache_tokens_left: int

    @classmethod
    def from_header(cls, header: Any) -> OpenedReply:
        header = _reply_type(header, "opened")
        session_id = _reply_session_id(header)
        assert session_id is not None  # required=True
        return cls(session_id=session_id, cache_tokens_left=_reply_int(header, "cache_tokens_left"))


@dataclass(frozen=True)
class StepOutputReply:
    """One step's output on an inference stream (one tensor follows): ``record`` is the
    provider's signed step record, ``input_record`` the pusher's record of its input."""

    step_id: int
    position: int
    record: dict[str, Any]
    input_record: dict[str, Any] | None = None

    @classmethod
    def from_header(cls, header: Any) -> StepOutputReply:
        header = _reply_type(header, "output")
        record = _reply_map(header, "record", required=True)
        assert record is not None  # required=True
        return cls(
            step_id=_reply_int(header, "step_id"),
            position=_reply_int(header, "position", high=_MAX_INT),
            record=record,
            input_record=_reply_map(header, "input_record", required=False),
        )


@dataclass(frozen=True)
class RelinkedReply:
    session_id: str

    @classmethod
    def from_header(cls, header: Any) -> RelinkedReply:
        session_id = _reply_session_id(_reply_type(header, "relinked"))
        assert session_id is not None  # required=True
        return cls(session_id=session_id)


@dataclass(frozen=True)
class ReceiptReply:
    """A signed cumulative receipt on an inference stream (checked by the receipt collector)."""

    receipt: dict[str, Any]

    @classmethod
    def from_header(cls, header: Any) -> ReceiptReply:
        receipt = _reply_map(_reply_type(header, "receipt"), "receipt", required=True)
        assert receipt is not None  # required=True
        return cls(receipt=receipt)


StreamReply = StepOutputReply | RelinkedReply | ReceiptReply | ErrorReply
_STREAM_REPLIES: dict[str, Any] = {
    "output": StepOutputReply,
    "relinked": RelinkedReply,
    "receipt": ReceiptReply,
    "error": ErrorReply,
}


def parse_stream_reply(header: Any) -> StreamReply:
    """A message a provider sends on an open inference stream; any other type is a ProtocolError."""
    kind = header.get("type") if isinstance(header, dict) else None
    parser = _STREAM_REPLIES.get(kind) if isinstance(kind, str) else None
    if parser is None:
        raise ProtocolError(f"reply field 'type' must be one of {', '.join(_STREAM_REPLIES)}, got {kind!r}")
    reply: StreamReply = parser.from_header(header)
    return reply

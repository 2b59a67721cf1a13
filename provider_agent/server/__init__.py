"""The provider's RPC handlers: info, forward, backward, inference sessions and pushes.

Inference runs as a chain: the client opens a session on every provider of its route and
sends each step to the first one; each provider pushes its output straight to the next
provider's session (``hivemart.push``) and the last one answers the client. A generated
token therefore costs one network message per hop instead of a client round trip per hop.
Middle providers also return their outputs to the client when asked (``return_outputs``),
after the push, so the client keeps the history it needs to replay a span on a backup.
Every step's output travels with a signed step record (``hivemart_core.protocol.commitments``):
a push whose record is not the pusher's, about that very tensor, is refused, and the record
of an accepted push goes back to the client with the output computed from it, so that a
provider pushing one thing and returning another is the one blamed.

Every request is validated before it touches a tensor; a bad request gets an error reply
and the server keeps serving everyone else. A framing error closes only that stream.

One idea a module, each a part of :class:`ProviderServer` (composed in ``lifecycle``):

    core        the server's state and the stream plumbing every RPC uses (quotas, replies)
    checks      request checks: span, shapes, dtypes, finite values, accepting work
    span_rpcs   forward and backward
    adapters    LoRA adapters of fine-tuning jobs
    sessions    inference sessions: cache bookkeeping, steps, receipts and acks
    relay       pushes between providers, and the errors the next one reports
    lifecycle   start, stop, drain, info: the RPCs registered, the parts composed
    state       what is kept about a session (shared by sessions and relay)
    batching    decode steps of concurrent sessions gathered into one batched forward (used by core)

Each part sees only ``core`` and the parts below it; the one call upwards (a session's step
pushed on by the relay) is an abstract method, so no module imports one above it.
"""

from provider_agent.server.lifecycle import ProviderServer
from provider_agent.server.state import Delivered, Session

__all__ = ["Delivered", "ProviderServer", "Session"]

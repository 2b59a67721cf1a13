"""The scheduler's orchestration: read marketplace rows, run the pure algorithms, write
through the marketplace's services. Celery tasks (``scheduler.tasks``) are thin wrappers
around these functions; tests call them directly. One module per task family:

- ``offers``: offers and job requests in the matcher's terms, the figures trusted, and the
  helpers planning and replanning share;
- ``planning``: matching pending jobs (``job_match``, ``jobs_match_pending``);
- ``replanning``: replacing a failed provider's segments (``job_replan``);
- ``housekeeping``: stale providers, jobs idle past their deadlines;
- ``probes``: measuring and checking providers through the swarm;
- ``settlement``: the settlement sweep (the marketplace pays);
- ``audits``: deciding audits with the platform validator (its per-process checkpoint cache);
- ``placement``: the span a joining provider should serve.

Only ``offers`` is imported by the others. Code in this repository imports the module it
needs; the names below are re-exported for tests and scripts (``services.job_match``).
The validator cache (``audits._validators``) is module state of ``audits`` alone.
"""

from scheduler.services.audits import audit_decide, audits_open, validator_references
from scheduler.services.housekeeping import holds_expire, providers_expire
from scheduler.services.offers import (
    UNKNOWN_LATENCY_MS,
    UNKNOWN_THROUGHPUT,
    job_request,
    matching_offer,
    offers_for_matching,
    reliability_floor,
)
from scheduler.services.placement import placement_suggest
from scheduler.services.planning import MatchOutcome, MatchRaced, job_match, jobs_match_pending
from scheduler.services.probes import (
    provider_is_degraded,
    provider_probe_record,
    providers_probe,
    providers_to_probe,
)
from scheduler.services.replanning import Replan, job_replan
from scheduler.services.settlement import receipts_settle

__all__ = [
    "UNKNOWN_LATENCY_MS",
    "UNKNOWN_THROUGHPUT",
    "reliability_floor",
    "matching_offer",
    "offers_for_matching",
    "job_request",
    "MatchOutcome",
    "MatchRaced",
    "job_match",
    "jobs_match_pending",
    "Replan",
    "job_replan",
    "providers_expire",
    "holds_expire",
    "providers_to_probe",
    "provider_probe_record",
    "provider_is_degraded",
    "providers_probe",
    "receipts_settle",
    "validator_references",
    "audit_decide",
    "audits_open",
    "placement_suggest",
]

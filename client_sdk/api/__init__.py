"""The typed REST client for the Hivemart marketplace.

    from client_sdk.api import Client
    with Client(api_key="hm_...", base_url="https://market.example") as client:
        job = client.jobs.create(model="llama-8x512-3fa9c0d1e2b4", kind="inference",
                                 budget=5_000_000, max_price=2_000)

Importing this package imports httpx and nothing heavier: no torch, hivemind or Django.
Errors are the :class:`~client_sdk.errors.APIError` family from ``client_sdk.errors``,
re-exported here.
"""

from client_sdk.api.client import Client, SegmentPlan, Signer
from client_sdk.api.types import (
    Account,
    ApiKey,
    Audit,
    CatalogModel,
    Challenge,
    CreatedApiKey,
    FinishResult,
    Hold,
    HoldSummary,
    Job,
    JobTicketEntry,
    JobTransition,
    Measurement,
    Offence,
    Offer,
    Page,
    Plan,
    PlanBackup,
    PlanSegment,
    PlatformInfo,
    Posting,
    Provider,
    ReceiptResult,
    Settlement,
    SignupResult,
    StoredReceipt,
    Transaction,
    TransactionLeg,
    User,
)
from client_sdk.errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AuthenticationError,
    ConflictError,
    InsufficientCreditsError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    ValidationError,
)

__all__ = [
    "Client", "SegmentPlan", "Signer",
    "Account", "ApiKey", "CatalogModel", "Challenge", "CreatedApiKey", "Hold", "HoldSummary", "Job", "JobTransition",
    "Measurement", "Offer", "Page", "Plan", "PlanBackup", "PlanSegment", "Posting", "Provider", "SignupResult",
    "Transaction", "TransactionLeg", "User", "Audit", "FinishResult", "JobTicketEntry", "PlatformInfo",
    "ReceiptResult", "Settlement", "StoredReceipt", "Offence",
    "APIError", "APIConnectionError", "APITimeoutError", "AuthenticationError", "ConflictError",
    "InsufficientCreditsError", "NotFoundError", "PermissionDeniedError", "RateLimitError", "ServerError",
    "ValidationError",
]

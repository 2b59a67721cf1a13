"""The typed REST client for the Hivemart marketplace, as SDK users import it.

    from client_sdk.api import Client
    with Client(api_key="hm_...", base_url="https://market.example") as client:
        job = client.jobs.create(model="llama-8x512-3fa9c0d1e2b4", kind="inference",
                                 budget=5_000_000, max_price=2_000)

The client is defined in :mod:`hivemart_core.api` because the provider agent talks to the
marketplace with it too; this module is its public name in the SDK.
"""

from hivemart_core.api import *  # noqa: F403 - the public names, listed in hivemart_core.api.__all__
from hivemart_core.api import __all__  # noqa: F401

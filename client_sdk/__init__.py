"""Hivemart client SDK: the REST client, the wire protocol, model loading and the swarm client.

Importing ``client_sdk`` is cheap: the REST client needs neither torch nor hivemind, and the
swarm and model modules import them only when used (``client_sdk.swarm``, ``client_sdk.models``).
"""

from client_sdk.errors import HivemartError

__all__ = ["HivemartError"]
__version__ = "0.1.0"

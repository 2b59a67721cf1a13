"""The SDK's error tree, as SDK users import it: everything the SDK raises on purpose derives
from :class:`HivemartError`. Defined in :mod:`hivemart_core.errors`, which the provider agent
and the marketplace share."""

from hivemart_core.errors import *  # noqa: F403 - the public names, listed in hivemart_core.errors.__all__
from hivemart_core.errors import __all__  # noqa: F401

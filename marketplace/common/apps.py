from django.apps import AppConfig


class CommonConfig(AppConfig):
    name = "marketplace.common"
    label = "common"
    verbose_name = "Hivemart common"

    def ready(self) -> None:
        # Registers the OpenAPI description of the API-key authentication.
        from marketplace.common import (
            converters,
            schema,  # noqa: F401
        )

        converters.register()  # <id:...> in every app's URLconf

"""``azureml.core.authentication``, for ``from labrun.authentication import InteractiveLoginAuthentication``.

A labrun agent knows who you are from the Unix socket (your uid), so there is nothing to log in to:
these classes accept Azure ML's arguments and are accepted by ``Workspace(..., auth=...)``, and that
is all they do.
"""

from __future__ import annotations


class AbstractAuthentication:
    def __init__(self, *args, **kwargs):
        pass

    def get_authentication_header(self) -> dict:
        return {}


class InteractiveLoginAuthentication(AbstractAuthentication):
    pass


class ServicePrincipalAuthentication(AbstractAuthentication):
    pass


class MsiAuthentication(AbstractAuthentication):
    pass


class AzureCliAuthentication(AbstractAuthentication):
    pass


__all__ = ["AbstractAuthentication", "AzureCliAuthentication", "InteractiveLoginAuthentication", "MsiAuthentication",
           "ServicePrincipalAuthentication"]

"""Exceptions, named as in Azure ML SDK v1 so existing ``except`` clauses keep working.

- ``AzureMLException`` (alias ``LabrunException``)
    - ``UserErrorException``: a mistake in what the caller asked for.
        - ``RunConfigurationException``, ``SnapshotException``, ``RunEnvironmentException``
    - ``ExperimentExecutionException``: a submit that could not go through.
    - ``ActivityFailedException``: ``wait_for_completion`` saw the run end ``Failed``.
    - ``ActivityCanceledException``
    - ``AgentUnavailable``: no agent answers on the socket.
        - ``AgentAccessDenied``: the system agent answers, but not to this user (ask for its group).
        - ``AgentUntrusted``: what answers is not root's nor the user's: refused before anything is sent.

Errors the agent returns are ``labrun.protocol.AgentError`` subclasses
(``BadRequest``, ``NotFound``, ``Forbidden``, ...), re-exported here.
"""

from labrun.protocol._errors import (  # noqa: F401  (re-exported)
    AgentError, BadRequest, Conflict, Forbidden, NotFound, TooLarge, Unavailable,
)


class AzureMLException(Exception):
    def __init__(self, exception_message: str = "", **kwargs):
        super().__init__(exception_message)
        self.message = exception_message


LabrunException = AzureMLException


class UserErrorException(AzureMLException):
    pass


class RunConfigurationException(UserErrorException):
    pass


class SnapshotException(UserErrorException):
    pass


class RunEnvironmentException(UserErrorException):
    pass


class ExperimentExecutionException(AzureMLException):
    pass


class ActivityFailedException(AzureMLException):
    def __init__(self, error_details: str = ""):
        super().__init__(f"Activity Failed:\n{error_details}")
        self.error_details = error_details


class ActivityCanceledException(AzureMLException):
    def __init__(self, message: str = "Activity Canceled"):
        super().__init__(message)


class AgentUnavailable(AzureMLException):
    """No labrun agent answers, and none could be started."""


class AgentAccessDenied(AgentUnavailable):
    """The machine's agent is there, but this user may not use it (not in its socket's group)."""


class AgentUntrusted(AgentUnavailable):
    """Something answers on the socket, but not an agent this user can trust (wrong owner or directory)."""

"""Run status strings (Azure ML's) and the sets the agent and clients reason with.

::

    Queued -> Preparing -> Starting -> Running -> Finalizing -> Completed | Failed
       \\__________\\___________\\__________\\
                                          any non-terminal -> CancelRequested -> Canceled
"""

QUEUED = "Queued"
PREPARING = "Preparing"
STARTING = "Starting"
RUNNING = "Running"
FINALIZING = "Finalizing"
CANCEL_REQUESTED = "CancelRequested"
COMPLETED = "Completed"
FAILED = "Failed"
CANCELED = "Canceled"

STATUSES = (QUEUED, PREPARING, STARTING, RUNNING, FINALIZING, CANCEL_REQUESTED, COMPLETED, FAILED, CANCELED)
TERMINAL = frozenset({COMPLETED, FAILED, CANCELED})
ACTIVE = frozenset({PREPARING, STARTING, RUNNING, FINALIZING, CANCEL_REQUESTED})

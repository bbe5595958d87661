"""Constants the thin client needs without loading the validators."""

import re

EXPERIMENT_NAME_RE = re.compile(r"^[a-zA-Z0-9][\w\-]{0,254}$")
MAX_DURATION_SECONDS_DEFAULT = 2592000
# Open files one blob_fds frame passes: the kernel's limit per message (SCM_MAX_FD) is 253.
MAX_FDS_PER_MESSAGE = 253

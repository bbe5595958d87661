"""Constants the thin client needs without loading the validators."""

import re

EXPERIMENT_NAME_RE = re.compile(r"^[a-zA-Z0-9][\w\-]{0,254}$")
MAX_DURATION_SECONDS_DEFAULT = 2592000

"""The largest labels and names the protocol accepts; an agent's ``[limits]`` may lower them.

Azure ML holds experiment names to 255 characters; tag and property keys follow
the same bound here, and values to 4 KiB, so one run's labels stay a small part of
any reply that lists runs.
"""

LABEL_KEY_MAX = 255
LABEL_VALUE_MAX = 4096
DISPLAY_NAME_MAX = 1024
DESCRIPTION_MAX = 4096

"""labrun's wire protocol, shared by the agent and the clients.

Pure: the standard library and msgpack only. ``PROTOCOL.md`` beside this file is
the language-neutral specification; the golden tests pin its bytes.
"""

from ._errors import (
    ERROR_CODES as ERROR_CODES,
    AgentError as AgentError,
    BadRequest as BadRequest,
    Conflict as Conflict,
    Forbidden as Forbidden,
    FrameCorrupt as FrameCorrupt,
    FrameTooLarge as FrameTooLarge,
    NotFound as NotFound,
    ProtocolError as ProtocolError,
    TooLarge as TooLarge,
    Unavailable as Unavailable,
)
from ._framing import DEFAULT_MAX_FRAME as DEFAULT_MAX_FRAME, FrameDecoder as FrameDecoder, pack_frame as pack_frame
from ._messages import (
    STREAMING_OPS as STREAMING_OPS,
    Request as Request,
    parse_request as parse_request,
    reply_error as reply_error,
    reply_ok as reply_ok,
    request as request,
    request_id as request_id,
    stream_end as stream_end,
    stream_item as stream_item,
)
from ._schema import (
    EXPERIMENT_NAME_RE as EXPERIMENT_NAME_RE,
    MAX_DURATION_SECONDS_DEFAULT as MAX_DURATION_SECONDS_DEFAULT,
    OP_SCHEMAS as OP_SCHEMAS,
    validate_run_spec as validate_run_spec,
)
from ._statuses import ACTIVE as ACTIVE, STATUSES as STATUSES, TERMINAL as TERMINAL
from ._units import format_memory as format_memory, parse_duration as parse_duration, parse_memory as parse_memory
from ._paths import candidate_sockets as candidate_sockets, user_socket as user_socket, user_state_dir as user_state_dir
from ._version import PROTOCOL_VERSION as PROTOCOL_VERSION, __version__ as __version__

__all__ = [
    "ACTIVE", "DEFAULT_MAX_FRAME", "ERROR_CODES", "EXPERIMENT_NAME_RE", "MAX_DURATION_SECONDS_DEFAULT",
    "OP_SCHEMAS", "PROTOCOL_VERSION", "STATUSES", "STREAMING_OPS", "TERMINAL", "AgentError", "BadRequest",
    "Conflict", "Forbidden", "FrameCorrupt", "FrameDecoder", "FrameTooLarge", "NotFound", "ProtocolError",
    "Request", "TooLarge", "Unavailable", "__version__", "format_memory", "pack_frame", "parse_duration",
    "parse_memory", "parse_request", "reply_error", "reply_ok", "request", "request_id", "stream_end",
    "stream_item", "validate_run_spec", "candidate_sockets", "user_socket", "user_state_dir",
]

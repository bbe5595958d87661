"""labrun's wire protocol, shared by the agent and the clients.

Pure: the standard library and msgpack only. ``PROTOCOL.md`` beside this file is the
language-neutral specification; the golden tests pin its bytes. Names load on first use, so a
client that only sends frames never pays for the validators.
"""

from ._lazy import lazy_exports

_EXPORTS = {
    "ERROR_CODES": "._errors", "AgentError": "._errors", "BadRequest": "._errors", "Conflict": "._errors",
    "Forbidden": "._errors", "FrameCorrupt": "._errors", "FrameTooLarge": "._errors", "NotFound": "._errors",
    "ProtocolError": "._errors", "TooLarge": "._errors", "Unavailable": "._errors",
    "DEFAULT_MAX_FRAME": "._framing", "FrameDecoder": "._framing", "pack_frame": "._framing",
    "STREAMING_OPS": "._messages", "Request": "._messages", "parse_request": "._messages",
    "reply_error": "._messages", "reply_ok": "._messages", "request": "._messages", "request_id": "._messages",
    "stream_end": "._messages", "stream_item": "._messages",
    "EXPERIMENT_NAME_RE": "._constants", "MAX_DURATION_SECONDS_DEFAULT": "._constants",
    "OP_SCHEMAS": "._schema", "validate_run_spec": "._schema",
    "ACTIVE": "._statuses", "STATUSES": "._statuses", "TERMINAL": "._statuses",
    "format_memory": "._units", "parse_duration": "._units", "parse_memory": "._units", "parse_array": "._units",
    "candidate_sockets": "._paths", "user_socket": "._paths", "user_state_dir": "._paths",
    "PROTOCOL_VERSION": "._version", "__version__": "._version",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

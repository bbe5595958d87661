"""Version numbers: the package's and the wire protocol's."""

__version__ = "0.1.0"

# Bumped on any incompatible change to frames, envelopes or an op's arguments.
# Peers with a different major refuse each other in `hello`.
PROTOCOL_VERSION = 1

"""Who is on the other end of a connection: SO_PEERCRED, resolved to a user and groups."""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass

_UCRED = struct.Struct("3i")


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    user: str
    groups: tuple[int, ...]
    admin: bool

    def may_manage(self, owner_uid: int) -> bool:
        """The owner, root and the admin group may cancel a run and read its logs and environment."""
        return self.admin or self.uid == owner_uid


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    return _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))


def resolve_peer(pid: int, uid: int, gid: int, admin_group: str | None) -> Peer:
    try:
        user = pwd.getpwuid(uid).pw_name
        groups = tuple(os.getgrouplist(user, gid))
    except KeyError:
        user, groups = str(uid), (gid,)
    admin = uid == 0 or uid == os.geteuid()
    if not admin and admin_group:
        try:
            admin = grp.getgrnam(admin_group).gr_gid in groups
        except KeyError:
            pass
    return Peer(pid=pid, uid=uid, gid=gid, user=user, groups=groups, admin=admin)

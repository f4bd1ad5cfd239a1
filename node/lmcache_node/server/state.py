"""Server-side sessions (one per client routing id) and the KV registrations they own.

A session belongs to the identity that opened it (the client's CURVE key, or "" on an
unauthenticated loopback server): a request from another identity under the same routing
id never touches it (``IdentityMismatch``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

import torch

from lmcache_node.transfer.layout import KVGeometry
from lmcache_node.transfer.shm import ShmDirectory

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Registration:
    registration_id: int
    session_id: str
    worker_id: int
    layout: str
    device: str
    transfer_mode: str
    geometry: KVGeometry
    mapped: list[torch.Tensor] = field(repr=False)  # keeps the segments mapped
    shm_names: list[str] = field(default_factory=list)  # the worker's segments
    staging: torch.Tensor | None = field(default=None, repr=False)
    staging_name: str = ""
    staging_chunks: int = 0
    staging_lock_fd: int = -1
    event: object | None = field(default=None, repr=False)  # CUDA interprocess event
    shm_dir: ShmDirectory | None = field(default=None, repr=False)  # where shm_names live
    active: int = 0  # requests using it right now
    closed: bool = False
    model_name: str = ""  # the worker's key namespace, published to routers
    key_seed: bytes = b""

    def release(self, *, unlink_worker_segments: bool) -> None:
        """Drop the mappings; remove the staging area and, for a dead worker, its segments."""
        self.mapped.clear()
        self.staging = None
        if self.staging_name and self.shm_dir is not None:
            self.shm_dir.unlink(self.staging_name)
        if self.staging_lock_fd >= 0:
            os.close(self.staging_lock_fd)
            self.staging_lock_fd = -1
        if unlink_worker_segments and self.shm_dir is not None:
            for name in self.shm_names:
                if self.shm_dir.unlink_if_unheld(name):
                    log.info("removed shared memory %s of a dead worker", name)


class IdentityMismatch(Exception):  # noqa: N818 - a refusal, reported as ``forbidden``
    def __init__(self) -> None:
        super().__init__(
            "this routing id belongs to a session of another client identity: a session is "
            "used only by the credentials that opened it"
        )


@dataclass(eq=False)
class Session:
    session_id: str  # hex of the routing id
    routing_id: bytes
    pid: int
    hostname: str
    last_seen: float
    identity: str = ""  # CURVE public key (Z85) of the client; "" when unauthenticated
    registrations: dict[int, Registration] = field(default_factory=dict)


class SessionTable:
    """Thread-safe map of sessions and registrations."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._sessions: dict[bytes, Session] = {}
        self._registrations: dict[int, Registration] = {}
        self._next_id = 1

    def touch(self, routing_id: bytes, identity: str = "") -> Session | None:
        """The session of ``routing_id``, marked alive; ``IdentityMismatch`` if another
        identity owns it (then it is left as it was)."""
        with self._mutex:
            session = self._sessions.get(routing_id)
            if session is not None:
                if session.identity != identity:
                    raise IdentityMismatch
                session.last_seen = time.monotonic()
            return session

    def open(
        self, routing_id: bytes, pid: int, hostname: str, identity: str = ""
    ) -> tuple[Session, Session | None]:
        """Start a session; returns it and the one it replaces (same client, re-handshake)."""
        session = Session(
            routing_id.hex(), routing_id, pid, hostname, time.monotonic(), identity=identity
        )
        with self._mutex:
            current = self._sessions.get(routing_id)
            if current is not None and current.identity != identity:
                raise IdentityMismatch
            old = self._sessions.pop(routing_id, None)
            if old is not None:
                for reg_id in old.registrations:
                    self._registrations.pop(reg_id, None)
            self._sessions[routing_id] = session
        return session, old

    def close(self, session: Session) -> bool:
        """Forget ``session`` (not a newer one of the same client); False if already gone."""
        with self._mutex:
            if self._sessions.get(session.routing_id) is not session:
                return False
            del self._sessions[session.routing_id]
            for reg_id in session.registrations:
                self._registrations.pop(reg_id, None)
            return True

    def add_registration(
        self, session: Session, make: type[Registration], **kwargs: object
    ) -> Registration:
        with self._mutex:
            reg_id = self._next_id
            self._next_id += 1
            registration = make(registration_id=reg_id, session_id=session.session_id, **kwargs)  # type: ignore[arg-type]
            session.registrations[reg_id] = registration
            self._registrations[reg_id] = registration
            return registration

    def acquire(self, session: Session, reg_id: int) -> Registration | None:
        """The session's registration, marked in use; release with ``done``."""
        with self._mutex:
            registration = session.registrations.get(reg_id)
            if registration is None or registration.closed:
                return None
            registration.active += 1
            return registration

    def done(self, registration: Registration) -> bool:
        """Mark a use finished; True when the registration was closed meanwhile and is idle."""
        with self._mutex:
            registration.active -= 1
            return registration.closed and registration.active == 0

    def remove_registration(self, session: Session, reg_id: int) -> Registration | None:
        with self._mutex:
            registration = session.registrations.pop(reg_id, None)
            if registration is not None:
                self._registrations.pop(reg_id, None)
                registration.closed = True
            return registration

    def close_registration(self, registration: Registration) -> bool:
        """Mark closed; True when nobody uses it (release now), else the last user releases."""
        with self._mutex:
            registration.closed = True
            return registration.active == 0

    def expired(self, timeout: float) -> list[Session]:
        cutoff = time.monotonic() - timeout
        with self._mutex:
            return [s for s in self._sessions.values() if s.last_seen < cutoff]

    def sessions(self) -> list[Session]:
        with self._mutex:
            return list(self._sessions.values())

    def registrations(self) -> list[Registration]:
        with self._mutex:
            return list(self._registrations.values())

    def count(self) -> int:
        with self._mutex:
            return len(self._sessions)

    def owner_of(self, reg_id: int) -> str | None:
        """The session id holding registration ``reg_id``, or None."""
        with self._mutex:
            registration = self._registrations.get(reg_id)
            return None if registration is None else registration.session_id

    def registration_count(self) -> int:
        with self._mutex:
            return len(self._registrations)

"""Security of the request socket: CURVE with a ZAP handler, or plain on loopback only.

With credentials the ROUTER is a CURVE server: pyzmq's ``ThreadAuthenticator`` answers
libzmq's ZAP requests from the allowed client keys, and ``ZAP_ENFORCE_DOMAIN`` makes
libzmq refuse every client when no handler answers (fail closed). Each message then
carries the client's public key as its ZAP ``User-Id``; sessions belong to it. Without
credentials the server binds loopback only, unless the operator of the server accepts
the risk explicitly (``insecure_allow_unauthenticated``).
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field

import zmq
from zmq.auth.thread import ThreadAuthenticator

from lmcache_node.config import NodeConfig
from lmcache_node.protocol.credentials import (
    AllowedClientKeys,
    CredentialsError,
    ServerCredentials,
    fingerprint,
)

log = logging.getLogger(__name__)

ZAP_DOMAIN = "lmcache-node"


class TransportSecurityError(ValueError):
    """The server cannot start safely; the message names the missing credential and the fix."""


def is_loopback(host: str) -> bool:
    name = host.strip().strip("[]").lower()
    if name in ("localhost", "ip6-localhost", "ip6-loopback"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a host name or a wildcard: reachable from elsewhere


@dataclass
class Transport:
    server: ServerCredentials | None
    allowed: AllowedClientKeys | None
    insecure: bool = False
    _authenticator: ThreadAuthenticator | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_config(cls, config: NodeConfig) -> Transport:
        given = {
            "curve_server_key": config.curve_server_key,
            "curve_client_keys": config.curve_client_keys,
        }
        if any(given.values()):
            missing = [f"--{k.replace('_', '-')}" for k, v in given.items() if not v]
            if missing:
                raise TransportSecurityError(
                    f"CURVE needs both --curve-server-key and --curve-client-keys; "
                    f"{' and '.join(missing)} is missing"
                )
            try:
                server = ServerCredentials.from_file(str(config.curve_server_key))
                allowed = AllowedClientKeys.from_file(str(config.curve_client_keys))
            except CredentialsError as exc:
                raise TransportSecurityError(str(exc)) from None
            return cls(server, allowed)
        if is_loopback(config.host):
            return cls(None, None)
        if config.insecure_allow_unauthenticated:
            log.warning(
                "SERVING %s:%d WITHOUT AUTHENTICATION (--insecure-allow-unauthenticated): "
                "anyone who reaches this port can read, write and clear the cache",
                config.host,
                config.port,
            )
            return cls(None, None, insecure=True)
        raise TransportSecurityError(
            f"refusing to serve {config.host}:{config.port} without credentials: anyone who "
            "reaches the port could read and write the cache. Give --curve-server-key FILE "
            "and --curve-client-keys FILE (LMCACHE_CURVE_SERVER_KEY, LMCACHE_CURVE_CLIENT_KEYS; "
            "`lmcache-node keys generate DIR` makes them), bind a loopback address "
            "(--host 127.0.0.1), or accept the risk with --insecure-allow-unauthenticated"
        )

    @property
    def authenticated(self) -> bool:
        return self.server is not None

    def describe(self) -> str:
        if self.server is not None and self.allowed is not None:
            return (
                f"CURVE, server key {fingerprint(self.server.public_key)}, "
                f"{len(self.allowed.keys())} allowed client key(s)"
            )
        return "UNAUTHENTICATED (insecure)" if self.insecure else "unauthenticated, loopback"

    def secure(self, context: zmq.Context[zmq.Socket[bytes]], socket: zmq.Socket[bytes]) -> None:
        """Make ``socket`` (not yet bound) a CURVE server checked by our ZAP handler."""
        if self.server is None or self.allowed is None:
            return
        authenticator = ThreadAuthenticator(context, log=logging.getLogger(f"{__name__}.zap"))
        authenticator.start()
        authenticator.configure_curve_callback(ZAP_DOMAIN, credentials_provider=self.allowed)
        self._authenticator = authenticator
        socket.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no handler answering: nobody gets in
        socket.zap_domain = ZAP_DOMAIN.encode()
        self.server.apply(socket)

    def identity(self, frame: zmq.Frame) -> str:
        """The authenticated client key of the connection ``frame`` came on ("" without)."""
        if self.server is None:
            return ""
        try:
            return str(frame.get("User-Id"))
        except zmq.ZMQError:
            return ""

    def close(self) -> None:
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None

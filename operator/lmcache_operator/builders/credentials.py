"""The per-cluster credentials as Kubernetes objects: two Secrets and a public-key ConfigMap.

- ``<cluster>-cache-credentials`` (the cache pods): ``server.key`` (CURVE secret key),
  ``http.token`` (bearer token of the HTTP admin endpoints), ``remote.key`` (the remote
  tier's secret).
- ``<cluster>-client-credentials`` (the vLLM pods): ``client.key``, ``client.pub``,
  ``server.pub`` (the directory ``LMCACHE_NODE_CREDENTIALS_DIR`` names).
- ``<cluster>-cache-keys`` (a ConfigMap: public keys are not secret): ``clients.pub`` (the
  allowed client keys, one ``KEY label`` per line; the servers re-read it when it changes)
  and ``server.pub``.

Pure functions: key material in, objects out. Generating keys is the controller's job.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from lmcache_operator.api.common import GROUP
from lmcache_operator.builders.common import CLUSTER_LABEL, standard_labels

CREDENTIALS_DIR = "/var/run/lmcache/credentials"
KEYS_DIR = "/var/run/lmcache/keys"
CLIENT_DIR = "/var/run/lmcache/client"
SECRET_FILE_MODE = 0o440  # owner root, group: the pod's fsGroup
KEY_CHARS = 40  # a Z85 CURVE key

SERVER_KEY = "server.key"
HTTP_TOKEN = "http.token"  # noqa: S105 - a file name
REMOTE_KEY = "remote.key"
CLIENT_KEY = "client.key"
CLIENT_PUB = "client.pub"
SERVER_PUB = "server.pub"
CLIENTS_PUB = "clients.pub"

CACHE_CREDENTIALS_VOLUME = "credentials"
KEYS_VOLUME = "keys"
CLIENT_CREDENTIALS_VOLUME = "lmcache-client-credentials"

ROTATE_ANNOTATION = f"{GROUP}/rotate-keys"
CLIENT_KEY_ANNOTATION = f"{GROUP}/client-key"  # vLLM pod template: rolls them on a rotation
SERVER_KEY_ANNOTATION = f"{GROUP}/server-key"  # cache and vLLM pod templates
COMPONENT = "credentials"
APP_NAME = "lmcache-node"


def cache_secret_name(cluster: str) -> str:
    return f"{cluster}-cache-credentials"


def client_secret_name(cluster: str) -> str:
    return f"{cluster}-client-credentials"


def keys_configmap_name(cluster: str) -> str:
    return f"{cluster}-cache-keys"


def fingerprint(public_key: str) -> str:
    """A short, non-secret name of a public key: its first 8 characters, as the node logs it."""
    return public_key[:8]


@dataclass(frozen=True)
class ServerMaterial:
    """What the cache Secret holds (secret) and the public key derived from it."""

    server_secret: str
    server_public: str
    http_token: str
    remote_key: str


@dataclass(frozen=True)
class ClientMaterial:
    client_secret: str
    client_public: str


@dataclass(frozen=True)
class AllowedKey:
    """A client public key the servers accept, with a label for the key file."""

    public_key: str
    label: str


def _labels(cluster: str) -> dict[str, str]:
    return {**standard_labels(cluster, APP_NAME, COMPONENT), CLUSTER_LABEL: cluster}


def _secret(name: str, namespace: str, cluster: str, data: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace, "labels": _labels(cluster)},
        "type": "Opaque",
        "stringData": data,
    }


def build_cache_secret(cluster: str, namespace: str, server: ServerMaterial) -> dict[str, Any]:
    return _secret(
        cache_secret_name(cluster),
        namespace,
        cluster,
        {
            SERVER_KEY: server.server_secret + "\n",
            HTTP_TOKEN: server.http_token + "\n",
            REMOTE_KEY: server.remote_key + "\n",
        },
    )


def client_secret_data(client: ClientMaterial) -> dict[str, str]:
    """The client Secret's client keys (a rotation patches these, leaving server.pub)."""
    return {CLIENT_KEY: client.client_secret + "\n", CLIENT_PUB: client.client_public + "\n"}


def build_client_secret(
    cluster: str, namespace: str, client: ClientMaterial, server_public: str
) -> dict[str, Any]:
    data = {**client_secret_data(client), SERVER_PUB: server_public + "\n"}
    return _secret(client_secret_name(cluster), namespace, cluster, data)


def clients_pub_text(keys: Sequence[AllowedKey]) -> str:
    """The servers' allowed-keys file: ``KEY label`` per line."""
    return "".join(f"{key.public_key} {key.label}\n" for key in keys)


def build_keys_configmap(
    cluster: str, namespace: str, server_public: str, allowed: Sequence[AllowedKey]
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": keys_configmap_name(cluster),
            "namespace": namespace,
            "labels": _labels(cluster),
        },
        "data": {CLIENTS_PUB: clients_pub_text(allowed), SERVER_PUB: server_public + "\n"},
    }


def cache_volumes(cluster: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The cache pod's credential volumes and mounts (directories: both update in place)."""
    volumes = [
        {
            "name": CACHE_CREDENTIALS_VOLUME,
            "secret": {"secretName": cache_secret_name(cluster), "defaultMode": SECRET_FILE_MODE},
        },
        {"name": KEYS_VOLUME, "configMap": {"name": keys_configmap_name(cluster)}},
    ]
    mounts = [
        {"name": CACHE_CREDENTIALS_VOLUME, "mountPath": CREDENTIALS_DIR, "readOnly": True},
        {"name": KEYS_VOLUME, "mountPath": KEYS_DIR, "readOnly": True},
    ]
    return volumes, mounts


def client_volume(cluster: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The vLLM pod's client credentials volume and its mount."""
    volume = {
        "name": CLIENT_CREDENTIALS_VOLUME,
        "secret": {"secretName": client_secret_name(cluster), "defaultMode": SECRET_FILE_MODE},
    }
    mount = {"name": CLIENT_CREDENTIALS_VOLUME, "mountPath": CLIENT_DIR, "readOnly": True}
    return volume, mount


def node_credential_config(cluster: str, namespace: str, *, remote: bool) -> dict[str, Any]:
    """The node config keys naming the mounted files (docs/security.md)."""
    config: dict[str, Any] = {
        "curve_server_key": f"{CREDENTIALS_DIR}/{SERVER_KEY}",
        "curve_client_keys": f"{KEYS_DIR}/{CLIENTS_PUB}",
        "http_token_file": f"{CREDENTIALS_DIR}/{HTTP_TOKEN}",
    }
    if remote:
        config["remote_secret_file"] = f"{CREDENTIALS_DIR}/{REMOTE_KEY}"
        config["remote_key_prefix"] = f"{namespace}/{cluster}"
    return config


@dataclass(frozen=True)
class PublicKeys:
    """The public halves the cluster's children are built from (its status keeps them)."""

    server_public: str
    allowed: tuple[AllowedKey, ...]
    consumer_key: str = ""  # fingerprint of the client key vLLM pods are rolled to


# ---- what status.credentials records (the operator's memory of keys it cannot read back) --

ACTIVE, RETIRING = "active", "retiring"
PROPAGATING, ROLLING, COMPLETED = "Propagating", "RollingConsumers", "Completed"


@dataclass(frozen=True)
class ClientKey:
    public_key: str
    state: str  # ACTIVE or RETIRING
    created_at: str = ""


@dataclass(frozen=True)
class Rotation:
    phase: str  # PROPAGATING, ROLLING or COMPLETED
    requested: str  # the lmcache.dev/rotate-keys value it answers
    started_at: str = ""
    completed_at: str = ""
    message: str = ""


@dataclass(frozen=True)
class KeyState:
    """The public side of a cluster's credentials, kept in its status."""

    server_public: str
    client_keys: tuple[ClientKey, ...]
    consumer_key: str  # fingerprint of the client key the VLLMDeployments roll to
    generated_at: str = ""
    rotation: Rotation | None = None

    @property
    def active(self) -> ClientKey:
        return next(k for k in reversed(self.client_keys) if k.state == ACTIVE)

    def public_keys(self) -> PublicKeys:
        allowed = tuple(
            AllowedKey(k.public_key, f"{k.state}-{k.created_at or 'unknown'}")
            for k in self.client_keys
        )
        return PublicKeys(self.server_public, allowed, self.consumer_key)

    def with_rotation(self, rotation: Rotation | None) -> KeyState:
        return replace(self, rotation=rotation)

    def to_status(self, cluster: str) -> dict[str, Any]:
        """status.credentials (camelCase, as stored)."""
        status: dict[str, Any] = {
            "cacheSecret": cache_secret_name(cluster),
            "clientSecret": client_secret_name(cluster),
            "keysConfigMap": keys_configmap_name(cluster),
            "serverKey": {
                "publicKey": self.server_public,
                "fingerprint": fingerprint(self.server_public),
            },
            "clientKeys": [
                {
                    "publicKey": k.public_key,
                    "fingerprint": fingerprint(k.public_key),
                    "state": k.state,
                    "createdAt": k.created_at,
                }
                for k in self.client_keys
            ],
            "consumerKey": self.consumer_key,
            "generatedAt": self.generated_at,
        }
        if self.rotation is not None:
            rotation = self.rotation
            status["rotation"] = {
                "phase": rotation.phase,
                "requested": rotation.requested,
                "startedAt": rotation.started_at,
                "completedAt": rotation.completed_at,
                "message": rotation.message,
            }
        return status

    @classmethod
    def from_status(cls, status: Mapping[str, Any] | None) -> KeyState | None:
        """The state a status.credentials records; None when it records none (or garbage:
        the operator then makes new Secrets rather than trust keys it cannot check)."""
        if not status:
            return None
        try:
            server = str(status["serverKey"]["publicKey"])
            keys = tuple(
                ClientKey(str(k["publicKey"]), str(k["state"]), str(k.get("createdAt", "")))
                for k in status["clientKeys"]
            )
        except (KeyError, TypeError, AttributeError):
            return None
        if len(server) != KEY_CHARS or not any(k.state == ACTIVE for k in keys):
            return None
        if any(len(k.public_key) != KEY_CHARS or k.state not in (ACTIVE, RETIRING) for k in keys):
            return None
        rotation = None
        raw = status.get("rotation")
        if isinstance(raw, Mapping) and raw.get("phase") in (PROPAGATING, ROLLING, COMPLETED):
            rotation = Rotation(
                phase=str(raw["phase"]),
                requested=str(raw.get("requested", "")),
                started_at=str(raw.get("startedAt", "")),
                completed_at=str(raw.get("completedAt", "")),
                message=str(raw.get("message", "")),
            )
        active = next(k for k in reversed(keys) if k.state == ACTIVE)
        return cls(
            server_public=server,
            client_keys=keys,
            consumer_key=str(status.get("consumerKey") or fingerprint(active.public_key)),
            generated_at=str(status.get("generatedAt", "")),
            rotation=rotation,
        )


def public_keys_from_status(status: Mapping[str, Any] | None) -> PublicKeys | None:
    """What a VLLMDeployment needs of its cluster's status.credentials (None: not yet made)."""
    credentials = (status or {}).get("credentials")
    state = KeyState.from_status(credentials) if isinstance(credentials, Mapping) else None
    return state.public_keys() if state is not None else None

"""Per-cluster credentials: created once, checked, regenerated, rotated; never read back.

The operator may create, patch and delete Secrets, never get, list or watch them. So:

- it creates both Secrets with POST (409: they exist) and writes their public halves to
  ``status.credentials`` at once; that status is its memory (also across restarts and
  leader changes);
- public keys it does not know while the Secrets exist (a crash between create and status
  write), or one Secret of the pair gone (the periodic pass POSTs both: a 201 means it was
  missing), make it regenerate the pair as a unit: delete both, create both with new keys
  (the pods roll: the cache pods' template carries the server key, the vLLM pods' the
  client key);
- a rotation (annotation ``lmcache.dev/rotate-keys`` with a new value) patches a new client
  key into the client Secret, allows old and new (``clients.pub``, which the servers
  re-read), waits for that file to reach the cache pods, rolls the VLLMDeployments, and
  drops the old key once they have rolled and no other pod mounting the client Secret
  predates the rotation, or after ``spec.security.rotationGracePeriodSeconds``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any

import zmq

from lmcache_operator.api.common import API_VERSION
from lmcache_operator.api.lmcachecluster import KIND
from lmcache_operator.builders.common import owner_reference
from lmcache_operator.builders.credentials import (
    ACTIVE,
    COMPLETED,
    PROPAGATING,
    RETIRING,
    ROLLING,
    ROTATE_ANNOTATION,
    ClientKey,
    ClientMaterial,
    KeyState,
    Rotation,
    ServerMaterial,
    build_cache_secret,
    build_client_secret,
    cache_secret_name,
    client_secret_data,
    client_secret_name,
    fingerprint,
)
from lmcache_operator.builders.vllmdeployment import DEPLOYMENT_LABEL
from lmcache_operator.controllers.common import RetryLater, Settings
from lmcache_operator.controllers.consumers import unrolled_consumers
from lmcache_operator.controllers.queue import WorkQueue
from lmcache_operator.kube import KubeClient, KubeError
from lmcache_operator.metrics import OperatorMetrics
from lmcache_operator.state import Key, Views, cluster_ref, owner_key
from lmcache_operator.status import parse_rfc3339, rfc3339

logger = logging.getLogger(__name__)

KeyPair = Callable[[], tuple[str, str]]  # (public, secret), Z85
WallClock = Callable[[], float]  # seconds since the epoch (status timestamps)


def curve_keypair() -> tuple[str, str]:
    """A CURVE key pair from libzmq (pyzmq), as Z85 text."""
    public, secret = zmq.curve_keypair()
    return public.decode("ascii"), secret.decode("ascii")


class CredentialController:
    """The credentials of every LMCacheCluster this process reconciles."""

    def __init__(
        self,
        client: KubeClient,
        views: Views,
        metrics: OperatorMetrics,
        settings: Settings,
        changed: Callable[[Key], None],  # re-apply the cluster's children (keys moved)
        *,
        keypair: KeyPair = curve_keypair,
        wall: WallClock = time.time,
    ) -> None:
        self.client = client
        self.views = views
        self.metrics = metrics
        self.settings = settings
        self.changed = changed
        self.keypair = keypair
        self.wall = wall
        self._locks: dict[Key, asyncio.Lock] = {}
        self.rotations = WorkQueue("rotation", self.rotate, depth=metrics.queue_depth)

    def _lock(self, key: Key) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    def forget(self, key: Key) -> None:
        lock = self._locks.get(key)
        if lock is not None and not lock.locked():
            del self._locks[key]
        self.rotations.forget(key)

    def known(self, key: Key) -> KeyState | None:
        """The cluster's keys as this process knows them, else as its status records them."""
        view = self.views.clusters.get(key)
        if view is None:
            return None
        if view.credentials is None and view.body is not None:
            status = (view.body.get("status") or {}).get("credentials")
            view.credentials = KeyState.from_status(status if isinstance(status, dict) else None)
        return view.credentials

    # ---- creation and repair -----------------------------------------------------------

    def _material(self) -> tuple[ServerMaterial, ClientMaterial]:
        server_public, server_secret = self.keypair()
        client_public, client_secret = self.keypair()
        server = ServerMaterial(
            server_secret=server_secret,
            server_public=server_public,
            http_token=secrets.token_urlsafe(32),
            remote_key=secrets.token_hex(32),
        )
        return server, ClientMaterial(client_secret, client_public)

    async def _post(self, obj: dict[str, Any], owner: Mapping[str, Any]) -> bool:
        """Create ``obj`` owned by ``owner``; False when it exists (409)."""
        obj["metadata"]["ownerReferences"] = [owner_reference(owner)]
        try:
            await self.client.create(obj)
        except KubeError as exc:
            if exc.status == 409:
                return False
            raise
        return True

    async def _post_pair(
        self, key: Key, owner: Mapping[str, Any], server: ServerMaterial, client: ClientMaterial
    ) -> tuple[bool, bool]:
        namespace, name = key
        cache = build_cache_secret(name, namespace, server)
        client_secret = build_client_secret(name, namespace, client, server.server_public)
        return await self._post(cache, owner), await self._post(client_secret, owner)

    def _new_state(
        self, key: Key, server: ServerMaterial, client: ClientMaterial, message: str
    ) -> KeyState:
        now = rfc3339(self.wall())
        requested = self._requested(key)
        rotation = (  # a request made before these keys existed is answered by them
            Rotation(COMPLETED, requested, now, now, message) if requested else None
        )
        return KeyState(
            server_public=server.server_public,
            client_keys=(ClientKey(client.client_public, ACTIVE, now),),
            consumer_key=fingerprint(client.client_public),
            generated_at=now,
            rotation=rotation,
        )

    def _requested(self, key: Key) -> str:
        view = self.views.clusters.get(key)
        meta = (view.body or {}).get("metadata", {}) if view is not None else {}
        return str((meta.get("annotations") or {}).get(ROTATE_ANNOTATION) or "")

    async def ensure(self, key: Key, owner: Mapping[str, Any]) -> KeyState:
        """The cluster's keys: the known ones, else a new pair of Secrets."""
        async with self._lock(key):
            state = self.known(key)
            if state is not None:
                return state
            server, client = self._material()
            created = await self._post_pair(key, owner, server, client)
            if created != (True, True):  # Secrets whose public keys we do not know
                logger.warning(
                    "%s/%s: credential Secrets exist but their keys are not in the status: "
                    "generating a new pair", *key,
                )  # fmt: skip
                return await self._regenerate(key, owner, "keys unknown to the operator")
            state = self._new_state(key, server, client, "first keys")
            await self._store(key, state)
            logger.info("%s/%s: created the credential Secrets", *key)
            return state

    async def _regenerate(self, key: Key, owner: Mapping[str, Any], why: str) -> KeyState:
        """Delete both Secrets and create both with new keys (the caller holds the lock)."""
        namespace, name = key
        for secret in (cache_secret_name(name), client_secret_name(name)):
            await self.client.delete("v1", "Secret", namespace, secret)
            self.metrics.children_repaired.labels(kind="Secret").inc()
        server, client = self._material()
        if await self._post_pair(key, owner, server, client) != (True, True):
            raise RetryLater(f"{namespace}/{name}: a credential Secret reappeared", delay=2)
        state = self._new_state(key, server, client, f"new keys: {why}")
        await self._store(key, state)
        logger.info("%s/%s: regenerated the credential Secrets (%s)", namespace, name, why)
        self.changed(key)
        return state

    async def check(self, key: Key) -> None:
        """Both Secrets still there? A POST answers without reading them (409: yes)."""
        view = self.views.clusters.get(key)
        if view is None or view.body is None or view.applied is None or view.applied.problems:
            return
        owner = {"apiVersion": API_VERSION, "kind": KIND, "metadata": view.body["metadata"]}
        async with self._lock(key):
            if self.known(key) is None:
                return  # the next reconcile creates them
            server, client = self._material()
            created = await self._post_pair(key, owner, server, client)
            if created == (False, False):
                return
            names = [n for n, c in zip(("cache", "client"), created, strict=True) if c]
            logger.info("%s/%s: the %s credential Secret was missing", *key, " and ".join(names))
            if created == (True, True):  # both gone: the new pair is whole
                self.metrics.children_repaired.labels(kind="Secret").inc(2)
                await self._store(key, self._new_state(key, server, client, "both Secrets gone"))
                self.changed(key)
                return
            await self._regenerate(key, owner, f"the {names[0]} Secret was deleted")

    async def _store(self, key: Key, state: KeyState) -> None:
        """Remember ``state`` and write it to the status at once (the operator's memory)."""
        self.views.cluster(key).credentials = state
        credentials = state.to_status(key[1])
        credentials.setdefault("rotation", None)  # merge patch: remove an earlier one
        try:
            await self.client.patch_status(
                API_VERSION, KIND, key[0], key[1], {"credentials": credentials}
            )
        except KubeError as exc:
            if exc.status != 404:  # gone meanwhile: garbage collection takes the Secrets
                raise

    # ---- rotation ------------------------------------------------------------------------

    def on_cluster_event(self, key: Key) -> None:
        """A new lmcache.dev/rotate-keys value starts a rotation."""
        requested = self._requested(key)
        state = self.known(key)
        if not requested or state is None:
            return
        if state.rotation is None or state.rotation.requested != requested:
            self.rotations.request(key)

    def on_consumer_deployment(self, event: str, obj: dict[str, Any]) -> None:
        """A VLLMDeployment's Deployment moved: its cluster's rotation may be done."""
        if event in ("SYNCED", "BOOKMARK"):
            return
        consumer = owner_key(obj, DEPLOYMENT_LABEL)
        view = self.views.vllm.get(consumer) if consumer is not None else None
        cluster = cluster_ref(view.body) if view is not None else None
        if consumer is None or cluster is None:
            return
        key = (consumer[0], cluster)
        state = self.known(key)
        if state is not None and state.rotation is not None and state.rotation.phase == ROLLING:
            self.rotations.request(key)

    async def rotate(self, key: Key) -> None:
        """Start a requested rotation, or move the current one on."""
        async with self._lock(key):
            state = self.known(key)
            if state is None:
                return
            requested = self._requested(key)
            if requested and (state.rotation is None or state.rotation.requested != requested):
                state = await self._start(key, state, requested)
            if state.rotation is not None and state.rotation.phase != COMPLETED:
                await self._advance(key, state, state.rotation)

    async def _start(self, key: Key, state: KeyState, requested: str) -> KeyState:
        namespace, name = key
        public, secret = self.keypair()
        try:
            await self.client.merge_patch(
                "v1", "Secret", namespace, client_secret_name(name),
                {"stringData": client_secret_data(ClientMaterial(secret, public))},
            )  # fmt: skip
        except KubeError as exc:
            if exc.status != 404:
                raise
            view = self.views.clusters.get(key)
            metadata = (view.body or {}).get("metadata", {}) if view is not None else {}
            owner = {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata}
            return await self._regenerate(key, owner, "the client Secret was missing")
        now = self.wall()
        keys = tuple(replace(k, state=RETIRING) for k in state.client_keys)
        state = replace(
            state,
            client_keys=(*keys, ClientKey(public, ACTIVE, rfc3339(now))),
            rotation=Rotation(
                PROPAGATING,
                requested,
                started_at=rfc3339(now),
                message="the new client key is allowed; waiting for it to reach the cache pods",
            ),
        )  # consumer_key stays the old one until the servers know the new key
        await self._store(key, state)
        self.changed(key)  # clients.pub: old and new
        logger.info("%s/%s: rotating the client key (%s)", namespace, name, requested)
        return state

    async def _advance(self, key: Key, state: KeyState, rotation: Rotation) -> None:
        now = self.wall()
        started = parse_rfc3339(rotation.started_at) or now
        if rotation.phase == PROPAGATING:
            remaining = started + self.settings.key_propagation_s - now
            if remaining > 0:
                self.rotations.request_later(remaining, key)
                return
            rotation = replace(rotation, phase=ROLLING, message="rolling the consumers")
            state = replace(state, consumer_key=fingerprint(state.active.public_key))
            await self._store(key, state.with_rotation(rotation))
        grace = self._grace_s(key)
        waiting = await unrolled_consumers(
            self.client, self.views, key, state.consumer_key, started
        )
        if not waiting:
            message = "every consumer runs the new key; the previous key is no longer accepted"
        elif now - started >= grace:
            message = (
                f"grace period ({grace:.0f} s) over; the previous key is no longer accepted, "
                f"still on it: {', '.join(waiting)}"
            )
        else:
            message = f"waiting for {', '.join(waiting)}"
            if message != rotation.message:
                await self._store(key, state.with_rotation(replace(rotation, message=message)))
            self.rotations.request_later(
                min(self.settings.secret_check_s, max(1.0, started + grace - now)), key
            )
            return
        done = replace(rotation, phase=COMPLETED, completed_at=rfc3339(now), message=message)
        retired = [fingerprint(k.public_key) for k in state.client_keys if k.state == RETIRING]
        state = replace(state, client_keys=(state.active,), rotation=done)
        await self._store(key, state)
        self.changed(key)  # clients.pub: the new key only
        logger.info("%s/%s: rotation done, dropped %s: %s", *key, ", ".join(retired), message)

    def _grace_s(self, key: Key) -> float:
        view = self.views.clusters.get(key)
        spec = (view.body or {}).get("spec", {}) if view is not None else {}
        security = spec.get("security") or {}
        return float(security.get("rotationGracePeriodSeconds", 3600))

    # ---- the periodic pass ----------------------------------------------------------------

    async def check_all(self) -> None:
        """Every cluster's Secrets, and the rotations in progress (grace periods end)."""
        for key in list(self.views.clusters):
            try:
                await self.check(key)
            except (KubeError, RetryLater) as exc:
                logger.warning("checking the credentials of %s/%s: %s", key[0], key[1], exc)
            state = self.known(key)
            rotation = state.rotation if state is not None else None
            if rotation is not None and rotation.phase != COMPLETED:
                self.rotations.request(key)


async def every(interval_s: float, action: Callable[[], Awaitable[None]], what: str) -> None:
    """Run ``action`` every ``interval_s`` until cancelled; a failure is logged, not fatal."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await action()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("%s failed; again in %.0f s", what, interval_s)

"""The operator's children as it last saw them: one watch per kind and namespace, read instead of the API.

A pass of a Federation or Participant compares what it wants with what
exists. Asking the API server what exists on every pass made an idle
Federation cost hundreds of requests a minute; these watches make it cost
(almost) none. Each stream lists the children of one kind in one namespace
(the operator's label, ``app.kubernetes.io/managed-by=fedcrm-operator``),
then watches from that version for half an hour at a time; a change (a Job
finishing, a ConfigMap deleted by hand) updates the cache and wakes the
passes of the Federation and Participant the child's labels name.

Watched: Jobs, ConfigMaps and NetworkPolicies in every namespace a pass
touches; Secrets, Services and StatefulSets too in coordinator namespaces.
Never a tenant's Secrets (the tenant chart grants no list there) nor pods.
A stream that is not yet listed, or that the API server refused (a namespace
that did not grant the operator access: 403, retried with a growing pause),
is *unknown*: the caller asks the API server as before, so a missing watch
costs requests, never correctness. A reader may wait a little for a new
stream's first list (``wait``) rather than ask the API server the same
question itself: the first pass in a new tenant namespace then costs one list
per kind instead of a read per child and a list per sweep.

Objects are kept slim (metadata, status and, for ConfigMaps and Secrets,
data): what the passes read, not pod templates.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto as sslproto
import json
import logging
import random
import ssl
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from kubernetes import client as k8s

__all__ = ["COORDINATOR_KINDS", "SELECTOR", "TENANT_KINDS", "Children"]

log = logging.getLogger("fedcrm.operator")

SELECTOR = "app.kubernetes.io/managed-by=fedcrm-operator"
#: kind -> (apiVersion, plural)
KINDS = {
    "Job": ("batch/v1", "jobs"),
    "ConfigMap": ("v1", "configmaps"),
    "NetworkPolicy": ("networking.k8s.io/v1", "networkpolicies"),
    "Secret": ("v1", "secrets"),
    "Service": ("v1", "services"),
    "StatefulSet": ("apps/v1", "statefulsets"),
}
TENANT_KINDS = frozenset({"Job", "ConfigMap", "NetworkPolicy"})
COORDINATOR_KINDS = TENANT_KINDS | {"Secret", "Service", "StatefulSet"}
#: How long one watch request lasts (the API server ends it then; the stream resumes from the last version seen,
#: without listing again). Jittered so that streams started together do not reconnect together.
WATCH_SECONDS = 1800
#: Pauses before listing again after an error; a refusal (403) waits the longest, growing to the last.
RETRY_SECONDS = (1.0, 2.0, 5.0, 15.0, 60.0)
DENIED_SECONDS = (60.0, 300.0, 600.0)
TLS_READ_BYTES = 16 * 1024
_KEEP_METADATA = ("name", "namespace", "labels", "resourceVersion", "uid", "deletionTimestamp", "ownerReferences")

OnChange = Callable[[dict[str, Any]], None]


class _Gone(Exception):
    """410: the version to resume from is too old; list again."""


class _Denied(Exception):
    """403: the operator may not list this kind here."""


def slim(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata") or {}
    out: dict[str, Any] = {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"),
                           "metadata": {k: meta[k] for k in _KEEP_METADATA if k in meta}}
    for key in ("status", "data"):
        if key in obj:
            out[key] = obj[key]
    return out


@dataclass
class _Stream:
    namespace: str
    kind: str
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    synced: bool = False
    task: asyncio.Task[None] | None = None
    #: Set once the first list ended, listed or not (a reader waiting for it stops waiting either way).
    tried: threading.Event = field(default_factory=threading.Event)


class Children:
    """Watch streams and their cache. :meth:`start` in the operator's event loop; the lookups are thread-safe
    (passes run in worker threads) and start the stream they need."""

    def __init__(self, configuration: k8s.Configuration, on_change: OnChange) -> None:
        self.configuration = configuration
        self.on_change = on_change
        self._streams: dict[tuple[str, str], _Stream] = {}
        self._coordinators: set[str] = set()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: aiohttp.ClientSession | None = None
        self.requests = 0  # lists and watch requests made, for tests and the benchmark

    # ------------------------------------------------------------------ lifecycle (event loop)
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        # asyncio gives every TLS connection a 256 KiB read buffer (SSLProtocol.max_size): 40 MiB for the 150
        # streams of 50 tenant namespaces, most of the operator's memory. A watch reads a few KiB at a time, and
        # one TLS record is at most 16 KiB: read 16 KiB at a time, on the operator's other connections too.
        sslproto.SSLProtocol.max_size = min(sslproto.SSLProtocol.max_size, TLS_READ_BYTES)
        self._loop = loop

    async def close(self) -> None:
        with self._lock:
            tasks = [s.task for s in self._streams.values() if s.task is not None]
            self._loop = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    # ------------------------------------------------------------------ lookups (any thread)
    def coordinator(self, namespace: str) -> None:
        """``namespace`` holds Federations: its Secrets, Services and StatefulSets are watched too."""
        with self._lock:
            self._coordinators.add(namespace)

    def watchable(self, kind: str, namespace: str) -> bool:
        with self._lock:
            return kind in TENANT_KINDS or (kind in COORDINATOR_KINDS and namespace in self._coordinators)

    def lookup(self, kind: str, namespace: str, name: str, *, wait: float = 0.0) -> tuple[bool, dict[str, Any] | None]:
        """(known, object): known is False while the stream is not listed (or not watchable); then the object
        (None: it does not exist). ``wait``: seconds to wait for a new stream's first list (see :meth:`_first_list`)."""
        stream = self._stream(kind, namespace)
        if stream is None:
            return False, None
        self._first_list(stream, wait)
        with self._lock:
            if not stream.synced:
                return False, None
            return True, stream.objects.get(name)

    def items(self, kind: str, namespace: str, *, wait: float = 0.0) -> list[dict[str, Any]] | None:
        """Every child of ``kind`` in ``namespace``, or None while unknown."""
        stream = self._stream(kind, namespace)
        if stream is None:
            return None
        self._first_list(stream, wait)
        with self._lock:
            return list(stream.objects.values()) if stream.synced else None

    def _first_list(self, stream: _Stream, wait: float) -> None:
        """Wait up to ``wait`` seconds for a stream that has not yet tried its first list. Only off the event
        loop (the passes' threads): the loop is what lists; a stream that failed before is not waited for."""
        if wait <= 0 or stream.tried.is_set():
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            stream.tried.wait(wait)

    def _stream(self, kind: str, namespace: str) -> _Stream | None:
        if not self.watchable(kind, namespace):
            return None
        with self._lock:
            stream = self._streams.get((namespace, kind))
            if stream is None:
                if self._loop is None:
                    return None
                stream = self._streams[(namespace, kind)] = _Stream(namespace, kind)
                loop = self._loop
            else:
                return stream
        loop.call_soon_threadsafe(self._spawn, stream)
        return stream

    def _spawn(self, stream: _Stream) -> None:
        stream.task = asyncio.get_running_loop().create_task(self._run(stream), name=f"watch {stream.kind} {stream.namespace}")

    # ------------------------------------------------------------------ streams (event loop)
    def _url(self, stream: _Stream) -> str:
        api_version, plural = KINDS[stream.kind]
        base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        return f"{self.configuration.host.rstrip('/')}{base}/namespaces/{stream.namespace}/{plural}"

    def _headers(self) -> dict[str, str]:
        """The client's own authentication headers (a bearer token, refreshed in a pod as the client does)."""
        headers = {"Accept": "application/json"}
        for setting in self.configuration.auth_settings().values():
            if setting.get("in") == "header" and setting.get("value"):
                headers[setting["key"]] = setting["value"]
        return headers

    def _ssl(self) -> ssl.SSLContext | bool:
        cfg = self.configuration
        if not cfg.verify_ssl:
            return False
        context = ssl.create_default_context(cafile=cfg.ssl_ca_cert) if cfg.ssl_ca_cert else ssl.create_default_context()
        if cfg.cert_file:
            context.load_cert_chain(cfg.cert_file, cfg.key_file)
        return context

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ssl=self._ssl()))
        return self._session

    async def _run(self, stream: _Stream) -> None:
        failures = denials = 0
        while True:
            try:
                version = await self._list(stream)
                stream.tried.set()
                failures = denials = 0
                while True:
                    version = await self._watch(stream, version)
            except asyncio.CancelledError:
                stream.tried.set()
                raise
            except _Gone:
                continue
            except _Denied:
                stream.tried.set()
                self._unsync(stream)
                pause = DENIED_SECONDS[min(denials, len(DENIED_SECONDS) - 1)]
                denials += 1
                log.debug("watch %s in %s: no access; asking again in %.0fs", stream.kind, stream.namespace, pause)
            except Exception as err:  # noqa: BLE001 - any failure: fall back to requests, list again after a pause
                stream.tried.set()
                self._unsync(stream)
                pause = RETRY_SECONDS[min(failures, len(RETRY_SECONDS) - 1)]
                failures += 1
                log.info("watch %s in %s: %s; listing again in %.0fs", stream.kind, stream.namespace, err, pause)
            await asyncio.sleep(pause * random.uniform(0.8, 1.2))

    def _unsync(self, stream: _Stream) -> None:
        with self._lock:
            stream.synced = False

    async def _get(self, url: str, params: dict[str, str], *, timeout: aiohttp.ClientTimeout) -> aiohttp.ClientResponse:
        self.requests += 1
        response = await self._client().get(f"{url}?{urllib.parse.urlencode(params)}", headers=self._headers(),
                                            timeout=timeout)
        if response.status == 403:
            response.release()
            raise _Denied()
        if response.status == 410:
            response.release()
            raise _Gone()
        if response.status != 200:
            text = (await response.text())[:300]
            raise RuntimeError(f"HTTP {response.status}: {text}")
        return response

    async def _list(self, stream: _Stream) -> str:
        url, found, cont = self._url(stream), {}, ""
        while True:
            params = {"labelSelector": SELECTOR, "limit": "500"} | ({"continue": cont} if cont else {})
            async with await self._get(url, params, timeout=aiohttp.ClientTimeout(total=60)) as response:
                body = await response.json()
            for item in body.get("items") or []:
                item.setdefault("apiVersion", KINDS[stream.kind][0])
                item.setdefault("kind", stream.kind)
                found[item["metadata"]["name"]] = slim(item)
            cont = (body.get("metadata") or {}).get("continue") or ""
            if not cont:
                break
        with self._lock:
            before, stream.objects, stream.synced = stream.objects, found, True
        for name in set(before) | set(found):  # what changed while nobody watched
            old, new = before.get(name), found.get(name)
            if (old or {}).get("metadata", {}).get("resourceVersion") != (new or {}).get("metadata", {}).get("resourceVersion"):
                self._changed(new or old)  # type: ignore[arg-type]
        return str((body.get("metadata") or {}).get("resourceVersion") or "")

    async def _watch(self, stream: _Stream, version: str) -> str:
        seconds = int(WATCH_SECONDS * random.uniform(0.9, 1.1))
        params = {"watch": "true", "labelSelector": SELECTOR, "resourceVersion": version,
                  "allowWatchBookmarks": "true", "timeoutSeconds": str(seconds)}
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=seconds + 60)
        async with await self._get(self._url(stream), params, timeout=timeout) as response:
            async for line in response.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                obj = event.get("object") or {}
                kind = event.get("type")
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise _Gone()
                    raise RuntimeError(f"watch error: {obj.get('message')}")
                version = (obj.get("metadata") or {}).get("resourceVersion") or version
                if kind == "BOOKMARK":
                    continue
                obj.setdefault("apiVersion", KINDS[stream.kind][0])
                obj.setdefault("kind", stream.kind)
                held = slim(obj)
                with self._lock:
                    if kind == "DELETED":
                        stream.objects.pop(held["metadata"]["name"], None)
                    else:
                        stream.objects[held["metadata"]["name"]] = held
                self._changed(held)
        return version

    def _changed(self, obj: dict[str, Any]) -> None:
        try:
            self.on_change(obj)
        except Exception:  # noqa: BLE001 - a wake-up that fails must not end the stream
            log.exception("watch: handling a change of %s %s", obj.get("kind"), obj.get("metadata", {}).get("name"))

"""The operator's one Kubernetes client: apply, create-once, list and delete plain dicts.

Server-side apply makes every write idempotent: a re-delivered event or a
restarted operator applies the same object again and nothing is duplicated.
Objects that must never be regenerated (a CA key, certificates) are created
once and read back on a 409. Errors that a retry can fix become
``kopf.TemporaryError``; RBAC refusing the operator in a namespace becomes
:class:`AccessDenied` (the namespace did not grant the operator access, see
docs/operator.md#rbac); the rest propagate to the handler, which reports them.

Every call names its namespace: the operator has no cluster-wide rights on
namespaced kinds, so it never lists or watches one across the cluster.

With :attr:`Kube.cache` (the operator's watches, :mod:`fedcrm_operator.watches`)
reads come from the watched children instead of the API server, an applied
object is applied again only when the watch shows it changed or gone, and an
object the operator may not watch (a tenant's certificate Secret) is read
again only every half hour. Without it (unit tests), every read is a request
and an applied object is trusted for half a minute.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import kopf
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ResourceNotFoundError

from fedcrm_operator.watches import Children

__all__ = ["FIELD_MANAGER", "AccessDenied", "Kube", "connect"]

FIELD_MANAGER = "fedcrm-operator"
log = logging.getLogger("fedcrm.operator")


def connect() -> Kube:
    """In a pod: the service account; elsewhere: $KUBECONFIG or ~/.kube/config."""
    try:
        k8s_config.load_incluster_config()
    except k8s_config.ConfigException:
        k8s_config.load_kube_config()
    configuration = k8s.Configuration.get_default_copy()
    # Passes run in up to 16 of kopf's threads and a few timer threads, their tenants' work in PARALLEL more.
    configuration.connection_pool_maxsize = 64
    return Kube(k8s.ApiClient(configuration))


def _retryable(err: ApiException) -> bool:
    return err.status in (0, 409, 429) or err.status >= 500


#: How the API server words an RBAC refusal (k8s.io/apiserver responsewriters.forbiddenMessage). Other 403s (a
#: ResourceQuota, an admission policy) say something else and stay plain API errors.
_RBAC_REFUSAL = re.compile(
    r'User "(?P<user>[^"]*)" cannot (?P<verb>\S+) resource "(?P<resource>[^"]*)"'
    r'(?: in API group "[^"]*")?(?: in the namespace "(?P<namespace>[^"]*)")?'
)


class AccessDenied(kopf.PermanentError):
    """RBAC refused the operator: the namespace has not granted it the rights it needs there.

    Tenant namespaces grant them with the tenant chart's Role and RoleBinding (the tenant's consent), the
    coordinator namespaces with the operator chart's ``coordinatorNamespaces``. ``user`` is who the operator
    is to the API server (its ServiceAccount), ``namespace`` where it was refused (None: cluster scope).
    """

    def __init__(self, message: str, *, user: str, namespace: str | None, verb: str, resource: str) -> None:
        super().__init__(message)
        self.user, self.namespace, self.verb, self.resource = user, namespace, verb, resource


#: How long an applied object is trusted to be unchanged before it is applied again. Re-applying is
#: idempotent but costs a request; the bound keeps a hand-deleted child from staying gone for long.
APPLY_CACHE_SECONDS = 30.0
#: With watches running: how long an object of a kind the operator may not watch there (a tenant's certificate
#: Secret, a ServiceMonitor) is trusted before it is read or applied again. A certificate's renewal does not wait
#: for it (it is due by the time the held copy says); a tenant who deletes it by hand waits up to this long.
UNWATCHED_SECONDS = 1800.0
KIND_CACHE_SECONDS = 60.0
#: Threads one client shares among all passes for work done per tenant (:meth:`Kube.each`): enough to overlap the
#: requests of a first pass over many tenants, few enough that their memory stays small.
PARALLEL = 8
#: How long a read waits for a new watch's first list instead of asking the API server itself (the first pass in a
#: new tenant namespace: one list per kind there, rather than a read of each child and a list for each sweep).
FIRST_LIST_SECONDS = 5.0
#: A kind the cluster does not serve (no ServiceMonitor CRD) is looked for again this rarely: each look re-reads
#: every API group (two dozen requests).
MISSING_KIND_SECONDS = 600.0


_T = TypeVar("_T")
_R = TypeVar("_R")


def _version(obj: dict[str, Any] | None) -> str | None:
    return None if obj is None else (obj.get("metadata") or {}).get("resourceVersion")


def _matches(obj: dict[str, Any], selector: str) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    wanted = dict(part.split("=", 1) for part in selector.split(",") if part)
    return all(labels.get(k) == v for k, v in wanted.items())


class Kube:
    #: The operator's watches of its children; None: every read asks the API server.
    cache: Children | None = None
    _discovering = threading.Lock()
    _pool: ThreadPoolExecutor | None = None

    def __init__(self, api_client: k8s.ApiClient) -> None:
        self.api_client = api_client
        self.dynamic = DynamicClient(api_client)
        #: (kind, namespace, name) -> (digest, applied at, trusted until, version before, version after)
        self._applied: dict[tuple[str, str, str], tuple[str, float, float, str | None, str | None]] = {}
        #: (kind, namespace, name) -> (object, trusted until); the same for names known absent
        self._ensured: dict[tuple[str, str, str], tuple[dict[str, Any], float]] = {}
        self._kinds: dict[tuple[str, str], tuple[bool, float]] = {}
        self._absent: dict[tuple[str, str, str], float] = {}
        self._due: dict[str, float] = {}
        self._lock = threading.Lock()
        self.requests = 0

    def _resource(self, api_version: str, kind: str) -> Any:
        return self.dynamic.resources.get(api_version=api_version, kind=kind)

    def each(self, fn: Callable[[_T], _R], items: list[_T]) -> list[_R]:
        """``fn`` of every item, on the client's :data:`PARALLEL` threads (shared by all passes); results in order,
        the first exception raised once all ran."""
        if len(items) <= 1:
            return [fn(item) for item in items]
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=PARALLEL, thread_name_prefix="fedcrm-kube")
            pool = self._pool
        futures = [pool.submit(fn, item) for item in items]
        errors = [f.exception() for f in futures]
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
        return [f.result() for f in futures]

    def _seen(self, kind: str, namespace: str | None, name: str) -> tuple[bool, dict[str, Any] | None]:
        """What the watches hold: (known, object); not known without a synced watch of this kind there."""
        if self.cache is None or not namespace:
            return False, None
        return self.cache.lookup(kind, namespace, name, wait=FIRST_LIST_SECONDS)

    def _trust(self, kind: str, namespace: str | None) -> float:
        """Seconds an object read or applied without a watch is trusted: half a minute, or (with watches, for a
        kind never watched there) :data:`UNWATCHED_SECONDS`, less a random fifth so that they do not expire
        together."""
        if self.cache is not None and namespace and not self.cache.watchable(kind, namespace):
            return UNWATCHED_SECONDS * random.uniform(0.8, 1.0)
        return APPLY_CACHE_SECONDS

    def has_kind(self, api_version: str, kind: str) -> bool:
        """Whether the cluster serves this kind (e.g. ServiceMonitor only where its CRD is installed).

        Cached for a minute, a kind not served for ten: a miss makes the discovery client re-read every API
        group, which would otherwise happen on every pass of every Federation.
        """
        key = (api_version, kind)
        with self._discovering:  # one look at a time: passes in parallel would each re-read discovery
            with self._lock:
                seen = self._kinds.get(key)
            if seen and time.monotonic() - seen[1] < (KIND_CACHE_SECONDS if seen[0] else MISSING_KIND_SECONDS):
                return seen[0]
            try:
                self._resource(api_version, kind)
                served = True
            except ResourceNotFoundError:
                served = False
            with self._lock:
                self._kinds[key] = (served, time.monotonic())
        return served

    def apply(self, obj: dict[str, Any]) -> None:
        """Server-side apply, skipped when the same object was applied before and is unchanged since: the watch
        shows the version the apply returned (or still the one before it, for half a minute, while the apply's
        own event is on its way); without a watch, for half a minute (:meth:`_trust`)."""
        meta = obj["metadata"]
        namespace = meta.get("namespace") or ""
        key = (obj["kind"], namespace, meta["name"])
        digest = hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
        with self._lock:
            seen = self._applied.get(key)
        known, current = self._seen(obj["kind"], namespace, meta["name"])
        now = time.monotonic()
        if seen and seen[0] == digest:
            _, at, until, before, after = seen
            if known:
                if current is not None and _version(current) == after:
                    return
                if _version(current) == before and now - at < APPLY_CACHE_SECONDS:
                    return
            elif now < until:
                return
        try:
            self.requests += 1
            applied = self._resource(obj["apiVersion"], obj["kind"]).server_side_apply(
                body=obj, name=meta["name"], namespace=meta.get("namespace"),
                field_manager=FIELD_MANAGER, force_conflicts=True,
            )
        except ApiException as err:
            raise self._translate(err, f"apply {obj['kind']} {meta.get('namespace')}/{meta['name']}") from err
        try:
            after = str(applied.metadata.resourceVersion)
        except AttributeError:
            after = None
        with self._lock:
            self._applied[key] = (digest, now, now + self._trust(obj["kind"], namespace), _version(current), after)
            self._absent.pop(key, None)

    def patch_status(self, api_version: str, kind: str, namespace: str, name: str, fields: dict[str, Any]) -> None:
        """A JSON merge patch of ``status`` (the status subresource), for the round follower."""
        try:
            self.requests += 1
            self._resource(api_version, kind).status.patch(
                body={"status": fields}, name=name, namespace=namespace, content_type="application/merge-patch+json"
            )
        except ApiException as err:
            raise self._translate(err, f"patch status of {kind} {namespace}/{name}") from err

    def due(self, key: str, seconds: float) -> bool:
        """Whether work known by ``key`` is due: the first time, then once every ``seconds`` (for what a pass
        does less often than it runs, such as a sweep that lists every tenant namespace)."""
        now = time.monotonic()
        with self._lock:
            last = self._due.get(key)
            if last is not None and now - last < seconds:
                return False
            self._due[key] = now
        return True

    def forget(self, kind: str, namespace: str, name: str) -> None:
        with self._lock:
            self._applied.pop((kind, namespace, name), None)
            self._ensured.pop((kind, namespace, name), None)
            self._absent.pop((kind, namespace, name), None)

    def ensure(self, api_version: str, kind: str, namespace: str, name: str, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The existing object, or ``build()`` created: for objects whose content must never be regenerated
        (keys, certificates) or cannot be changed (a Job's pod template)."""
        key = (kind, namespace, name)
        with self._lock:
            seen = self._ensured.get(key)
        if seen and time.monotonic() < seen[1]:
            return seen[0]
        known, existing = self._seen(kind, namespace, name)
        if not known:
            existing = self.get(api_version, kind, namespace, name, fresh=True)
        held = existing if existing is not None else self.create_once(build())
        with self._lock:
            self._ensured[key] = (held, time.monotonic() + self._trust(kind, namespace))
            self._absent.pop(key, None)
        return held

    def replace_data(self, held: dict[str, Any], data: dict[str, str]) -> dict[str, Any] | None:
        """Rewrite the ``data`` of ``held`` (a Secret or ConfigMap read by :meth:`ensure`), only if it is still
        the version read (its resourceVersion, a precondition of the merge patch): the new object, or None when
        it changed meanwhile (another replica renewed it first; the next pass reads it again)."""
        meta = held["metadata"]
        key = (held["kind"], meta["namespace"], meta["name"])
        patch = {"metadata": {"resourceVersion": meta["resourceVersion"]}, "data": data}
        try:
            self.requests += 1
            new = self._resource(held["apiVersion"], held["kind"]).patch(
                body=patch, name=meta["name"], namespace=meta["namespace"], content_type="application/merge-patch+json",
            ).to_dict()
        except ApiException as err:
            if err.status in (404, 409):
                self.forget(*key)
                return None
            raise self._translate(err, f"patch {held['kind']} {meta['namespace']}/{meta['name']}") from err
        with self._lock:
            self._ensured[key] = (new, time.monotonic() + self._trust(key[0], key[1]))
        return new

    def create_once(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create ``obj`` unless it exists; return what the server holds. Never overwrites."""
        meta = obj["metadata"]
        resource = self._resource(obj["apiVersion"], obj["kind"])
        try:
            self.requests += 1
            return resource.create(body=obj, namespace=meta.get("namespace")).to_dict()
        except ApiException as err:
            if err.status != 409:
                raise self._translate(err, f"create {obj['kind']} {meta.get('namespace')}/{meta['name']}") from err
        existing = self.get(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"], fresh=True)
        if existing is None:  # deleted between our create and our read: try again shortly
            raise kopf.TemporaryError(f"{obj['kind']} {meta['name']} is being replaced", delay=1)
        return existing

    def get(self, api_version: str, kind: str, namespace: str | None, name: str, *, fresh: bool = False
            ) -> dict[str, Any] | None:
        """The object (None: absent): from the watches when they know it (slim: metadata, status, data), else,
        or when ``fresh``, from the API server."""
        if not fresh:
            known, current = self._seen(kind, namespace, name)
            if known:
                return current
        self.requests += 1
        try:
            return self._resource(api_version, kind).get(name=name, namespace=namespace).to_dict()
        except ApiException as err:
            if err.status == 404:
                return None
            raise self._translate(err, f"read {kind} {namespace}/{name}") from err

    def list(self, api_version: str, kind: str, *, namespace: str, selector: str | None = None) -> list[dict[str, Any]]:
        """Objects of ``kind`` in one namespace (the operator's RBAC grants no cluster-wide list of them)."""
        try:
            self.requests += 1
            found = self._resource(api_version, kind).get(namespace=namespace, label_selector=selector)
        except ApiException as err:
            raise self._translate(err, f"list {kind} in {namespace}") from err
        return [item.to_dict() if hasattr(item, "to_dict") else dict(item) for item in found.to_dict()["items"]]

    def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> None:
        """Delete, letting the garbage collector remove dependents (a Job's pods) in the background."""
        try:
            self.requests += 1
            self._resource(api_version, kind).delete(
                name=name, namespace=namespace, body={"propagationPolicy": "Background"}
            )
        except ApiException as err:
            if err.status != 404:
                raise self._translate(err, f"delete {kind} {namespace}/{name}") from err

    def delete_named(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        """Delete one object known by name (where the operator may not list its kind: a tenant's Secrets).

        A 404 is remembered for half a minute, so a sweep that names the same absent object on every pass
        costs no request; creating it through :meth:`ensure` (or :meth:`forget`) clears that. A namespace that
        has not granted the operator access (RBAC 403) counts as holding nothing of ours: nothing is raised.
        """
        key = (kind, namespace, name)
        known, current = self._seen(kind, namespace, name)
        if known and (current is None or current["metadata"].get("deletionTimestamp")):
            return
        with self._lock:
            gone = self._absent.get(key)
        if gone is not None and time.monotonic() < gone:
            return
        self.forget(kind, namespace, name)
        try:
            self.requests += 1
            self._resource(api_version, kind).delete(name=name, namespace=namespace, body={"propagationPolicy": "Background"})
        except ApiException as err:
            if err.status != 404:
                translated = self._translate(err, f"delete {kind} {namespace}/{name}")
                if not isinstance(translated, AccessDenied):
                    raise translated from err
        with self._lock:
            self._absent[key] = time.monotonic() + self._trust(kind, namespace)

    def delete_labelled(self, kinds: Iterable[tuple[str, str]], selector: str, *, namespaces: Iterable[str],
                        keep: set[tuple[str, str, str]] = frozenset(), fresh: bool = False) -> int:
        """Delete every object of ``kinds`` matching ``selector`` in each of ``namespaces``, except ``keep``.

        One list per kind and namespace, never across the cluster. A namespace that has not granted the
        operator access (RBAC 403) is skipped: nothing of ours can have been created there (or the tenant
        withdrew the grant, and its Participant's owner references remove our objects with it).
        Returns how many objects still existed (0 means the sweep found nothing left). What the watches hold
        is read instead of listing, unless ``fresh`` (a Federation's deletion: nothing may be missed).
        """
        kinds = [k for k in kinds if self.has_kind(*k)]
        namespaces = sorted(set(namespaces))
        remaining = 0
        if self.cache is not None and not fresh:
            for namespace in namespaces:  # start every watch this sweep reads at once; each is waited for below
                for _, kind in kinds:
                    self.cache.items(kind, namespace)
        for namespace in namespaces:
            for api_version, kind in kinds:
                held = None if fresh or self.cache is None else self.cache.items(kind, namespace, wait=FIRST_LIST_SECONDS)
                try:
                    found = ([o for o in held if _matches(o, selector)] if held is not None
                             else self.list(api_version, kind, namespace=namespace, selector=selector))
                except AccessDenied:
                    log.debug("sweep: no access to %s in namespace %s", kind, namespace)
                    continue
                for item in found:
                    meta = item["metadata"]
                    if (kind, meta["namespace"], meta["name"]) in keep:
                        continue
                    remaining += 1
                    self.forget(kind, meta["namespace"], meta["name"])
                    if not meta.get("deletionTimestamp"):
                        self.delete(api_version, kind, meta["namespace"], meta["name"])
        return remaining

    @staticmethod
    def _translate(err: ApiException, what: str) -> Exception:
        if _retryable(err):
            return kopf.TemporaryError(f"{what}: HTTP {err.status}, retrying", delay=2)
        try:
            message = json.loads(err.body or "{}").get("message", err.reason)
        except ValueError:
            message = err.reason
        refusal = _RBAC_REFUSAL.search(str(message)) if err.status == 403 else None
        if refusal is not None:
            return AccessDenied(f"{what}: {message}", user=refusal["user"], namespace=refusal["namespace"],
                                verb=refusal["verb"], resource=refusal["resource"])
        return kopf.PermanentError(f"{what}: {message}")

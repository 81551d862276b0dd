"""The operator reads its children from its watches: a pass that finds nothing changed makes no request.

These run the real :class:`fedcrm_operator.kube.Kube` against a recording API
(no cluster) and a stand-in for the watch cache; `make bench-operator` measures
the same on the real control plane (requests per idle Federation per minute).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

pytest.importorskip("kopf")

from fedcrm_operator import handlers, watches  # noqa: E402
from fedcrm_operator.kube import Kube  # noqa: E402
from kubernetes.client.exceptions import ApiException  # noqa: E402


class Watched:
    """What :class:`fedcrm_operator.watches.Children` answers: (known, object) per child."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.synced = True

    def watchable(self, kind: str, namespace: str) -> bool:
        return kind in watches.TENANT_KINDS

    def lookup(self, kind: str, namespace: str, name: str, *, wait: float = 0.0) -> tuple[bool, dict[str, Any] | None]:
        if not self.synced or not self.watchable(kind, namespace):
            return False, None
        return True, self.objects.get((kind, namespace, name))

    def items(self, kind: str, namespace: str, *, wait: float = 0.0) -> list[dict[str, Any]] | None:
        if not self.synced or not self.watchable(kind, namespace):
            return None
        return [o for (k, ns, _), o in self.objects.items() if (k, ns) == (kind, namespace)]

    def put(self, kind: str, namespace: str, name: str, version: str, **extra: Any) -> None:
        self.objects[(kind, namespace, name)] = {"kind": kind, "apiVersion": "v1", **extra, "metadata": {
            "name": name, "namespace": namespace, "resourceVersion": version,
            "labels": {"app.kubernetes.io/managed-by": "fedcrm-operator"}}}


class Applied:
    def __init__(self, version: str) -> None:
        self.metadata = type("Meta", (), {"resourceVersion": version})()

    def to_dict(self) -> dict[str, Any]:
        return {"metadata": {"resourceVersion": self.metadata.resourceVersion}}


class Api:
    """Every request the client makes, by verb and kind; server-side apply answers version "v<n>"."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.version = 0

    def resource(self, kind: str) -> Any:
        api = self

        class Resource:
            def server_side_apply(self, **_: Any) -> Applied:
                api.calls.append(("apply", kind))
                api.version += 1
                return Applied(f"v{api.version}")

            def get(self, **_: Any) -> Any:
                api.calls.append(("get", kind))
                raise ApiException(status=404, reason="Not Found")

            def create(self, body: dict[str, Any], **_: Any) -> Any:
                api.calls.append(("create", kind))
                return type("Created", (), {"to_dict": lambda self: {**body, "metadata": {**body["metadata"], "resourceVersion": "c1"}}})()

            def delete(self, **_: Any) -> None:
                api.calls.append(("delete", kind))
                raise ApiException(status=404, reason="Not Found")

        return Resource()


class Offline(Kube):
    def __init__(self, cache: Watched | None) -> None:  # the real caches, no client
        self._applied, self._ensured, self._kinds, self._absent, self._due = {}, {}, {}, {}, {}
        self._lock, self.requests = threading.Lock(), 0
        self.api = Api()
        self.cache = cache  # type: ignore[assignment]

    def _resource(self, api_version: str, kind: str) -> Any:
        return self.api.resource(kind)


CONFIG = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "churn-crm-config", "namespace": "tenant-a"},
          "data": {"x": "1"}}


def test_an_applied_child_is_applied_again_only_when_its_watch_shows_it_changed_or_gone() -> None:
    cache = Watched()
    kube = Offline(cache)
    kube.apply(CONFIG)
    assert kube.api.calls == [("apply", "ConfigMap")]
    kube.apply(CONFIG)  # the apply's own event has not arrived yet: still the version before it (none)
    assert len(kube.api.calls) == 1
    cache.put("ConfigMap", "tenant-a", "churn-crm-config", "v1")
    for _ in range(3):
        kube.apply(CONFIG)  # the watch shows what the apply returned: nothing to do
    assert len(kube.api.calls) == 1
    cache.put("ConfigMap", "tenant-a", "churn-crm-config", "v7")  # someone edited it
    kube.apply(CONFIG)
    assert len(kube.api.calls) == 2
    cache.put("ConfigMap", "tenant-a", "churn-crm-config", "v2")
    kube.apply(CONFIG)
    assert len(kube.api.calls) == 2
    del cache.objects[("ConfigMap", "tenant-a", "churn-crm-config")]  # deleted by hand
    kube.apply(CONFIG)
    assert len(kube.api.calls) == 3
    kube.apply({**CONFIG, "data": {"x": "2"}})  # a different desired object is always applied
    assert len(kube.api.calls) == 4


def test_reads_and_deletes_of_watched_children_cost_no_request() -> None:
    cache = Watched()
    kube = Offline(cache)
    cache.put("Job", "tenant-a", "churn-crm", "v3", status={"succeeded": 1})
    assert kube.get("batch/v1", "Job", "tenant-a", "churn-crm") == cache.objects[("Job", "tenant-a", "churn-crm")]
    assert kube.get("batch/v1", "Job", "tenant-a", "absent") is None
    assert kube.ensure("batch/v1", "Job", "tenant-a", "churn-crm", lambda: pytest.fail("exists: not built")) is not None
    kube.delete_named("batch/v1", "Job", "tenant-b", "churn-crm")  # the watch knows it is absent
    assert kube.delete_labelled([("batch/v1", "Job")], "app.kubernetes.io/managed-by=fedcrm-operator",
                                namespaces=["tenant-a"], keep={("Job", "tenant-a", "churn-crm")}) == 0
    assert kube.api.calls == []
    cache.synced = False  # a watch that is down: the API server is asked, as without watches
    assert kube.get("batch/v1", "Job", "tenant-a", "churn-crm") is None
    assert kube.api.calls == [("get", "Job")]


def test_a_child_that_is_never_watched_is_read_again_after_half_an_hour_not_every_pass() -> None:
    kube = Offline(Watched())
    build = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "churn-crm-tls", "namespace": "tenant-a"}}
    kube.ensure("v1", "Secret", "tenant-a", "churn-crm-tls", lambda: build)
    kube.ensure("v1", "Secret", "tenant-a", "churn-crm-tls", lambda: build)
    assert kube.api.calls == [("get", "Secret"), ("create", "Secret")]
    until = kube._ensured[("Secret", "tenant-a", "churn-crm-tls")][1]
    import time

    assert until - time.monotonic() > 0.75 * 1800
    kube.delete_named("v1", "Secret", "tenant-b", "churn-crm-tls")
    kube.delete_named("v1", "Secret", "tenant-b", "churn-crm-tls")
    assert kube.api.calls[2:] == [("delete", "Secret")]  # a 404 is remembered as long


def test_a_child_change_wakes_the_federation_and_the_participant_its_labels_name() -> None:
    woken: set[str] = set()
    handlers._wake_for_child(woken, {"metadata": {"namespace": "tenant-a", "name": "churn-crm", "labels": {
        "fedcrm.io/federation": "churn", "fedcrm.io/federation-namespace": "coord", "fedcrm.io/participant": "crm"}}})
    assert woken == {handlers._federation_key("coord", "churn"), handlers._participant_key("tenant-a", "crm")}
    long = "f" * 80  # a long Federation name is bounded in labels; its wake key is bounded the same way
    from fedcrm_operator.naming import Names

    label = Names("coord", long).labels("training")["fedcrm.io/federation"]
    handlers._wake_for_child(woken, {"metadata": {"namespace": "t", "labels": {
        "fedcrm.io/federation": label, "fedcrm.io/federation-namespace": "coord"}}})
    assert handlers._federation_key("coord", long) in woken

    memo = type("Memo", (), {})()
    memo.woken, memo.next_pass = set(woken), {}
    key = handlers._participant_key("tenant-a", "crm")
    memo.next_pass[key] = float("inf")
    assert handlers._due(memo, key) and not handlers._due(memo, key)  # woken once, then the safety net's time


def test_the_watch_cache_keeps_what_passes_read_and_forgets_pod_templates() -> None:
    job = {"apiVersion": "batch/v1", "kind": "Job", "spec": {"template": {"spec": {"containers": [{"image": "x"}]}}},
           "status": {"succeeded": 1},
           "metadata": {"name": "j", "namespace": "t", "resourceVersion": "5", "labels": {"a": "b"}, "managedFields": [{}]}}
    held = watches.slim(job)
    assert "spec" not in held and "managedFields" not in held["metadata"]
    assert held["status"] == {"succeeded": 1} and held["metadata"]["resourceVersion"] == "5"


def test_a_stream_lists_then_follows_changes_and_wakes_on_each() -> None:
    """Against a tiny HTTP server speaking the list and watch protocol: list, then ADDED/MODIFIED/DELETED."""
    from aiohttp import web
    from kubernetes import client as k8s

    changes: list[str] = []
    events = [
        {"type": "ADDED", "object": {"metadata": {"name": "b", "namespace": "t", "resourceVersion": "11"}}},
        {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "12"}}},
        {"type": "DELETED", "object": {"metadata": {"name": "a", "namespace": "t", "resourceVersion": "13"}}},
    ]
    seen_params: list[dict[str, str]] = []

    async def jobs(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != "Bearer t0ken":
            return web.json_response({"kind": "Status", "code": 403}, status=403)
        seen_params.append(dict(request.query))
        if request.query.get("watch") != "true":
            return web.json_response({"metadata": {"resourceVersion": "10"}, "items": [
                {"metadata": {"name": "a", "namespace": "t", "resourceVersion": "9"}}]})
        response = web.StreamResponse()
        await response.prepare(request)
        if request.query["resourceVersion"] == "10":
            for event in events:
                await response.write((__import__("json").dumps(event) + "\n").encode())
        else:
            await asyncio.sleep(0.5)
        return response

    async def scenario() -> None:
        app = web.Application()
        app.router.add_get("/apis/batch/v1/namespaces/t/jobs", jobs)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        config = k8s.Configuration()
        config.host = f"http://127.0.0.1:{port}"
        config.api_key = {"BearerToken": "Bearer t0ken"}  # as load_kube_config sets a token
        children = watches.Children(config, lambda obj: changes.append(obj["metadata"]["name"]))
        children.start(asyncio.get_running_loop())
        try:
            assert children.lookup("Job", "t", "a") == (False, None)  # not listed yet: ask the API server
            # ... unless the reader (a pass, in a thread) waits for the first list: then it knows.
            assert (await asyncio.to_thread(children.lookup, "Job", "t", "a", wait=5.0))[0]
            for _ in range(100):
                await asyncio.sleep(0.02)
                if children.lookup("Job", "t", "a")[0] and children.lookup("Job", "t", "a")[1] is None:
                    break
            known, b = children.lookup("Job", "t", "b")
            assert known and b is not None and b["kind"] == "Job"
            assert children.lookup("Job", "t", "a") == (True, None)
            assert changes == ["a", "b", "a"]
            assert seen_params[0]["labelSelector"] == watches.SELECTOR
            await asyncio.sleep(0.1)
            assert [p.get("resourceVersion") for p in seen_params][:3] == [None, "10", "13"]  # resumed, not listed again
            assert children.lookup("Secret", "t", "x") == (False, None)  # not a coordinator namespace: never watched
        finally:
            await children.close()
            await runner.cleanup()

    asyncio.run(scenario())


def test_an_unwoken_federation_passes_every_few_seconds_while_enrolling_then_once_a_minute() -> None:
    import datetime as dt

    from fedcrm_operator.settings import OperatorSettings

    default = OperatorSettings()
    assert handlers._federation_interval({}, default) == handlers.RECONCILE_SECONDS
    assert handlers._federation_interval({"phase": "Enrolling"}, default) == handlers.RECONCILE_SECONDS
    assert handlers._federation_interval({"phase": "Training"}, default) == handlers.SAFETY_SECONDS == 60
    short = OperatorSettings(certificate_lifetime=dt.timedelta(seconds=15))  # renewed at 10 s: look every 1.5 s
    assert handlers._federation_interval({"phase": "Training"}, short) == 1.5


def test_work_per_tenant_runs_on_shared_threads_in_order_and_a_failure_surfaces_after_all_ran() -> None:
    kube = Offline(None)
    ran: list[int] = []

    def work(i: int) -> int:
        ran.append(i)
        if i == 3:
            raise RuntimeError("tenant 3")
        return i * i

    assert kube.each(lambda i: i * i, list(range(20))) == [i * i for i in range(20)]
    with pytest.raises(RuntimeError, match="tenant 3"):
        kube.each(work, list(range(10)))
    assert sorted(ran) == list(range(10))
    assert kube._pool is not None and kube._pool._max_workers == 8  # one pool for every pass

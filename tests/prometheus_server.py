"""A real Prometheus server (Debian's package, see tools/install-system-packages) for tests.

Started on a free loopback port with a 250 ms scrape interval over the targets
a test names, stopped by PID when the test ends (and with the test process).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from controlplane import die_with_parent
from operator_harness import free_port, wait_for

__all__ = ["Prometheus", "prometheus"]


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return bytes(response.read())


class Prometheus:
    """A Prometheus's HTTP API. ``fetch`` GETs a URL: directly by default, or from inside another network
    namespace (the real-node cluster's)."""

    def __init__(self, port: int, host: str = "127.0.0.1", fetch: Callable[[str], bytes] = _get) -> None:
        self.port, self.host, self.fetch = port, host, fetch

    def api(self, path: str, **params: Any) -> Any:
        """``/api/v1/<path>``'s data; a query Prometheus cannot parse fails the test with its reason."""
        url = f"http://{self.host}:{self.port}/api/v1/{path}?" + urllib.parse.urlencode(params, doseq=True)
        try:
            body = json.loads(self.fetch(url))
        except urllib.error.HTTPError as err:
            raise AssertionError(f"{params}: HTTP {err.code} {err.read().decode(errors='replace')}") from None
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str, **params: Any) -> list[dict[str, Any]]:
        return list(self.api("query", query=promql, **params)["result"])


@contextmanager
def prometheus(workdir: Path, targets: dict[str, int]) -> Iterator[Prometheus]:
    """Prometheus scraping ``{job name: loopback port}`` every 250 ms, ready when yielded."""
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    assert Path(binary).exists(), "Prometheus is missing: tools/install-system-packages installs it (make test does)"
    port = free_port()
    (workdir / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "250ms", "scrape_timeout": "200ms"},
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{target}"]}]}
                           for job, target in targets.items()],
    }))
    log = workdir / "prometheus.log"
    server = subprocess.Popen(
        [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
    )
    try:
        def ready() -> bool:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=1).status == 200
            except OSError:
                assert server.poll() is None, log.read_text()[-2000:]
                return False

        wait_for("Prometheus ready", ready)
        yield Prometheus(port)
    finally:
        server.terminate()
        server.wait(timeout=30)

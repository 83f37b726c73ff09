"""Where a command finds its Ray cluster: one convention for ``--address`` and ``RAY_ADDRESS``.

``run`` and ``plan`` join a cluster at its GCS address (``HOST:6379`` as `ray start --head`
prints it), ``auto`` (a cluster started on this machine) or ``ray://HOST:10001`` (Ray Client); a
dashboard address (``http://HOST:8265``, what Ray's docs give for jobs) is translated to the GCS
address on the same host where one answers there, else refused naming what to pass. ``submit``
talks to the dashboard. Every address is probed with a deadline before Ray is asked to use it:
a port that accepts connections but does not speak Ray's protocol is refused in seconds.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from jobs.errors import ConfigError
from jobs.inputs import redact

PROBE_S = float(os.environ.get("INDUCTION_SWEEP_CONNECT_TIMEOUT_S", "5"))  # each probe's deadline
GCS_PORT = 6379  # `ray start --head`'s default


def _host_port(address: str, option: str) -> tuple[str, int]:
    """(host, port) of ``[scheme://][user:pw@]host:port[/...]``; ConfigError where it is not one."""
    parts = urlsplit(address if "://" in address else f"//{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:  # a port that is not a number in 0..65535
        host, port = None, None
    if not host or not port:
        raise ConfigError(f"{option} {redact(address)!r} is not HOST:PORT with a port in 1..65535")
    return host, port


def _tcp(host: str, port: int, option: str, address: str, what: str) -> None:
    try:
        socket.create_connection((host, port), timeout=PROBE_S).close()
    except OSError as exc:
        raise ConfigError(f"cannot reach {what} at {redact(address)} ({option}): "
                          f"{exc.strerror or type(exc).__name__} within {PROBE_S:g} s") from None


def _gcs_answers(host: str, port: int) -> bool:
    """Whether a gRPC server (Ray's GCS) completes a connection at host:port within PROBE_S."""
    import grpc

    try:  # a refused connection says no at once; gRPC would retry it until the deadline
        socket.create_connection((host, port), timeout=PROBE_S).close()
    except OSError:
        return False
    channel = grpc.insecure_channel(f"{host}:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=PROBE_S)
        return True
    except grpc.FutureTimeoutError:
        return False
    finally:
        channel.close()


def check_dashboard(address: str, option: str = "--address") -> None:
    """ConfigError unless a Ray dashboard (its Jobs API) answers at ``address`` within PROBE_S."""
    host, port = _host_port(address, option)
    _tcp(host, port, option, address, "the Ray dashboard")
    url = f"{urlsplit(address).scheme or 'http'}://{host}:{port}/api/version"
    try:
        with urllib.request.urlopen(url, timeout=PROBE_S) as response:
            answer = json.loads(response.read(65536))
        if not isinstance(answer, dict) or "ray_version" not in answer:
            raise ValueError("no ray_version")
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            return  # a dashboard behind authentication: the Jobs client says what it needs
        raise ConfigError(f"no Ray dashboard at {redact(address)} ({option}): /api/version answered HTTP {exc.code}") from None
    except (OSError, ValueError) as exc:
        reason = "no answer" if isinstance(exc, TimeoutError | socket.timeout) else type(exc).__name__
        raise ConfigError(f"no Ray dashboard at {redact(address)} ({option}): {reason} within {PROBE_S:g} s; "
                          "give the dashboard's address, http://HEAD:8265") from None


def cluster_address(given: str | None) -> str | None:
    """The address ``ray.init`` joins, from ``--address`` or else ``RAY_ADDRESS``; None for a local
    cluster of this process's own. ConfigError, before Ray starts, for one that does not answer."""
    option = "--address" if given else "RAY_ADDRESS"
    address = (given if given is not None else os.environ.get("RAY_ADDRESS", "")).strip()
    if not address:
        if given is not None:
            raise ConfigError("--address is empty: give HOST:PORT, auto or ray://HOST:PORT, or leave it out for a local cluster")
        return None
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        try:
            address = canonicalize_bootstrap_address("auto")
        except ConnectionError:
            raise ConfigError(f"{option} auto: no Ray cluster started on this machine (`ray start --head`); "
                              "give HOST:PORT, or leave it out for a local cluster") from None
    scheme = urlsplit(address).scheme if "://" in address else ""
    host, port = _host_port(address, option)
    if scheme in ("http", "https"):
        check_dashboard(address, option)
        if not _gcs_answers(host, GCS_PORT):
            raise ConfigError(f"{option} {redact(address)} is a Ray dashboard; `run` joins the cluster's GCS address "
                              f"(HOST:{GCS_PORT} as `ray start --head` prints it, or ray://HOST:10001), and none answers at "
                              f"{host}:{GCS_PORT}: give it, or run there as a Ray Job with `induction-sweep submit "
                              f"--address {redact(address)} -- ...`")
        print(f"induction-sweep: {redact(address)} is the dashboard; joining its cluster at {host}:{GCS_PORT}",
              file=sys.stderr, flush=True)
        return f"{host}:{GCS_PORT}"
    if scheme == "ray":
        _tcp(host, port, option, address, "a Ray Client server")
        return address
    if scheme:
        raise ConfigError(f"{option} {redact(address)!r}: unknown scheme {scheme!r}; give HOST:PORT, auto, ray://HOST:PORT "
                          "or a dashboard's http://HOST:8265")
    _tcp(host, port, option, address, "a Ray cluster")
    if not _gcs_answers(host, port):
        raise ConfigError(f"{redact(address)} ({option}) accepts connections but is not a Ray cluster's GCS "
                          f"(no gRPC answer within {PROBE_S:g} s); give the address `ray start --head` printed")
    return address

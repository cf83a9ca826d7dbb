"""The Kubernetes API source: credentials, a client, and list then watch of this node's pods.

It asks ``pods`` with ``fieldSelector=spec.nodeName=<node>``, exactly what
the kubelet itself asks, so the Node authorizer allows it, using the node's
kubeconfig (kubeadm's ``/etc/kubernetes/kubelet.conf``) or, as a DaemonSet,
the in-cluster service account.

Client library: **lightkube**. It is small, maintained, typed, already decodes
with msgspec (our own dependency) and does the parts that are easy to get
wrong: kubeconfig parsing (client certificate/key as files or inline data, CA
bundles, bearer tokens, ``tokenFile`` re-read on 401 for rotated tokens, exec
credential plugins, relative paths), in-cluster config, and an httpx client with
TLS set up. The official ``kubernetes`` client is much larger (generated models,
urllib3) and its watch neither relists after 410 nor can be stopped while
blocked. The list/watch protocol itself lives here because we need what
lightkube's ``watch()`` does not give: a *relist* after 410 Gone (a bare
re-watch would miss deletions), bookmarks, and a socket the caller can shut
down to interrupt a blocked read (:class:`PodSpecs` adds capped jittered
backoff and a fresh client, re-read certificates, after each failure).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable
from typing import Any

import msgspec
import yaml

from tapio_node.podspec.model import Pod, event_decoder, list_decoder, pod_decoder, status_decoder

log = logging.getLogger(__name__)

DEFAULT_KUBECONFIG = "/etc/kubernetes/kubelet.conf"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
PODS_PATH = "/api/v1/pods"


class SourceError(Exception):
    """An API source failed; `reason` is a bounded metric label, the message says what to do."""

    def __init__(self, message: str, reason: str = "error") -> None:
        super().__init__(message)
        self.reason = reason


class Gone(Exception):
    """410 Gone: the resourceVersion is compacted away, only a fresh list is complete."""


def _httpx():
    try:
        import httpx2 as httpx  # what lightkube >= 1.0 uses
    except ImportError:
        import httpx
    return httpx


def api_config(
    *,
    kubeconfig: str | None,
    in_cluster: bool | None,
    service_account_dir: str = SERVICE_ACCOUNT_DIR,
) -> tuple[Any, str]:
    """(lightkube SingleConfig, description) of the first usable API source.

    Order: the configured kubeconfig (default: the kubelet's own), then the
    in-cluster service account. Raises SourceError saying what was tried.
    """
    def client_lib():
        # Imported only once there are credentials to use: lightkube and
        # httpx are a third of the daemon's memory otherwise.
        try:
            from lightkube.config.kubeconfig import KubeConfig
            from lightkube.core.exceptions import ConfigError
        except ImportError as e:
            raise SourceError(f"cannot use the Kubernetes API: the lightkube package is missing ({e})",
                              "no_client") from e
        return KubeConfig, ConfigError

    tried = []
    if in_cluster is not True:
        path = kubeconfig or DEFAULT_KUBECONFIG
        if os.access(path, os.R_OK):
            KubeConfig, ConfigError = client_lib()
            try:
                with open(path, "rb") as f:
                    doc = yaml.safe_load(f)
                if not isinstance(doc, dict):
                    raise ValueError("not a YAML mapping (kind: Config)")
                return KubeConfig.from_dict(doc, fname=path).get(), f"kubeconfig {path}"
            except (ConfigError, LookupError, TypeError, ValueError, OSError, yaml.YAMLError) as e:
                # msgspec.ValidationError is a ValueError: a field of the wrong type.
                tried.append(f"kubeconfig {path} is unusable ({type(e).__name__}: {e})")
        else:
            tried.append(f"kubeconfig {path} is not readable")
    if in_cluster is not False:
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        if not host:
            tried.append("not in a cluster (KUBERNETES_SERVICE_HOST unset)")
        elif not os.access(os.path.join(service_account_dir, "token"), os.R_OK):
            tried.append(f"in-cluster: no service account token in {service_account_dir}")
        else:
            KubeConfig, ConfigError = client_lib()
            try:
                cfg = KubeConfig.from_service_account(service_account=service_account_dir).get()
                return cfg, f"in-cluster service account ({service_account_dir})"
            except (ConfigError, KeyError, OSError) as e:
                tried.append(f"in-cluster config unusable ({type(e).__name__}: {e})")
    raise SourceError("no Kubernetes API credentials: " + "; ".join(tried), "no_credentials")


def api_client(cfg: Any, *, timeout: float = 10.0):
    """An httpx client with the TLS and auth of `cfg` (lightkube does the kubeconfig semantics)."""
    from lightkube.config import client_adapter

    httpx = _httpx()
    params = client_adapter.ConnectionParams(timeout=httpx.Timeout(timeout))
    try:
        return client_adapter.Client(cfg, params)
    except Exception as e:  # ssl.SSLError, FileNotFoundError, ConfigError...
        raise SourceError(f"cannot set up a client for {cfg.cluster.server}: {type(e).__name__}: {e}", "config") from e


def _status_error(resp: Any, server: str, node: str) -> Exception:
    try:
        st = status_decoder.decode(resp.read())
        detail = st.message or st.reason
    except Exception:
        detail = ""
    code = resp.status_code
    if code == 401:
        return SourceError(f"API {server} rejected the credentials (401 Unauthorized): {detail}", "http_401")
    if code == 403:
        return SourceError(
            f"API {server} forbids listing pods of node {node!r} (403 Forbidden: {detail}); "
            "check node_name is this node's name as the cluster knows it",
            "http_403",
        )
    if code == 410:
        return Gone(detail)
    return SourceError(f"API {server} answered {code}: {detail}", f"http_{code // 100}xx")


def _transport_error(e: Exception, server: str) -> SourceError:
    return SourceError(f"API {server} unreachable: {type(e).__name__}: {e}", "connect")


def _node_selector(node: str) -> str:
    return f"spec.nodeName={node}"


def list_pods(
    client: Any,
    node: str,
    *,
    resource_version: str | None = "0",
    limit: int = 500,
    on_response: Callable[[Any], None] | None = None,
) -> tuple[list[Pod], str]:
    """All pods of `node` and the list's resourceVersion. Raises SourceError or Gone.

    `on_response` sees each response before its body is read (PodSpecs keeps
    the socket so that stop() can interrupt the read).
    """
    httpx = _httpx()
    server = str(client.base_url)
    params: dict[str, Any] = {"fieldSelector": _node_selector(node)}
    if resource_version:
        # "0": any cached state is fine (cheap for the API server, like the kubelet's first list).
        params["resourceVersion"] = resource_version
    else:
        params["limit"] = limit
    pods: list[Pod] = []
    restarts = 0
    while True:
        try:
            with client.stream("GET", PODS_PATH, params=params) as resp:
                if on_response is not None:
                    on_response(resp)
                if resp.status_code == 410 and "continue" in params:
                    # The continue token expired between pages: start the list over.
                    restarts += 1
                    if restarts > 3:
                        msg = f"API {server}: list continue token expired (410) {restarts} times"
                        raise SourceError(msg, "http_4xx")
                    params, pods = {"fieldSelector": _node_selector(node), "limit": limit}, []
                    continue
                if resp.status_code != 200:
                    raise _status_error(resp, server, node)
                body = resp.read()
        except httpx.TransportError as e:
            raise _transport_error(e, server) from e
        try:
            lst = list_decoder.decode(body)
        except msgspec.DecodeError as e:
            raise SourceError(f"API {server} sent an invalid PodList: {e}", "decode") from e
        pods.extend(lst.items or [])
        if not lst.metadata.continue_:
            return pods, lst.metadata.resourceVersion
        params = {"fieldSelector": _node_selector(node), "limit": limit, "continue": lst.metadata.continue_}


def watch_pods(
    client: Any,
    node: str,
    rv: str,
    *,
    on_event: Callable[[str, Pod], None],
    stopped: Callable[[], bool],
    watch_timeout: int = 300,
    on_response: Callable[[Any], None] | None = None,
) -> tuple[str, int, str]:
    """Watch the pods of `node` from `rv` until the stream ends: (last rv, events seen, how it ended).

    How it ended: "ended" (the server closed it), "dropped" (the connection
    broke after an answer: re-watch from rv) or "stopped" (`stopped()` was
    true). ADDED, MODIFIED and DELETED pods go to `on_event(type, pod)`;
    a BOOKMARK only moves rv. Raises Gone (relist) or SourceError (no
    answer: reconnect after backoff). `on_response` as in :func:`list_pods`.
    """
    httpx = _httpx()
    server = str(client.base_url)
    params = {
        "watch": "true",
        "fieldSelector": _node_selector(node),
        "resourceVersion": rv,
        "allowWatchBookmarks": "true",
        # Server-side end of each watch, spread so nodes do not reconnect together.
        "timeoutSeconds": str(int(watch_timeout * random.uniform(1.0, 2.0))),
    }
    # Read timeout past the server's own end: catches half-open connections.
    timeout = httpx.Timeout(10.0, read=watch_timeout * 2.0 + 30.0)
    events = 0
    answered = False
    try:
        with client.stream("GET", PODS_PATH, params=params, timeout=timeout) as resp:
            if on_response is not None:
                on_response(resp)
            if stopped():
                return rv, events, "stopped"
            if resp.status_code != 200:
                raise _status_error(resp, server, node)
            answered = True
            for line in resp.iter_lines():
                if line.strip():
                    rv = _read_event(line, rv, on_event)
                    events += 1
    except httpx.TransportError as e:
        if stopped():
            return rv, events, "stopped"
        if not answered:
            raise _transport_error(e, server) from e
        log.info("pod specs: watch connection dropped (%s: %s); re-watching", type(e).__name__, e)
        return rv, events, "dropped"
    return rv, events, "ended"


def _read_event(line: str, rv: str, on_event: Callable[[str, Pod], None]) -> str:
    try:
        ev = event_decoder.decode(line)
    except msgspec.DecodeError as e:
        raise SourceError(f"invalid watch event from the API: {e}", "decode") from e
    if ev.type == "ERROR":
        st = status_decoder.decode(ev.object)
        if st.code == 410:
            raise Gone(st.message)
        raise SourceError(f"watch error {st.code} {st.reason}: {st.message}", f"watch_{st.code}")
    try:
        pod = pod_decoder.decode(ev.object)
    except msgspec.DecodeError as e:
        raise SourceError(f"invalid Pod in a watch event: {e}", "decode") from e
    if pod.metadata.resourceVersion:
        rv = pod.metadata.resourceVersion
    if ev.type in ("ADDED", "MODIFIED", "DELETED"):
        on_event(ev.type, pod)
    # BOOKMARK: only the resourceVersion moves.
    return rv

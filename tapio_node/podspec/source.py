"""Pod specs of the pods on this node: which ConfigMap, Secret or token is behind each volume key.

The kubelet path only names the pod-spec *volume* (``kubernetes.io~secret/certs``);
the object (``web-tls``) is only in the pod spec, and a projected volume mixes
several sources. :class:`PodSpecs` keeps the specs of this node's pods in memory,
off the event hot path: :meth:`PodSpecs.get` is a dict lookup that never blocks.

Sources, each optional, merged:

* static pod manifests in ``static_pods_path`` (the kubelet names their pods
  ``<name>-<node>`` and gives them a config-hash UID we cannot recompute, so they
  are also found by namespace/name, see :meth:`PodSpecs.get_by_name`);
* the Kubernetes API, list then watch of ``pods`` with
  ``fieldSelector=spec.nodeName=<node>`` (exactly what the kubelet itself asks,
  so the Node authorizer allows it), using the node's kubeconfig (kubeadm's
  ``/etc/kubernetes/kubelet.conf``) or, as a DaemonSet, the in-cluster
  service account.

Client library: **lightkube**. It is small, maintained, typed, already decodes
with msgspec (our own dependency) and does the parts that are easy to get
wrong: kubeconfig parsing (client certificate/key as files or inline data, CA
bundles, bearer tokens, ``tokenFile`` re-read on 401 for rotated tokens, exec
credential plugins, relative paths), in-cluster config, and an httpx client with
TLS set up. The official ``kubernetes`` client is much larger (generated models,
urllib3) and its watch neither relists after 410 nor can be stopped while
blocked. The list/watch protocol itself lives here (about a hundred lines)
because we need what lightkube's ``watch()`` does not give: a *relist* after
410 Gone (a bare re-watch would miss deletions), bookmarks, capped jittered
backoff, a fresh client (re-read certificates) after each failure, and a
:meth:`PodSpecs.stop` that interrupts a blocked read. Objects are decoded with
msgspec into the few fields we use; unknown fields are ignored.

Configuring each source (``kernel_collector:`` keys):

* static pods: ``static_pods_path`` (default ``/etc/kubernetes/manifests``).
* node kubeconfig: ``kubeconfig`` (default ``/etc/kubernetes/kubelet.conf``, used
  when readable; its client certificate, usually
  ``/var/lib/kubelet/pki/kubelet-client-current.pem``, must be readable too).
  ``node_name`` must be the node's name in the cluster (default: ``$NODE_NAME``,
  else the host name).
* in-cluster: run as a DaemonSet with ``env: NODE_NAME`` from ``spec.nodeName``
  and a service account bound to a ClusterRole allowing ``get, list, watch`` on
  ``pods``; used when no kubeconfig is readable.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import stat
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import msgspec
import yaml

log = logging.getLogger(__name__)

DEFAULT_KUBECONFIG = "/etc/kubernetes/kubelet.conf"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
MAX_MANIFEST_BYTES = 1 << 20
PODS_PATH = "/api/v1/pods"


# ---------------------------------------------------------------- public types


class KeySource(msgspec.Struct, frozen=True):
    """Where one file of a volume comes from."""

    # "configmap" | "secret" | "serviceAccountToken" | "downwardAPI" | "clusterTrustBundle" | "podCertificate"
    kind: str
    name: str | None  # object name; service account for tokens; None for downwardAPI
    key: str | None  # key inside the object (after items[].path remapping); fieldPath for downwardAPI


class VolumeMeta(msgspec.Struct, frozen=True):
    name: str
    kind: str  # "configmap" | "secret" | "projected" | "downwardAPI"
    object_name: str | None = None  # ConfigMap/Secret name of a configmap/secret volume
    paths: dict[str, KeySource] = {}  # on-disk path -> source, for explicitly mapped files
    # Sources that project all their keys (no items): any other path is theirs.
    fallback: tuple[KeySource, ...] = ()


class PodMeta(msgspec.Struct, frozen=True):
    uid: str
    namespace: str
    name: str
    labels: dict[str, str] = {}
    app_name: str | None = None
    service_account: str | None = None
    workload_kind: str | None = None
    workload_name: str | None = None
    volumes: dict[str, VolumeMeta] = {}
    source: str = "api"  # "api" | "static"
    mirror_uid: str | None = None  # kubelet's UID of a static pod seen through its mirror pod

    def resolve(self, volume_name: str, key: str) -> KeySource | None:
        """The source of file `key` (path relative to the volume dir) of volume `volume_name`.

        None when the volume is not in the spec or, in a projected volume, when
        several sources could provide the key (it cannot be told from the spec).
        """
        vol = self.volumes.get(volume_name)
        if vol is None:
            return None
        key = _normalize_key(key)
        hit = vol.paths.get(key)
        if hit is not None:
            return hit
        if len(vol.fallback) == 1:
            src = vol.fallback[0]
            return KeySource(src.kind, src.name, key or None)
        if vol.kind in ("configmap", "secret"):
            # items[] listed but this path is not one of them: the object is still known.
            return KeySource(vol.kind, vol.object_name, None)
        return None


def _normalize_key(key: str) -> str:
    # The atomic writer's "..data/" and "..<timestamp>/" dirs hold the real files.
    parts = [p for p in key.split("/") if p and p != "."]
    while parts and parts[0].startswith(".."):
        parts.pop(0)
    return "/".join(parts)


# ------------------------------------------------- wire shapes (decode subset)


class _KeyToPath(msgspec.Struct):
    key: str = ""
    path: str = ""


class _ObjVolume(msgspec.Struct):
    name: str | None = None  # configMap volumes and all projections
    secretName: str | None = None  # secret volumes
    items: list[_KeyToPath] | None = None


class _FieldRef(msgspec.Struct):
    fieldPath: str = ""


class _ResourceFieldRef(msgspec.Struct):
    resource: str = ""


class _DownwardItem(msgspec.Struct):
    path: str = ""
    fieldRef: _FieldRef | None = None
    resourceFieldRef: _ResourceFieldRef | None = None


class _DownwardAPI(msgspec.Struct):
    items: list[_DownwardItem] | None = None


class _SAToken(msgspec.Struct):
    path: str = ""


class _TrustBundle(msgspec.Struct):
    path: str = ""
    name: str | None = None
    signerName: str | None = None


class _PodCertificate(msgspec.Struct):
    signerName: str | None = None
    credentialBundlePath: str | None = None
    keyPath: str | None = None
    certificateChainPath: str | None = None


class _Projection(msgspec.Struct):
    configMap: _ObjVolume | None = None
    secret: _ObjVolume | None = None
    serviceAccountToken: _SAToken | None = None
    downwardAPI: _DownwardAPI | None = None
    clusterTrustBundle: _TrustBundle | None = None
    podCertificate: _PodCertificate | None = None


class _Projected(msgspec.Struct):
    sources: list[_Projection] | None = None


class _Volume(msgspec.Struct):
    name: str = ""
    configMap: _ObjVolume | None = None
    secret: _ObjVolume | None = None
    projected: _Projected | None = None
    downwardAPI: _DownwardAPI | None = None


class _OwnerRef(msgspec.Struct):
    kind: str = ""
    name: str = ""
    controller: bool | None = None


class _ObjectMeta(msgspec.Struct):
    name: str = ""
    namespace: str = ""
    uid: str = ""
    resourceVersion: str = ""
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    ownerReferences: list[_OwnerRef] | None = None


class _PodSpec(msgspec.Struct):
    nodeName: str | None = None
    serviceAccountName: str | None = None
    serviceAccount: str | None = None  # deprecated alias
    volumes: list[_Volume] | None = None


class _Pod(msgspec.Struct):
    kind: str | None = None
    metadata: _ObjectMeta = msgspec.field(default_factory=_ObjectMeta)
    spec: _PodSpec = msgspec.field(default_factory=_PodSpec)


class _ListMeta(msgspec.Struct):
    resourceVersion: str = ""
    continue_: str | None = msgspec.field(default=None, name="continue")


class _PodList(msgspec.Struct):
    metadata: _ListMeta = msgspec.field(default_factory=_ListMeta)
    items: list[_Pod] | None = None


class _Status(msgspec.Struct):
    code: int = 0
    reason: str = ""
    message: str = ""


class _WatchEvent(msgspec.Struct):
    type: str
    object: msgspec.Raw


_pod_decoder = msgspec.json.Decoder(_Pod)
_list_decoder = msgspec.json.Decoder(_PodList)
_event_decoder = msgspec.json.Decoder(_WatchEvent)
_status_decoder = msgspec.json.Decoder(_Status)


# ------------------------------------------------------ pod spec -> PodMeta


_CONFIG_MIRROR = "kubernetes.io/config.mirror"


def pod_meta(pod: _Pod, *, source: str = "api") -> PodMeta:
    """Reduce a decoded Pod object to what events need."""
    md, spec = pod.metadata, pod.spec
    labels = dict(md.labels or {})
    sa = spec.serviceAccountName or spec.serviceAccount or None
    kind, wname = _workload(md.ownerReferences or [], labels)
    vols = {}
    for v in spec.volumes or []:
        vm = _volume_meta(v, sa)
        if vm is not None:
            vols[vm.name] = vm
    mirror = (md.annotations or {}).get(_CONFIG_MIRROR) or None
    return PodMeta(
        uid=md.uid,
        namespace=md.namespace or "default",
        name=md.name,
        labels=labels,
        app_name=labels.get("app.kubernetes.io/name"),
        service_account=sa,
        workload_kind=kind,
        workload_name=wname,
        volumes=vols,
        source=source,
        mirror_uid=mirror,
    )


def _workload(owners: list[_OwnerRef], labels: dict[str, str]) -> tuple[str | None, str | None]:
    ref = next((o for o in owners if o.controller), owners[0] if owners else None)
    if ref is None:
        return None, None
    if ref.kind == "ReplicaSet":
        # The Deployment controller names its ReplicaSets <deployment>-<pod-template-hash>
        # and puts the hash on every pod; without the label it is a bare ReplicaSet.
        h = labels.get("pod-template-hash")
        if h and ref.name.endswith("-" + h):
            return "Deployment", ref.name[: -len(h) - 1]
    return ref.kind or None, ref.name or None


def _items_map(kind: str, name: str | None, items: list[_KeyToPath]) -> dict[str, KeySource]:
    return {_normalize_key(it.path): KeySource(kind, name, it.key) for it in items if it.path}


def _downward_map(d: _DownwardAPI) -> dict[str, KeySource]:
    out = {}
    for it in d.items or []:
        ref = (it.fieldRef and it.fieldRef.fieldPath) or (it.resourceFieldRef and it.resourceFieldRef.resource) or None
        if it.path:
            out[_normalize_key(it.path)] = KeySource("downwardAPI", None, ref)
    return out


def _volume_meta(v: _Volume, service_account: str | None) -> VolumeMeta | None:
    if v.configMap is not None:
        return _object_volume(v.name, "configmap", v.configMap.name, v.configMap.items)
    if v.secret is not None:
        return _object_volume(v.name, "secret", v.secret.secretName, v.secret.items)
    if v.downwardAPI is not None:
        return VolumeMeta(v.name, "downwardAPI", paths=_downward_map(v.downwardAPI))
    if v.projected is not None:
        return _projected_volume(v.name, v.projected, service_account)
    return None  # emptyDir, hostPath, PVC...: not watched


def _object_volume(vname: str, kind: str, obj: str | None, items: list[_KeyToPath] | None) -> VolumeMeta:
    if items:
        return VolumeMeta(vname, kind, obj, paths=_items_map(kind, obj, items))
    return VolumeMeta(vname, kind, obj, fallback=(KeySource(kind, obj, None),))


def _projected_volume(vname: str, proj: _Projected, service_account: str | None) -> VolumeMeta:
    paths: dict[str, KeySource] = {}
    fallback: list[KeySource] = []
    for s in proj.sources or []:
        if s.serviceAccountToken is not None and s.serviceAccountToken.path:
            paths[_normalize_key(s.serviceAccountToken.path)] = KeySource("serviceAccountToken", service_account, None)
        for kind, obj in (("configmap", s.configMap), ("secret", s.secret)):
            if obj is None:
                continue
            if obj.items:
                paths.update(_items_map(kind, obj.name, obj.items))
            else:
                fallback.append(KeySource(kind, obj.name, None))
        if s.downwardAPI is not None:
            paths.update(_downward_map(s.downwardAPI))
        ctb = s.clusterTrustBundle
        if ctb is not None and ctb.path:
            paths[_normalize_key(ctb.path)] = KeySource("clusterTrustBundle", ctb.name or ctb.signerName, None)
        pc = s.podCertificate
        if pc is not None:
            for p in (pc.credentialBundlePath, pc.keyPath, pc.certificateChainPath):
                if p:
                    paths[_normalize_key(p)] = KeySource("podCertificate", pc.signerName, None)
    return VolumeMeta(vname, "projected", paths=paths, fallback=tuple(fallback))


# ------------------------------------------------------------ static pods


class ManifestError(ValueError):
    pass


def _dns1123(s: str, limit: int = 253) -> bool:
    if not s or len(s) > limit or s[0] in "-." or s[-1] in "-.":
        return False
    return all(c.islower() or c.isdigit() or c in "-." for c in s)


def read_manifest(path: str, node_name: str) -> PodMeta:
    """One static pod manifest (YAML or JSON Pod) as the kubelet names it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise ManifestError(f"cannot open: {e.strerror}") from e
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ManifestError("not a regular file")
        data = f.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        doc = yaml.safe_load(data)
    except yaml.YAMLError as e:
        raise ManifestError(f"not YAML/JSON: {e}") from e
    if not isinstance(doc, dict) or doc.get("kind") != "Pod":
        raise ManifestError("expected a Pod object (kind: Pod)")
    try:
        pod = msgspec.convert(doc, _Pod)
    except msgspec.ValidationError as e:
        raise ManifestError(f"invalid Pod: {e}") from e
    base = pod.metadata.name
    if not _dns1123(base):
        raise ManifestError(f"metadata.name {base!r} is not a DNS-1123 name")
    ns = pod.metadata.namespace or "default"
    if not _dns1123(ns, 63):
        raise ManifestError(f"metadata.namespace {ns!r} is not a DNS-1123 label")
    # The kubelet names a static pod <name>-<node> (pkg/kubelet/config/common.go).
    pod.metadata.name = f"{base}-{node_name.lower()}"
    pod.metadata.namespace = ns
    pod.metadata.ownerReferences = [_OwnerRef(kind="Node", name=node_name, controller=True)]
    return pod_meta(pod, source="static")


def scan_manifests(dirpath: str, node_name: str) -> tuple[list[PodMeta], list[tuple[str, str]]]:
    """All static pods in `dirpath` and the files that could not be read, with why."""
    pods, errors = [], []
    for entry in sorted(os.scandir(dirpath), key=lambda e: e.name):
        # The kubelet skips hidden files too.
        if entry.name.startswith(".") or not entry.is_file():
            continue
        try:
            pods.append(read_manifest(entry.path, node_name))
        except ManifestError as e:
            errors.append((entry.path, str(e)))
    return pods, errors


def _dir_signature(dirpath: str) -> tuple | None:
    try:
        entries = list(os.scandir(dirpath))
    except OSError:
        return None
    sig = []
    for e in entries:
        try:
            st = e.stat()
        except OSError:
            continue
        sig.append((e.name, st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(sorted(sig))


# ------------------------------------------------------------- API access


class SourceError(Exception):
    """An API source failed; `reason` is a bounded metric label, the message says what to do."""

    def __init__(self, message: str, reason: str = "error") -> None:
        super().__init__(message)
        self.reason = reason


class _Gone(Exception):
    pass


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
        st = _status_decoder.decode(resp.read())
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
        return _Gone(detail)
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
) -> tuple[list[_Pod], str]:
    """All pods of `node` and the list's resourceVersion. Raises SourceError or _Gone.

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
    pods: list[_Pod] = []
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
            lst = _list_decoder.decode(body)
        except msgspec.DecodeError as e:
            raise SourceError(f"API {server} sent an invalid PodList: {e}", "decode") from e
        pods.extend(lst.items or [])
        if not lst.metadata.continue_:
            return pods, lst.metadata.resourceVersion
        params = {"fieldSelector": _node_selector(node), "limit": limit, "continue": lst.metadata.continue_}


# ------------------------------------------------------------------ metrics


_metrics_cache: "weakref.WeakKeyDictionary[Any, _Metrics]" = weakref.WeakKeyDictionary()


class _Metrics:
    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter, Gauge

        self.up = Gauge(
            "kernel_monitor_podspec_source_up",
            "1 when pod specs come from the Kubernetes API (list+watch healthy), else 0",
            registry=registry,
        )
        self.pods = Gauge("kernel_monitor_podspec_pods", "Pod specs known, by source", ["source"], registry=registry)
        self.relists = Counter("kernel_monitor_podspec_relists_total", "Full pod lists from the API", registry=registry)
        self.restarts = Counter(
            "kernel_monitor_podspec_watch_restarts_total", "Pod watches restarted, by reason", ["reason"],
            registry=registry,
        )
        self.errors = Counter(
            "kernel_monitor_podspec_errors_total", "Pod spec source errors, by reason", ["reason"], registry=registry
        )


def _metrics_for(metrics: Any) -> _Metrics | None:
    if metrics is None:
        return None
    registry = getattr(metrics, "registry", metrics)
    m = _metrics_cache.get(registry)
    if m is None:
        m = _metrics_cache[registry] = _Metrics(registry)
    return m


# ------------------------------------------------------------------ PodSpecs


class _Snapshot(msgspec.Struct, frozen=True):
    by_uid: dict[str, PodMeta] = {}
    by_name: dict[tuple[str, str], PodMeta] = {}


class PodSpecs:
    """Pod specs of this node's pods, kept current by a background thread.

    Lookups (:meth:`get`, :meth:`get_by_name`) read an immutable snapshot that
    the threads replace whole, so they never wait for a lock.
    """

    def __init__(
        self,
        *,
        static_pods_path: str,
        kubeconfig: str | None,
        node_name: str,
        in_cluster: bool | None = None,
        on_state: Callable[[bool, str], None] | None = None,
        metrics: Any = None,
        service_account_dir: str = SERVICE_ACCOUNT_DIR,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        static_interval: float = 2.0,
        watch_timeout: int = 300,
        tombstone_ttl: float = 300.0,
    ) -> None:
        self.static_pods_path = static_pods_path
        self.kubeconfig = kubeconfig
        self.node_name = (node_name or socket.gethostname()).lower()
        self.in_cluster = in_cluster
        self.service_account_dir = service_account_dir
        self._on_state = on_state
        self._m = _metrics_for(metrics)
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._static_interval = static_interval
        self._watch_timeout = watch_timeout
        self._tombstone_ttl = tombstone_ttl

        self.up = False
        self.api_source: str | None = None  # e.g. "kubeconfig /etc/kubernetes/kubelet.conf"
        self.last_error: str | None = None
        self._static_ok = False
        self._api_hopeful = False  # True while the API may still deliver a missing pod soon

        self._api: dict[str, PodMeta] = {}
        self._static: list[PodMeta] = []
        self._gone: dict[str, tuple[float, PodMeta]] = {}
        self._snap = _Snapshot()
        self._write = threading.Lock()
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._sock_lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._warned = False

    # ----------------------------------------------------------- public API

    @property
    def source(self) -> str:
        parts = [p for p, on in (("static", self._static_ok), ("api", self.up)) if on]
        return "+".join(parts) or "none"

    def start(self) -> None:
        if self._threads:
            return
        self._stop.clear()
        self._api_hopeful = True
        for name, fn in (("tapio-podspec-static", self._run_static), ("tapio-podspec-api", self._run_api)):
            t = threading.Thread(target=self._guard, args=(fn,), name=name, daemon=True)
            self._threads.append(t)
            t.start()

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        self._interrupt()
        with self._changed:
            self._changed.notify_all()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                # Stuck in a connect; it is a daemon thread and exits at its next check.
                log.debug("pod specs: thread %s still finishing", t.name)
        self._threads = []

    def get(self, pod_uid: str) -> PodMeta | None:
        return self._snap.by_uid.get(pod_uid)

    def get_by_name(self, namespace: str, name: str) -> PodMeta | None:
        return self._snap.by_name.get((namespace, name))

    def wait_for(self, pod_uid: str, timeout: float) -> PodMeta | None:
        """get(), waiting up to `timeout` s while the API may still deliver the pod."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                meta = self.get(pod_uid)
                if meta is not None or not self._api_hopeful or self._stop.is_set():
                    return meta
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(left)

    def pods(self) -> list[PodMeta]:
        """Every known pod spec (a copy)."""
        return list(self._snap.by_name.values())

    # --------------------------------------------------------- index upkeep

    def _rebuild(self) -> None:
        now = time.monotonic()
        with self._write:
            self._gone = {u: (t, m) for u, (t, m) in self._gone.items() if t > now}
            by_uid: dict[str, PodMeta] = {}
            by_name: dict[tuple[str, str], PodMeta] = {}
            # Later layers win: tombstones < static manifests < live API objects.
            layers = [[m for _, m in self._gone.values()], self._static, list(self._api.values())]
            for layer in layers:
                for m in layer:
                    for uid in (m.uid, m.mirror_uid):
                        if uid:
                            by_uid[uid] = m
                    by_name[(m.namespace, m.name)] = m
            self._snap = _Snapshot(by_uid, by_name)
            if self._m:
                self._m.pods.labels("api").set(len(self._api))
                self._m.pods.labels("static").set(len(self._static))
        with self._changed:
            self._changed.notify_all()

    def _replace_api(self, metas: list[PodMeta]) -> None:
        new = {m.uid: m for m in metas if m.uid}
        dead = time.monotonic() + self._tombstone_ttl
        with self._write:
            for uid, m in self._api.items():
                if uid not in new:
                    self._gone[uid] = (dead, m)
            self._api = new
        self._rebuild()

    def _upsert_api(self, m: PodMeta) -> None:
        with self._write:
            if not m.uid or self._api.get(m.uid) == m:
                return  # most MODIFIED events are status changes: nothing we keep
            self._api[m.uid] = m
            self._gone.pop(m.uid, None)
        self._rebuild()

    def _delete_api(self, m: PodMeta) -> None:
        with self._write:
            old = self._api.pop(m.uid, m)
            # Its processes may still open files for a moment; keep the spec a while.
            self._gone[m.uid] = (time.monotonic() + self._tombstone_ttl, old)
        self._rebuild()

    # ----------------------------------------------------------- state

    def _set_state(self, up: bool, text: str, reason: str | None = None) -> None:
        was = self.up
        self.up = up
        self._api_hopeful = up
        if self._m:
            self._m.up.set(1 if up else 0)
            if reason:
                self._m.errors.labels(reason).inc()
        if up:
            self.last_error = None
            if not was:
                log.info("pod specs: %s", text)
        else:
            self.last_error = text
            if was or not self._warned:
                self._warned = True
                log.warning(
                    "pod specs: no Kubernetes API source (%s); events name volumes, not objects "
                    "(config_name_source=volume_name) until it works; retrying with backoff",
                    text,
                )
            else:
                log.debug("pod specs: still down: %s", text)
        with self._changed:
            self._changed.notify_all()
        if self._on_state is not None and (up != was or not up):
            try:
                self._on_state(up, text)
            except Exception:
                log.exception("pod specs: on_state callback failed")

    def _backoff(self, attempt: int) -> float:
        d = min(self._backoff_cap, self._backoff_base * (2 ** min(max(attempt - 1, 0), 30)))
        return d / 2 + random.uniform(0, d / 2)  # jitter: nodes must not relist in lockstep

    def _guard(self, fn: Callable[[], None]) -> None:
        # The thread never dies of a bug: log it and run the loop again after a pause.
        while not self._stop.is_set():
            try:
                fn()
                return
            except Exception:
                log.exception("pod specs: %s failed; restarting it", threading.current_thread().name)
                self._stop.wait(self._backoff_cap)

    # ---------------------------------------------------------- static

    def _run_static(self) -> None:
        last = ("init",)
        while not self._stop.is_set():
            sig = _dir_signature(self.static_pods_path)
            if sig != last:
                last = sig
                self._load_static(sig is not None)
            self._stop.wait(self._static_interval)

    def _load_static(self, exists: bool) -> None:
        pods: list[PodMeta] = []
        if exists:
            try:
                pods, errors = scan_manifests(self.static_pods_path, self.node_name)
            except OSError as e:
                log.warning("pod specs: cannot read static pod manifests in %s: %s", self.static_pods_path, e)
                exists = False
            else:
                for path, why in errors:
                    log.warning("pod specs: skipping static pod manifest %s: %s", path, why)
        with self._write:
            self._static = pods
            self._static_ok = exists
        self._rebuild()

    # -------------------------------------------------------------- API

    def _run_api(self) -> None:
        attempt = gone_streak = 0
        relist_rv: str | None = "0"
        while not self._stop.is_set():
            client = None
            try:
                cfg, desc = api_config(
                    kubeconfig=self.kubeconfig, in_cluster=self.in_cluster, service_account_dir=self.service_account_dir
                )
                client = api_client(cfg)
                self.api_source = desc
                rv = self._relist(client, relist_rv)
                relist_rv = rv
                self._set_state(True, f"watching pods of node {self.node_name} via {desc}")
                attempt = 0
                while not self._stop.is_set():
                    began = time.monotonic()
                    rv, events, dropped = self._watch(client, rv)
                    relist_rv = rv
                    if events:
                        attempt = gone_streak = 0
                    if dropped or (not events and time.monotonic() - began < 1.0):
                        # Dropped, or ended at once with nothing in it: re-watch from rv, without spinning.
                        attempt += 1
                        self._stop.wait(self._backoff(attempt))
            except _Gone:
                # Our resourceVersion is compacted away: only a fresh list is complete.
                relist_rv = None
                gone_streak += 1
                if self._m:
                    self._m.restarts.labels("gone").inc()
                log.info("pod specs: watch expired (410 Gone); relisting")
                if gone_streak > 1:
                    # Gone again right after a relist: do not hammer the API server.
                    self._stop.wait(self._backoff(gone_streak))
                continue
            except SourceError as e:
                if self._stop.is_set():
                    return
                attempt += 1
                if attempt >= 2 and relist_rv:
                    # Our resourceVersion may be what the server rejects ("too large" after
                    # an etcd restore): take any cached state, cheap for a recovering server.
                    relist_rv = "0"
                self._set_state(False, str(e), e.reason)
                self._stop.wait(self._backoff(attempt))
            except Exception as e:  # e.g. a vanished tokenFile, a failing exec plugin: never kill the thread
                if self._stop.is_set():
                    return
                attempt += 1
                log.debug("pod specs: unexpected error", exc_info=True)
                self._set_state(False, f"{type(e).__name__}: {e}", "internal")
                self._stop.wait(self._backoff(attempt))
            finally:
                if client is not None:
                    client.close()

    def _relist(self, client: Any, rv: str | None) -> str:
        try:
            try:
                pods, new_rv = list_pods(client, self.node_name, resource_version=rv, on_response=self._track_socket)
            except _Gone:
                if rv is None:
                    raise SourceError("API answered 410 Gone to a fresh list", "http_4xx") from None
                pods, new_rv = list_pods(client, self.node_name, resource_version=None, on_response=self._track_socket)
        finally:
            with self._sock_lock:
                self._sock = None
        self._replace_api([pod_meta(p) for p in pods])
        if self._m:
            self._m.relists.inc()
        return new_rv

    def _interrupt(self) -> None:
        with self._sock_lock:
            s = self._sock
        if s is not None:
            try:
                # Plain shutdown(), not SSLSocket's: wakes the thread blocked in recv.
                socket.socket.shutdown(s, socket.SHUT_RDWR)
            except OSError:
                pass

    def _watch(self, client: Any, rv: str) -> tuple[str, int, bool]:
        """Watch from `rv` until the stream ends: (last rv, events seen, dropped?).

        Raises _Gone (relist) or SourceError (no answer: reconnect after backoff).
        """
        httpx = _httpx()
        server = str(client.base_url)
        params = {
            "watch": "true",
            "fieldSelector": _node_selector(self.node_name),
            "resourceVersion": rv,
            "allowWatchBookmarks": "true",
            # Server-side end of each watch, spread so nodes do not reconnect together.
            "timeoutSeconds": str(int(self._watch_timeout * random.uniform(1.0, 2.0))),
        }
        # Read timeout past the server's own end: catches half-open connections.
        timeout = httpx.Timeout(10.0, read=self._watch_timeout * 2.0 + 30.0)
        events = 0
        answered = False
        try:
            with client.stream("GET", PODS_PATH, params=params, timeout=timeout) as resp:
                self._track_socket(resp)
                if self._stop.is_set():
                    return rv, events, False
                if resp.status_code != 200:
                    raise _status_error(resp, server, self.node_name)
                answered = True
                for line in resp.iter_lines():
                    if line.strip():
                        rv = self._on_event(line, rv)
                        events += 1
        except httpx.TransportError as e:
            if self._stop.is_set():
                return rv, events, False
            if not answered:
                raise _transport_error(e, server) from e
            if self._m:
                self._m.restarts.labels("dropped").inc()
            log.info("pod specs: watch connection dropped (%s: %s); re-watching", type(e).__name__, e)
            return rv, events, True
        finally:
            with self._sock_lock:
                self._sock = None
        if self._m:
            self._m.restarts.labels("ended").inc()
        return rv, events, False

    def _track_socket(self, resp: Any) -> None:
        stream = resp.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        with self._sock_lock:
            self._sock = sock
        if self._stop.is_set():
            self._interrupt()  # stop() ran before the socket was known

    def _on_event(self, line: str, rv: str) -> str:
        try:
            ev = _event_decoder.decode(line)
        except msgspec.DecodeError as e:
            raise SourceError(f"invalid watch event from the API: {e}", "decode") from e
        if ev.type == "ERROR":
            st = _status_decoder.decode(ev.object)
            if st.code == 410:
                raise _Gone(st.message)
            raise SourceError(f"watch error {st.code} {st.reason}: {st.message}", f"watch_{st.code}")
        try:
            pod = _pod_decoder.decode(ev.object)
        except msgspec.DecodeError as e:
            raise SourceError(f"invalid Pod in a watch event: {e}", "decode") from e
        if pod.metadata.resourceVersion:
            rv = pod.metadata.resourceVersion
        if ev.type in ("ADDED", "MODIFIED"):
            self._upsert_api(pod_meta(pod))
        elif ev.type == "DELETED":
            self._delete_api(pod_meta(pod))
        # BOOKMARK: only the resourceVersion moves.
        return rv


def node_name_of(kc: Any) -> str:
    """The configured node name, else $NODE_NAME (a DaemonSet's downward-API env), else the host name."""
    return kc.node_name or os.environ.get("NODE_NAME") or socket.gethostname()


def from_config(kc: Any, **kw: Any) -> PodSpecs:
    """PodSpecs for a config.KernelCollector (kubeconfig, node_name, static_pods_path); not started."""
    return PodSpecs(
        static_pods_path=kc.static_pods_path,
        kubeconfig=kc.kubeconfig or None,
        node_name=node_name_of(kc),
        **kw,
    )


# --------------------------------------------------------------------- check


CheckResult = tuple[bool, str, str]


def check(
    *,
    static_pods_path: str,
    kubeconfig: str | None,
    node_name: str,
    in_cluster: bool | None = None,
    service_account_dir: str = SERVICE_ACCOUNT_DIR,
    timeout: float = 5.0,
) -> list[CheckResult]:
    """For `tapio-node check`: which pod-spec sources work. Each item is (ok, text, fix)."""
    node = (node_name or socket.gethostname()).lower()
    out: list[CheckResult] = []
    if os.path.isdir(static_pods_path):
        try:
            pods, errors = scan_manifests(static_pods_path, node)
        except OSError as e:
            text = f"static pod manifests: cannot read {static_pods_path}: {e}"
            out.append((False, text, "check the directory's permissions"))
        else:
            out.append((True, f"static pod manifests: {len(pods)} pod(s) in {static_pods_path}", ""))
            for path, why in errors:
                fix = "fix or remove the file (the kubelet cannot run it either)"
                out.append((False, f"static pod manifest {path}: {why}", fix))
    else:
        out.append((True, f"static pod manifests: {static_pods_path} does not exist (no static pods)", ""))

    fix_creds = (
        f"set kernel_collector.kubeconfig to a kubeconfig allowed to list pods of node {node} "
        f"(kubeadm nodes: {DEFAULT_KUBECONFIG}), or run as a DaemonSet whose service account may list/watch pods"
    )
    try:
        cfg, desc = api_config(kubeconfig=kubeconfig, in_cluster=in_cluster, service_account_dir=service_account_dir)
    except SourceError as e:
        out.append((False, f"pod specs from the API: {e}; events will name volumes, not ConfigMaps/Secrets", fix_creds))
        return out
    client = None
    try:
        client = api_client(cfg, timeout=timeout)
        pods, _ = list_pods(client, node)
    except (SourceError, _Gone) as e:
        reason = getattr(e, "reason", "")
        fix = {
            "http_401": "renew the client certificate or token in " + desc,
            "http_403": f"set kernel_collector.node_name to this node's name in the cluster (now {node!r}) "
            "or allow the service account to list/watch pods",
            "connect": f"check the server address in {desc} and that this host can reach it",
            "config": f"fix the certificate/key/CA files referenced by {desc}",
        }.get(reason, fix_creds)
        out.append((False, f"pod specs from the API via {desc}: {e}", fix))
    else:
        if pods:
            out.append((True, f"pod specs from the API via {desc}: can list pods of node {node} ({len(pods)} now)", ""))
        else:
            out.append(
                (
                    True,
                    f"pod specs from the API via {desc}: listing works but node {node} has no pods",
                    "if this node runs pods, set kernel_collector.node_name to its name in the cluster",
                )
            )
    finally:
        if client is not None:
            client.close()
    return out


def check_config(kc: Any, *, timeout: float = 5.0) -> list[CheckResult]:
    """check() for a config.KernelCollector."""
    return check(
        static_pods_path=kc.static_pods_path,
        kubeconfig=kc.kubeconfig or None,
        node_name=node_name_of(kc),
        timeout=timeout,
    )

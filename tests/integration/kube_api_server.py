"""A local HTTPS endpoint speaking the Kubernetes pods API, for tests.

No API server can run on the test machine, so this serves what a client of
``/api/v1/pods`` sees: ``PodList`` objects, chunked watch streams of
``{"type": ..., "object": ...}`` lines (ADDED/MODIFIED/DELETED/BOOKMARK, and
ERROR with a 410 ``Status`` once the requested resourceVersion is compacted),
``fieldSelector=spec.nodeName=...`` filtering, client-certificate and bearer
token authentication with 401/403 ``Status`` bodies. Certificates come from
the ``openssl`` CLI: a throwaway CA, a server cert for 127.0.0.1, client certs.
"""

from __future__ import annotations

import copy
import http.server
import json
import os
import socket
import ssl
import subprocess
import threading
from urllib.parse import parse_qs, urlsplit


def _openssl(*args: str, cwd: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


class TestPKI:
    """A CA, a server certificate for 127.0.0.1/localhost, and client certificates, in `directory`."""

    __test__ = False

    def __init__(self, directory: str) -> None:
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        _openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=tapio-test-ca",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=directory,
        )  # fmt: skip
        self.ca = os.path.join(directory, "ca.crt")
        self.server_cert, self.server_key = self._issue(
            "server", "/CN=kube-apiserver", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
        )

    def _issue(self, name: str, subject: str, ext: str) -> tuple[str, str]:
        with open(os.path.join(self.dir, f"{name}.ext"), "w") as f:
            f.write(ext)
        _openssl(
            "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject,
            cwd=self.dir,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext",
            cwd=self.dir,
        )  # fmt: skip
        return os.path.join(self.dir, f"{name}.crt"), os.path.join(self.dir, f"{name}.key")

    def client(self, name: str, node: str) -> tuple[str, str]:
        """A kubelet-style client certificate: O=system:nodes, CN=system:node:<node>."""
        return self._issue(name, f"/O=system:nodes/CN=system:node:{node}", "extendedKeyUsage=clientAuth\n")


def status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}  # fmt: skip


class KubeAPIServer:
    """Pods API on https://127.0.0.1:<port>. Thread-safe controls for tests."""

    def __init__(self, pki: TestPKI, *, port: int = 0, tokens: set[str] | None = None, nodes: set[str] | None = None):
        self.pki = pki
        self.tokens = set(tokens or ())
        self.nodes = set(nodes or ())  # nodes whose client certs are accepted
        self.requests: list[dict] = []  # {"watch": bool, "params": {...}, "user": str}
        self._lock = threading.Condition()
        self._rv = 100
        self._compacted = 0  # watches from a resourceVersion below this get 410
        self._pods: dict[tuple[str, str], dict] = {}
        self._log: list[tuple[int, int, str, dict]] = []  # (seq, rv, type, object)
        self._seq = 0
        self._expire_running = False
        self.expire_continue = False  # continue tokens answer 410 (expired between pages)
        self._watch_socks: set[socket.socket] = set()
        self._closing = False
        self._port = port
        self._httpd: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------- lifecycle

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self._port}"

    def start(self) -> "KubeAPIServer":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.pki.server_cert, self.pki.server_key)
        ctx.load_verify_locations(self.pki.ca)
        ctx.verify_mode = ssl.CERT_OPTIONAL  # client cert or bearer token
        server = self

        class Handler(_Handler):
            api = server

        http.server.ThreadingHTTPServer.allow_reuse_address = True
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self._port), Handler)
        httpd.daemon_threads = True
        httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True, do_handshake_on_connect=False)
        self._port = httpd.server_address[1]
        self._httpd = httpd
        with self._lock:
            self._closing = False
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        self.drop_watches()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    # -------------------------------------------------------------- controls

    def put_pod(self, pod: dict) -> int:
        """Create or update a pod; returns the new resourceVersion."""
        with self._lock:
            self._rv += 1
            pod = copy.deepcopy(pod)
            pod["metadata"]["resourceVersion"] = str(self._rv)
            key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
            kind = "MODIFIED" if key in self._pods else "ADDED"
            self._pods[key] = pod
            self._append(kind, pod)
            self._lock.notify_all()
            return self._rv

    def delete_pod(self, namespace: str, name: str) -> int:
        with self._lock:
            self._rv += 1
            pod = copy.deepcopy(self._pods.pop((namespace, name)))
            pod["metadata"]["resourceVersion"] = str(self._rv)
            self._append("DELETED", pod)
            self._lock.notify_all()
            return self._rv

    def _append(self, kind: str, obj: dict) -> None:
        self._seq += 1
        self._log.append((self._seq, self._rv, kind, obj))
        self._lock.notify_all()

    def remove_pod_silently(self, namespace: str, name: str) -> None:
        """Delete a pod without a DELETED event (as if compacted away): only a relist can notice."""
        with self._lock:
            self._pods.pop((namespace, name))
            self._rv += 1

    def compact(self, *, expire_running: bool = False) -> None:
        """Forget history: new watches from any resourceVersion seen so far get 410 Gone.

        With expire_running, open watches get the 410 ERROR event too (a watch cache too far behind).
        """
        with self._lock:
            self._rv += 1
            self._compacted = self._rv
            self._expire_running = expire_running
            self._lock.notify_all()

    def restore(self, rv: int) -> None:
        """Go back to resourceVersion `rv` with the same pods, as after an etcd restore."""
        with self._lock:
            self._rv = rv
            self._log = []
            self._lock.notify_all()

    def bookmark(self) -> None:
        with self._lock:
            # The shape the API server sends: an empty Pod carrying only the resourceVersion.
            self._append("BOOKMARK", {"kind": "Pod", "apiVersion": "v1",
                                      "metadata": {"resourceVersion": str(self._rv), "creationTimestamp": None},
                                      "spec": {"containers": None}, "status": {}})  # fmt: skip

    def drop_watches(self) -> None:
        """Cut every open watch connection mid-stream (no terminating chunk)."""
        with self._lock:
            socks = list(self._watch_socks)
            self._watch_socks.clear()
            self._lock.notify_all()
        for s in socks:
            try:
                socket.socket.shutdown(s, socket.SHUT_RDWR)
            except OSError:
                pass

    def count(self, *, watch: bool) -> int:
        with self._lock:
            return sum(1 for r in self.requests if r["watch"] == watch)

    def wait(self, predicate, timeout: float = 10.0) -> bool:
        """Wait until predicate() holds (checked on every server-side change)."""
        with self._lock:
            return self._lock.wait_for(predicate, timeout)

    def watching(self) -> int:
        with self._lock:
            return len(self._watch_socks)

    # ------------------------------------------------------- request serving

    def _authenticate(self, handler: "_Handler") -> str | None:
        auth = handler.headers.get("Authorization", "")
        if auth.startswith("Bearer ") and auth[7:].strip() in self.tokens:
            return "token"
        cert = handler.connection.getpeercert()
        if cert:
            subject = {k: v for rdn in cert.get("subject", ()) for k, v in rdn}
            cn = subject.get("commonName", "")
            if subject.get("organizationName") == "system:nodes" and cn.removeprefix("system:node:") in self.nodes:
                return cn
        return None

    def _items(self, node: str | None) -> list[dict]:
        return [p for p in self._pods.values() if node is None or p["spec"].get("nodeName") == node]


def _node_of(params: dict) -> str | None:
    sel = params.get("fieldSelector", "")
    return sel.removeprefix("spec.nodeName=") if sel.startswith("spec.nodeName=") else None


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    api: KubeAPIServer

    def log_message(self, *args) -> None:  # quiet
        pass

    def _json(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        api = self.api
        url = urlsplit(self.path)
        params = {k: v[-1] for k, v in parse_qs(url.query).items()}
        watch = params.get("watch") in ("true", "1")
        user = api._authenticate(self)
        with api._lock:
            api.requests.append({"watch": watch, "params": params, "user": user})
            api._lock.notify_all()
        if user is None:
            return self._json(401, status(401, "Unauthorized", "Unauthorized"))
        if url.path != "/api/v1/pods":
            return self._json(404, status(404, "NotFound", f"the server could not find {url.path}"))
        node = _node_of(params)
        asked = int(params.get("resourceVersion") or 0)
        with api._lock:
            current = api._rv
        if asked > current:
            # The watch cache never reaches that version (e.g. after an etcd restore).
            msg = f"Too large resource version: {asked}, current: {current}"
            return self._json(504, status(504, "Timeout", msg))
        if user.startswith("system:node:") and node != user.removeprefix("system:node:"):
            msg = f'pods is forbidden: User "{user}" cannot list resource "pods" in API group "" at the cluster scope'
            return self._json(403, status(403, "Forbidden", msg))
        if not watch:
            return self._list(node, params)
        self._watch(node, int(params.get("resourceVersion") or 0), params.get("allowWatchBookmarks") == "true")

    def _list(self, node: str | None, params: dict) -> None:
        api = self.api
        with api._lock:
            items = sorted(api._items(node), key=lambda p: (p["metadata"]["namespace"], p["metadata"]["name"]))
            rv = str(api._rv)
            expired = api.expire_continue
        offset = 0
        if "continue" in params:
            if expired:
                msg = "The provided continue parameter is too old to display a consistent list result."
                return self._json(410, status(410, "Expired", msg))
            offset = int(params["continue"])
        limit = int(params.get("limit") or 0)
        meta: dict = {"resourceVersion": rv}
        page = items[offset:]
        if limit and "resourceVersion" not in params and len(page) > limit:
            page = page[:limit]
            meta["continue"] = str(offset + limit)
        body = {"kind": "PodList", "apiVersion": "v1", "metadata": meta, "items": copy.deepcopy(page)}
        return self._json(200, body)

    def _chunk(self, obj: dict) -> None:
        data = json.dumps(obj).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _send(self, entries: list, node: str | None, bookmarks: bool) -> None:
        for _seq, _rv, kind, obj in entries:
            if kind == "BOOKMARK":
                if bookmarks:
                    self._chunk({"type": kind, "object": obj})
            elif node is None or obj["spec"].get("nodeName") == node:
                self._chunk({"type": kind, "object": obj})

    def _watch(self, node: str | None, since: int, bookmarks: bool) -> None:
        api = self.api
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        sock = self.connection
        with api._lock:
            api._watch_socks.add(sock)
            api._lock.notify_all()
        try:
            with api._lock:
                gone = since < api._compacted
                rv_now = api._rv
            if gone:
                # What the API server does when etcd has compacted the requested revision.
                msg = f"too old resource version: {since} ({rv_now})"
                self._chunk({"type": "ERROR", "object": status(410, "Expired", msg)})
            else:
                with api._lock:
                    seen = api._seq
                    backlog = [e for e in api._log if e[1] > since]
                self._send(backlog, node, bookmarks)
                while True:
                    with api._lock:
                        api._lock.wait_for(
                            lambda: api._closing
                            or sock not in api._watch_socks
                            or api._seq > seen
                            or (api._expire_running and since < api._compacted)
                        )
                        if api._closing or sock not in api._watch_socks:
                            return
                        if api._expire_running and since < api._compacted:
                            msg = f"too old resource version: {since} ({api._rv})"
                            self._chunk({"type": "ERROR", "object": status(410, "Expired", msg)})
                            break
                        new = [e for e in api._log if e[0] > seen]
                        seen = api._seq
                    self._send(new, node, bookmarks)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            pass  # dropped by drop_watches() or by the client
        finally:
            with api._lock:
                api._watch_socks.discard(sock)
                api._lock.notify_all()
            self.close_connection = True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_kubeconfig(path: str, server: str, ca: str, *, cert: tuple[str, str] | None = None,
                     token: str | None = None, token_file: str | None = None, inline: bool = False) -> str:  # fmt: skip
    """A kubeconfig like kubeadm's kubelet.conf (client cert) or with a bearer token."""
    import base64

    import yaml

    def data(p: str) -> str:
        with open(p, "rb") as f:
            return base64.b64encode(f.read()).decode()

    cluster = {"server": server}
    if inline:
        cluster["certificate-authority-data"] = data(ca)
    else:
        cluster["certificate-authority"] = ca
    user: dict = {}
    if cert and inline:
        user["client-certificate-data"], user["client-key-data"] = data(cert[0]), data(cert[1])
    elif cert:
        user["client-certificate"], user["client-key"] = cert
    if token:
        user["token"] = token
    if token_file:
        user["tokenFile"] = token_file
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "default-cluster", "cluster": cluster}],
        "contexts": [{"name": "default-context", "context": {"cluster": "default-cluster", "namespace": "default",
                                                             "user": "default-auth"}}],  # fmt: skip
        "current-context": "default-context",
        "users": [{"name": "default-auth", "user": user}],
        "preferences": {},
    }
    with open(path, "w") as f:
        yaml.safe_dump(doc, f)
    return path

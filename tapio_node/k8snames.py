"""The names Kubernetes allows: DNS-1123 labels and subdomains, pod UIDs.

Every name read from disk, a pod spec or a caller is checked here before it
becomes a path component, a map value or a label. Each check takes any
object and answers False for what is not a str.
"""
from __future__ import annotations

import re
import secrets

# Pod UIDs are RFC 4122 UUIDs as the API server generates them.
POD_UID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
# Static pods get the 32-hex hash of their manifest as UID instead (kubelet
# pkg/kubelet/config/common.go); it shows up in cgroup and log dir names too.
STATIC_UID_RE = re.compile(r"[0-9a-f]{32}\Z")
# \Z, not $: $ also matches before a final newline.
LABEL_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
SUBDOMAIN_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
MAX_LABEL = 63
MAX_SUBDOMAIN = 253


def valid_label(name: object) -> bool:
    """A DNS-1123 label: namespaces, volume and container names."""
    return isinstance(name, str) and len(name) <= MAX_LABEL and bool(LABEL_RE.match(name))


def valid_subdomain(name: object) -> bool:
    """A DNS-1123 subdomain: pod, ConfigMap, Secret and node names."""
    return isinstance(name, str) and len(name) <= MAX_SUBDOMAIN and bool(SUBDOMAIN_RE.match(name))


def valid_pod_uid(uid: object) -> bool:
    return isinstance(uid, str) and bool(POD_UID_RE.match(uid) or STATIC_UID_RE.match(uid))


valid_namespace = valid_label
valid_pod_name = valid_subdomain


def check_label(what: str, value: object) -> None:
    """ValueError naming `what` unless value is a DNS-1123 label."""
    if not valid_label(value):
        raise ValueError(f"{what} {value!r} is not a DNS-1123 label "
                         f"(lower-case alphanumerics and '-', at most {MAX_LABEL})")


def check_subdomain(what: str, value: object) -> None:
    """ValueError naming `what` unless value is a DNS-1123 subdomain."""
    if not valid_subdomain(value):
        raise ValueError(f"{what} {value!r} is not a DNS-1123 subdomain "
                         f"(lower-case alphanumerics, '-', '.', at most {MAX_SUBDOMAIN})")


def check_component(what: str, value: object) -> None:
    """ValueError naming `what` unless value is one path component (a key or volume dir name)."""
    if not isinstance(value, str) or not value or "/" in value or value in (".", "..") or "\0" in value:
        raise ValueError(f"{what} {value!r} must be a single path component")


# Characters of generated name suffixes (k8s.io/apimachinery/pkg/util/rand).
_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


def name_suffix(n: int = 5) -> str:
    """A random suffix as the API server appends to generated names."""
    return "".join(secrets.choice(_SUFFIX_ALPHABET) for _ in range(n))


_CONTAINER_ID_RE = re.compile(r"[0-9a-f]{64}\Z")


def valid_container_id(cid: object) -> bool:
    """64 lowercase hex characters, without a runtime prefix."""
    return isinstance(cid, str) and _CONTAINER_ID_RE.match(cid) is not None

"""The Kubernetes name rules the simulated node enforces, as the API server would."""

from __future__ import annotations

import re
import secrets

# Characters of generated name suffixes (k8s.io/apimachinery/pkg/util/rand).
_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def check_dns_label(what: str, value: str) -> None:
    if not isinstance(value, str) or len(value) > 63 or not _DNS1123_LABEL.match(value):
        raise ValueError(f"{what} {value!r} is not a DNS-1123 label (lower-case alphanumerics and '-', at most 63)")


def check_dns_subdomain(what: str, value: str) -> None:
    if not isinstance(value, str) or len(value) > 253 or not _DNS1123_SUBDOMAIN.match(value):
        raise ValueError(f"{what} {value!r} is not a DNS-1123 subdomain (lower-case alphanumerics, '-', '.', at most 253)")


def check_component(what: str, value: str) -> None:
    if not value or "/" in value or value in (".", "..") or "\0" in value:
        raise ValueError(f"{what} {value!r} must be a single path component")


def name_suffix(n: int = 5) -> str:
    """A random suffix as the API server appends to generated names."""
    return "".join(secrets.choice(_SUFFIX_ALPHABET) for _ in range(n))

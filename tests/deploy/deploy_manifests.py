"""deploy/kubernetes/ as `kubectl apply -k` would send it, for the tests.

No kustomize binary is packaged in Debian 12, so this applies the subset
of a kustomization the directory uses (`resources:` and `images:`) and
refuses any other key: a kustomization that grows a feature must grow it
here too, or the tests would check something kubectl never sends.
"""
from __future__ import annotations

import copy
import os

import yaml

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KUBE_DIR = os.path.join(REPO_ROOT, "deploy", "kubernetes")
KUSTOMIZATION = os.path.join(KUBE_DIR, "kustomization.yaml")
SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "images"}


class KustomizeError(Exception):
    pass


def kustomization() -> dict:
    with open(KUSTOMIZATION) as f:
        k = yaml.safe_load(f)
    unknown = set(k) - SUPPORTED_KEYS
    if unknown:
        raise KustomizeError(f"{KUSTOMIZATION}: keys {sorted(unknown)} are not applied by "
                             f"tests/deploy/deploy_manifests.py (it knows {sorted(SUPPORTED_KEYS)})")
    if k.get("kind") != "Kustomization":
        raise KustomizeError(f"{KUSTOMIZATION}: kind is {k.get('kind')!r}, not Kustomization")
    return k


def _pod_containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("containers", []) + spec.get("initContainers", [])


def _set_image(image: str, rules: list[dict]) -> str:
    name, tag = image.rsplit(":", 1) if ":" in image.rsplit("/", 1)[-1] else (image, "")
    for r in rules:
        if r["name"] == name:
            return f"{r.get('newName', name)}:{r.get('newTag', tag or 'latest')}"
    return image


def build() -> list[dict]:
    """The documents `kubectl kustomize deploy/kubernetes` prints, in resource order."""
    k = kustomization()
    docs = []
    for res in k.get("resources", []):
        path = os.path.join(KUBE_DIR, res)
        if not os.path.isfile(path):
            raise KustomizeError(f"{KUSTOMIZATION}: resource {res} does not exist")
        with open(path) as f:
            docs += [d for d in yaml.safe_load_all(f) if d is not None]
    docs = copy.deepcopy(docs)
    for d in docs:
        for c in _pod_containers(d):
            c["image"] = _set_image(c["image"], k.get("images", []))
    return docs


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    if len(found) != 1:
        raise KustomizeError(f"expected one {kind}{' ' + name if name else ''}, found {len(found)}")
    return found[0]


def collector(docs: list[dict]) -> tuple[dict, dict]:
    """(pod spec, the collector container) of the DaemonSet."""
    ds = one(docs, "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    return spec, container


def config_text(docs: list[dict]) -> str:
    """The config.yaml the DaemonSet's ConfigMap volume carries."""
    spec, container = collector(docs)
    (vol,) = [v for v in spec["volumes"] if "configMap" in v]
    cm = one(docs, "ConfigMap", vol["configMap"]["name"])
    return cm["data"]["config.yaml"]

"""What a pod spec says about each volume: the decoded Pod and the PodMeta kept of it.

Pods are decoded with msgspec into the few fields we use (unknown fields
are ignored) and reduced to a :class:`PodMeta`, whose
:meth:`PodMeta.resolve` names the ConfigMap, Secret or token behind each
file of a volume.
"""

from __future__ import annotations

import msgspec


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


class OwnerRef(msgspec.Struct):
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
    ownerReferences: list[OwnerRef] | None = None


class _PodSpec(msgspec.Struct):
    nodeName: str | None = None
    serviceAccountName: str | None = None
    serviceAccount: str | None = None  # deprecated alias
    volumes: list[_Volume] | None = None


class Pod(msgspec.Struct):
    kind: str | None = None
    metadata: _ObjectMeta = msgspec.field(default_factory=_ObjectMeta)
    spec: _PodSpec = msgspec.field(default_factory=_PodSpec)


class _ListMeta(msgspec.Struct):
    resourceVersion: str = ""
    continue_: str | None = msgspec.field(default=None, name="continue")


class PodList(msgspec.Struct):
    metadata: _ListMeta = msgspec.field(default_factory=_ListMeta)
    items: list[Pod] | None = None


class Status(msgspec.Struct):
    code: int = 0
    reason: str = ""
    message: str = ""


class WatchEvent(msgspec.Struct):
    type: str
    object: msgspec.Raw


pod_decoder = msgspec.json.Decoder(Pod)
list_decoder = msgspec.json.Decoder(PodList)
event_decoder = msgspec.json.Decoder(WatchEvent)
status_decoder = msgspec.json.Decoder(Status)


# ------------------------------------------------------ pod spec -> PodMeta


_CONFIG_MIRROR = "kubernetes.io/config.mirror"


def pod_meta(pod: Pod, *, source: str = "api") -> PodMeta:
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


def _workload(owners: list[OwnerRef], labels: dict[str, str]) -> tuple[str | None, str | None]:
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



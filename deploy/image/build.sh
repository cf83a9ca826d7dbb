#!/bin/sh
# The tapio-node container image, as an OCI image archive, built from our
# .deb with no base image and no container registry:
#   1. mmdebstrap makes a Debian 12 (bookworm) root of the Essential
#      packages plus the .deb and its Depends, from the Debian mirror, with
#      docs, man pages and locales left out;
#   2. umoci puts that root in a one-layer OCI image with the container-mode
#      entry point (`tapio-node run --output stdout`: JSON lines on stdout,
#      logs on stderr, no journald, no systemd);
#   3. the OCI layout is archived as an oci-archive tarball
#      (`podman load -i`, `skopeo copy oci-archive:...`).
#
#   deploy/image/build.sh DEB OUT.tar REF
# REF is the image's name:tag (org.opencontainers.image.ref.name), e.g.
# tapio-node:0.1.0. MIRROR= picks the Debian mirror (default: mmdebstrap's
# own Debian mirror, plus bookworm-updates and bookworm-security).
set -eu

[ $# -eq 3 ] || { echo "usage: $0 DEB OUT.tar NAME:TAG" >&2; exit 2; }
DEB=$(realpath "$1")
OUT=$2
REF=$3
TAG=${REF##*:}
[ -f "$DEB" ] || { echo "error: $DEB: no such .deb (make deb)" >&2; exit 1; }
for tool in mmdebstrap umoci; do
    command -v $tool >/dev/null || { echo "error: $tool not installed (make deps)" >&2; exit 1; }
done

# The .deb's Depends, by name (dpkg -i checks the versions): the root gets
# them from the mirror, then the .deb is copied in and installed.
DEPENDS=$(dpkg-deb -f "$DEB" Depends | sed 's/([^)]*)//g; s/|[^,]*//g; s/[[:space:]]//g')

OUTDIR=$(dirname "$OUT")
mkdir -p "$OUTDIR"
WORK=$(mktemp -d "$OUTDIR/.image-XXXXXX")
trap 'rm -rf "$WORK"' EXIT INT TERM

# The merged-usr hook makes the root merged-/usr and installs usr-is-merged
# first: without it apt satisfies init-system-helpers' "usrmerge |
# usr-is-merged" with usrmerge, which pulls in all of perl (50 MB). Docs,
# man pages, locales and glibc's iconv modules (Python has its own codecs)
# are left out; copyrights kept. The Debian mirror is the only thing
# fetched (no container registry).
mmdebstrap --variant=essential --mode=root --quiet \
    --include="$DEPENDS" \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/lintian/*' \
    --dpkgopt='path-exclude=/usr/lib/*/gconv/*' \
    --customize-hook="copy-in $DEB /tmp" \
    --customize-hook="chroot \"\$1\" dpkg -i /tmp/$(basename "$DEB")" \
    --customize-hook='rm -rf "$1"/tmp/*.deb "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/* "$1"/var/log/*.log "$1"/var/cache/debconf/*-old "$1"/var/lib/dpkg/*-old' \
    --customize-hook='chroot "$1" /usr/bin/tapio-node --version' \
    bookworm "$WORK/rootfs.tar" ${MIRROR:-}

OCI="$WORK/oci"
umoci init --layout "$OCI"
umoci new --image "$OCI:$TAG"
umoci raw add-layer --image "$OCI:$TAG" --history.created_by "mmdebstrap bookworm + $(basename "$DEB")" \
    "$WORK/rootfs.tar"
umoci config --image "$OCI:$TAG" \
    --config.entrypoint /usr/bin/tapio-node \
    --config.cmd run --config.cmd --config --config.cmd /etc/tapio-node/config.yaml \
    --config.cmd --output --config.cmd stdout \
    --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --config.env LANG=C.UTF-8 \
    --config.user 0:0 \
    --config.workingdir / \
    --config.stopsignal SIGTERM \
    --config.exposedports 9717/tcp \
    --config.label org.opencontainers.image.title=tapio-node \
    --config.label "org.opencontainers.image.version=$TAG" \
    --config.label "org.opencontainers.image.description=which pod opened which ConfigMap/Secret file (eBPF node daemon)" \
    --config.label org.opencontainers.image.licenses=Apache-2.0\ AND\ GPL-2.0-only \
    --architecture "$(dpkg --print-architecture)" --os linux
# The layout's index names the image with the full reference (podman load
# then tags it so).
umoci gc --layout "$OCI"
python3 - "$OCI/index.json" "$REF" <<'PY'
import json, sys
path, ref = sys.argv[1], sys.argv[2]
index = json.load(open(path))
for m in index["manifests"]:
    m.setdefault("annotations", {})["org.opencontainers.image.ref.name"] = ref
json.dump(index, open(path, "w"))
PY
tar -C "$OCI" --numeric-owner --owner=0 --group=0 -cf "$OUT.part" .
mv "$OUT.part" "$OUT"
echo "image $REF: $OUT ($(du -h "$OUT" | cut -f1) archive, $(du -h "$WORK/rootfs.tar" | cut -f1) unpacked)"

import pytest

from tapio_node import kpath

try:
    from tapio_node._fast import parse_volume_path as c_parse
except ImportError:  # pragma: no cover - the build always has it
    c_parse = None

PARSERS = [pytest.param(kpath._py_parse_volume_path, id="py-parser"),
           pytest.param(c_parse, id="c-parser",
                        marks=pytest.mark.skipif(c_parse is None, reason="extension not built"))]
ROOT = "/var/lib/kubelet/pods"
UID = "0d4c4b34-5c9a-4a8e-9a65-2f4d3c1b2a10"


@pytest.mark.parametrize("parse", PARSERS)
@pytest.mark.parametrize("path, expected", [
    (f"{ROOT}/{UID}/volumes/kubernetes.io~secret/certs/tls.key",
     (UID, "kubernetes.io~secret", "certs", "tls.key")),
    (f"{ROOT}/{UID}/volumes/kubernetes.io~configmap/cfg/conf.d/a.yaml",
     (UID, "kubernetes.io~configmap", "cfg", "conf.d/a.yaml")),
    (f"{ROOT}/{UID}/volumes/kubernetes.io~projected/kube-api-access-abcde",
     (UID, "kubernetes.io~projected", "kube-api-access-abcde", "")),
    (f"{ROOT}/{UID}/volumes/kubernetes.io~secret/certs/",
     (UID, "kubernetes.io~secret", "certs", "")),
    (f"{ROOT}/{UID}/volumes/kubernetes.io~secret", None),
    (f"{ROOT}/{UID}/containers/x/y/z", None),
    (f"{ROOT}x/{UID}/volumes/a/b/c", None),
    ("/etc/passwd", None),
    (f"{ROOT}//volumes/a/b", None),
    (f"{ROOT}/{UID}/volumes//b/c", None),
])
def test_parse_volume_path(parse, path, expected):
    assert parse(path, ROOT) == expected
    assert parse(path, ROOT + "/") == expected


@pytest.mark.parametrize("parse", PARSERS)
def test_parsers_agree_on_odd_input(parse):
    for path in ["", "/", ROOT, ROOT + "/", f"{ROOT}/{UID}", f"{ROOT}/{UID}/volumes/",
                 f"{ROOT}/{UID}/volumes/p/v/" + "k" * 300, f"{ROOT}/ü/volumes/p/v/ключ"]:
        assert parse(path, ROOT) == kpath._py_parse_volume_path(path, ROOT)


@pytest.mark.parametrize("dnames, key", [
    (("tls.key", "..2026_11_25_10_00_00.123", "/", "/"), "tls.key"),
    (("b.txt", "a", "..2026_11_25_10_00_00.1", "cfg"), "a/b.txt"),
    (("c", "b", "a", "..2026_11_25_10_00_00.1"), "a/b/c"),
    (("plain", "certs", "kubernetes.io~secret", "volumes"), "plain"),
    (("..data", "x", "y", "z"), None),
])
def test_key_from_dnames(dnames, key):
    assert kpath.key_from_dnames(dnames) == key

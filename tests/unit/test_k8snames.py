"""k8snames: the name checks every module shares."""
import pytest

from tapio_node import k8snames as k

UID = "0d4c4b34-5c9a-4a8e-9a65-2f4d3c1b2a10"


def test_pod_uid():
    assert k.valid_pod_uid(UID)
    assert k.valid_pod_uid("a" * 32)  # static pod config hash
    assert not k.valid_pod_uid("../../etc")
    assert not k.valid_pod_uid(UID.upper())
    assert not k.valid_pod_uid(UID + "\n")  # $ would have let this through
    assert not k.valid_pod_uid(UID[:-1])
    assert not k.valid_pod_uid("a" * 31) and not k.valid_pod_uid("a" * 33)
    assert not k.valid_pod_uid(None) and not k.valid_pod_uid(b"a" * 32)


@pytest.mark.parametrize("name, label, subdomain", [
    ("certs", True, True),
    ("kube-api-access-x2k9p", True, True),
    ("a", True, True),
    ("0", True, True),
    ("a" * 63, True, True),
    ("a" * 64, False, True),
    ("web-5d8f7c9b6-x2kqp.a", False, True),
    (".".join(["a" * 63] * 3) + "." + "a" * 61, False, True),     # 253
    (".".join(["a" * 63] * 3) + "." + "a" * 62, False, False),    # 254
    ("", False, False),
    ("-a", False, False), ("a-", False, False),
    (".a", False, False), ("a.", False, False), ("a..b", False, False),
    ("a.-b", False, False), ("a-.b", False, False),
    ("Bad_Name", False, False), ("UPPER", False, False),
    ("certs\n", False, False), ("a b", False, False), ("a/b", False, False),
    ("caf\u00e9", False, False), ("\u0661", False, False),   # not ASCII
    (None, False, False), (42, False, False), (b"certs", False, False),
])
def test_label_and_subdomain(name, label, subdomain):
    assert k.valid_label(name) is label
    assert k.valid_subdomain(name) is subdomain
    assert k.valid_namespace(name) is label
    assert k.valid_pod_name(name) is subdomain


def test_checks_raise_naming_what():
    k.check_label("namespace", "default")
    k.check_subdomain("pod name", "web-0.x")
    with pytest.raises(ValueError, match=r"namespace 'Bad' is not a DNS-1123 label .*at most 63"):
        k.check_label("namespace", "Bad")
    with pytest.raises(ValueError, match=r"pod name 'a\.\.b' is not a DNS-1123 subdomain .*at most 253"):
        k.check_subdomain("pod name", "a..b")
    with pytest.raises(ValueError, match="node_name None"):
        k.check_subdomain("node_name", None)

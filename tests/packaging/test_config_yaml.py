"""The conffile packaging/config.yaml (/etc/tapio-node/config.yaml) must
stay in step with tapio_node.config: every key there, every default shown."""
import re
from pathlib import Path

import msgspec
import yaml

from tapio_node import config

CONFFILE = Path(__file__).resolve().parents[2] / "packaging" / "config.yaml"


def _shipped():
    return yaml.safe_load(CONFFILE.read_text())["kernel_collector"]


def test_every_key_is_documented():
    text = CONFFILE.read_text()
    # A key may be commented out when its default is computed (kubeconfig).
    documented = set(re.findall(r"^  #? ?([a-z_]+):", text, re.M))
    fields = set(config.KernelCollector.__struct_fields__)
    assert fields - documented == set(), "keys missing from packaging/config.yaml"
    assert documented - fields == set(), "unknown keys in packaging/config.yaml"


def test_values_are_the_defaults():
    shipped = msgspec.convert(_shipped(), config.KernelCollector)
    assert shipped == config.KernelCollector()


def test_parses_through_load_config(tmp_path):
    # load_config checks paths exist; point the kubelet path at a temp dir.
    (tmp_path / "pods").mkdir()
    text = CONFFILE.read_text().replace(
        '"/var/lib/kubelet/pods"', f'"{tmp_path / "pods"}"')
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(text)
    cfg = config.load_config(str(cfg_file))
    assert cfg.kernel_collector.pin_path == "/sys/fs/bpf/tapio"

import pytest

from tapio_node.config import ConfigError, KernelCollector, parse_config, split_listen_address, validate


def test_kernel_collector_defaults():
    kc = parse_config("").kernel_collector
    assert kc.name == "kernel-config-monitor"
    assert kc.buffer_size == 1000
    assert kc.enable_ebpf and kc.monitor_configmaps and kc.monitor_secrets
    assert kc.kubelet_pods_path == "/var/lib/kubelet/pods"
    assert kc.configmap_volume_pattern == "kubernetes.io~configmap"
    assert kc.secret_volume_pattern == "kubernetes.io~secret"
    assert kc.listen_address == "127.0.0.1:9717"
    assert kc.pod_logs_path == "/var/log/pods"
    assert kc.cgroup_root == "auto"
    assert kc.syscall_sampling_rate == 0


def test_kernel_collector_example_config_parses():
    text = """
kernel_collector:
  name: "kernel-config-monitor"
  buffer_size: 1000
  enable_ebpf: true
  monitor_configmaps: true
  monitor_secrets: true
  enable_pod_correlation: true
  syscall_sampling_rate: 100
  kubelet_pods_path: "/var/lib/kubelet/pods"
  configmap_volume_pattern: "kubernetes.io~configmap"
  secret_volume_pattern: "kubernetes.io~secret"
"""
    kc = parse_config(text).kernel_collector
    assert kc.syscall_sampling_rate == 100


@pytest.mark.parametrize("body, key, words", [
    ("buffer_size: lots", "kernel_collector.buffer_size", "expected `int`"),
    ("monitor_secretz: true", "kernel_collector.monitor_secretz", "unknown key"),
    ("enable_ebpf: maybe", "kernel_collector.enable_ebpf", "expected `bool`"),
    ("kubelet_pods_path: relative/dir", "kernel_collector.kubelet_pods_path", "absolute path"),
    ("kubelet_pods_path: /etc/hostname", "kernel_collector.kubelet_pods_path", "not a directory"),
    ("kubelet_pods_path: ''", "kernel_collector.kubelet_pods_path", "absolute path"),
    ("listen_address: '9717'", "kernel_collector.listen_address", "host:port"),
    ("listen_address: example.com:80", "kernel_collector.listen_address", "not an IP"),
    ("ring_buffer_size: 1000", "kernel_collector.ring_buffer_size", "power of two"),
    ("syscall_sampling_rate: -1", "kernel_collector.syscall_sampling_rate", "positive"),
    ("cgroup_root: /no/such/cgroup", "kernel_collector.cgroup_root", "not a directory"),
    ("secret_volume_pattern: a/b", "kernel_collector.secret_volume_pattern", "plugin dir name"),
    # An empty host must not silently mean every address.
    ("listen_address: ':9717'", "kernel_collector.listen_address", "0.0.0.0:9717"),
    ("listen_address: '[]:9717'", "kernel_collector.listen_address", "no host"),
    ("resync_interval: .nan", "kernel_collector.resync_interval", "finite"),
    ("resync_interval: .inf", "kernel_collector.resync_interval", "finite"),
    ("journal_fold_window: -.inf", "kernel_collector.journal_fold_window", "finite"),
    ("resync_interval: 1.0e+300", "kernel_collector.resync_interval", "at most 86400"),
    ("journal_fold_window: 1.0e+9", "kernel_collector.journal_fold_window", "between 0 and 86400"),
    ("buffer_size: 0", "kernel_collector.buffer_size", "between 1 and"),
    ("buffer_size: 1000000000", "kernel_collector.buffer_size", "between 1 and 100000"),
    ("ring_buffer_size: 4294967296", "kernel_collector.ring_buffer_size", "between 4096 and 268435456"),
    ("metrics_max_series: 0", "kernel_collector.metrics_max_series", "between 1 and"),
    ("metrics_max_series: 100000000", "kernel_collector.metrics_max_series", "between 1 and"),
    ("max_watched_files: 4", "kernel_collector.max_watched_files", "between 16 and"),
    ("max_watched_files: 100000000", "kernel_collector.max_watched_files", "between 16 and"),
    ("syscall_sampling_rate: 8589934592", "kernel_collector.syscall_sampling_rate", "up to 2^31"),
    ("hook_backend: kprobe", "kernel_collector.hook_backend", "auto, lsm, fentry, tracepoint"),
    ("enforcement: {mode: block}", "kernel_collector.enforcement.mode", "off, audit, enforce"),
    ("enforcement: {kinds: [secrets]}", "kernel_collector.enforcement.kinds", "configmap, secret, projected"),
    ("enforcement: {allow_pods: [vault]}", "kernel_collector.enforcement.allow_pods", "namespace/name-glob"),
    ("enforcement: {allow_pods: ['Mon/x']}", "kernel_collector.enforcement.allow_pods", "namespace/name-glob"),
    ("enforcement: {allow_host_cgroups: [system.slice/kubelet.service]}",
     "kernel_collector.enforcement.allow_host_cgroups", "leaf name"),
    ("enforcement: {allow_host_cgroups: ['']}", "kernel_collector.enforcement.allow_host_cgroups", "leaf name"),
    ("enforcement: {mode: enforce}\n  hook_backend: fentry", "kernel_collector.enforcement.mode",
     "needs hook_backend lsm or auto"),
    ("enforcement: {modes: audit}", "kernel_collector.enforcement.modes", "unknown key"),
    ("enforcement: {mode: on}", "kernel_collector.enforcement.mode", "YAML for true"),
])
def test_bad_values_name_the_key(body, key, words):
    with pytest.raises(ConfigError) as info:
        parse_config(f"kernel_collector:\n  {body}\n", "cfg.yaml")
    assert info.value.key == key
    assert words in str(info.value)
    assert str(info.value).startswith("cfg.yaml: ")


def test_unknown_top_level_key_and_bad_yaml():
    with pytest.raises(ConfigError) as info:
        parse_config("kernel_colector:\n  name: x\n")
    assert "kernel_colector" in info.value.key and "unknown key" in str(info.value)
    with pytest.raises(ConfigError) as info:
        parse_config("kernel_collector: [\n")
    assert "not valid YAML" in str(info.value)
    with pytest.raises(ConfigError):
        parse_config("- just\n- a list\n")


def test_pods_dir_may_not_exist_yet_if_its_parent_does(tmp_path):
    kc = parse_config(f"kernel_collector:\n  kubelet_pods_path: {tmp_path}/pods\n").kernel_collector
    assert kc.kubelet_pods_path == f"{tmp_path}/pods"


def test_sizes_at_their_bounds_are_accepted():
    kc = parse_config("kernel_collector:\n  max_watched_files: 16\n  buffer_size: 100000\n"
                      "  ring_buffer_size: 268435456\n  resync_interval: 86400\n").kernel_collector
    assert kc.max_watched_files == 16 and kc.ring_buffer_size == 1 << 28
    assert parse_config("").kernel_collector.max_watched_files == 262144


def test_listen_address_forms():
    assert split_listen_address("127.0.0.1:9717") == ("127.0.0.1", 9717)
    assert split_listen_address("[::1]:9717") == ("::1", 9717)
    assert split_listen_address("0.0.0.0:0") == ("0.0.0.0", 0)
    assert split_listen_address("localhost:80") == ("localhost", 80)
    for bad in ("127.0.0.1", ":9717", "127.0.0.1:65536", "127.0.0.1:http", "not-an-ip:9717"):
        with pytest.raises(ValueError):
            split_listen_address(bad)
    with pytest.raises(ConfigError) as info:
        parse_config("kernel_collector:\n  listen_address: ':9717'\n")
    assert info.value.key == "kernel_collector.listen_address"


def test_constructed_defaults_are_the_parsed_defaults_and_valid():
    # The daemon builds KernelCollector() when no config file exists.
    kc = KernelCollector()
    assert kc == parse_config("").kernel_collector
    validate(kc, None)


def test_a_bare_off_is_the_off_mode():
    # YAML 1.1 reads `off` as false; users write it bare, as the docs do.
    for body in ("enforcement: {mode: off}", "enforcement: {mode: 'off'}", "enforcement: {mode: false}"):
        assert parse_config(f"kernel_collector:\n  {body}\n").kernel_collector.enforcement.mode == "off"

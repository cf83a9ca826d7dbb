"""tapio-node: who opened which ConfigMap/Secret file, resolved by inode in eBPF."""

__version__ = "0.1.0"

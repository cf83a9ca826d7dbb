"""tapio-node: who opened which ConfigMap/Secret file, resolved by inode in eBPF."""

__version__ = "0.1.0"


def accelerated(name: str, twin):
    """`name` from the Cython extension, else its pure-Python twin: when
    TAPIO_PURE_PYTHON is set or the extension is not built (the twin is
    exact, only slower)."""
    import os

    if os.environ.get("TAPIO_PURE_PYTHON"):
        return twin
    try:
        from tapio_node import _fast
    except ImportError:
        return twin
    return getattr(_fast, name)

"""A real, kubelet-faithful simulated Kubernetes node, for the demo, tests and bench.

node (the node, its pods and containers, sweep_stale), atomic_writer (the
kubelet's volume writes), opener (the file opener run in containers),
demo; container_init and kubelet_write are scripts run in fresh processes.
"""

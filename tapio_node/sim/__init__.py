"""A real, kubelet-faithful simulated Kubernetes node, for the demo, tests and bench."""

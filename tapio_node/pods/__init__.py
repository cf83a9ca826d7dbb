"""Pod correlation: which pod and container a cgroup id belongs to, and a
pod's namespace and name.

registry.PodRegistry is the entry point; info holds PodInfo and Accessor,
cgroupnames the kubelet's cgroup naming, names the /var/log/pods names,
kubelet the kubelet's process and service-account volumes.
"""

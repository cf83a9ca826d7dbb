"""Pod specs of the pods on this node: which ConfigMap, Secret or token is behind each volume key.

The kubelet path only names the pod-spec *volume* (``kubernetes.io~secret/certs``);
the object (``web-tls``) is only in the pod spec, and a projected volume mixes
several sources. :class:`PodSpecs` keeps the specs of this node's pods in memory.

* :mod:`.model`: the decoded Pod and the :class:`PodMeta` kept of it;
* :mod:`.static`: static pod manifests;
* :mod:`.api`: the Kubernetes API, list then watch;
* :mod:`.source`: :class:`PodSpecs`, both sources merged, kept current;
* :mod:`.check`: what ``tapio-node check`` reports of them.

Configuring each source (``kernel_collector:`` keys):

* static pods: ``static_pods_path`` (default ``/etc/kubernetes/manifests``).
* node kubeconfig: ``kubeconfig`` (default ``/etc/kubernetes/kubelet.conf``, used
  when readable; its client certificate, usually
  ``/var/lib/kubelet/pki/kubelet-client-current.pem``, must be readable too).
  ``node_name`` must be the node's name in the cluster (default: ``$NODE_NAME``,
  else the host name).
* in-cluster: run as a DaemonSet with ``env: NODE_NAME`` from ``spec.nodeName``
  and a service account bound to a ClusterRole allowing ``get, list, watch`` on
  ``pods``; used when no kubeconfig is readable.
"""

from tapio_node.podspec.model import KeySource, PodMeta, VolumeMeta
from tapio_node.podspec.source import PodSpecs, from_config

__all__ = ["KeySource", "PodMeta", "PodSpecs", "VolumeMeta", "from_config"]

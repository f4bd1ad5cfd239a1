"""The operator's Kubernetes client: the official async client plus thin typed helpers."""

from lmcache_operator.kube.client import KubeClient
from lmcache_operator.kube.errors import FORBIDDEN_RETRY_S, KubeError, forbidden_message, transient
from lmcache_operator.kube.login import Credentials, InCluster, in_cluster, load_credentials
from lmcache_operator.kube.paths import object_path, resource_of

__all__ = [
    "FORBIDDEN_RETRY_S",
    "Credentials",
    "InCluster",
    "KubeClient",
    "KubeError",
    "forbidden_message",
    "in_cluster",
    "load_credentials",
    "object_path",
    "resource_of",
    "transient",
]

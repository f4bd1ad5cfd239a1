"""Which cache server image a cluster runs: the CUDA variant where it serves CUDA.

The operator's defaults (chart value ``nodeImage``) fill what a spec leaves unset: the
repository, and the tag ``<version>-cuda`` for a cluster serving CUDA (CUDA IPC needs a
CUDA PyTorch) or ``<version>-cpu`` otherwise. A cache pod serving CUDA also gets the
nvidia RuntimeClass: it requests no GPU, so only that runtime makes the GPUs visible to it.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmcache_operator import __version__
from lmcache_operator.api.lmcachecluster import LMCacheClusterSpec

DEFAULT_REPOSITORY = "ghcr.io/lmcache-k8s/lmcache-node"
DEFAULT_CUDA_RUNTIME_CLASS = "nvidia"


@dataclass(frozen=True)
class NodeImageDefaults:
    repository: str = DEFAULT_REPOSITORY
    version: str = __version__
    cuda_runtime_class: str = DEFAULT_CUDA_RUNTIME_CLASS  # "" omits it

    def tag(self, device: str) -> str:
        return f"{self.version}-{'cuda' if device == 'cuda' else 'cpu'}"


DEFAULTS = NodeImageDefaults()


def resolve(
    spec: LMCacheClusterSpec, device: str, defaults: NodeImageDefaults = DEFAULTS
) -> LMCacheClusterSpec:
    """``spec`` with its image repository and tag filled from ``defaults`` for ``device``."""
    image = spec.image
    if image.repository is not None and image.tag is not None:
        return spec
    filled = image.model_copy(
        update={
            "repository": image.repository or defaults.repository,
            "tag": image.tag or defaults.tag(device),
        }
    )
    return spec.model_copy(update={"image": filled})


def runtime_class(spec: LMCacheClusterSpec, device: str, defaults: NodeImageDefaults) -> str | None:
    """The pods' RuntimeClass: the spec's ("" = none), else nvidia when serving CUDA."""
    given = spec.placement.runtime_class_name
    if given is not None:
        return given or None
    if device == "cuda":
        return defaults.cuda_runtime_class or None
    return None

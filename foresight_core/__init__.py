"""Foresight: the science of "Internalizing the Future" (arXiv 2606.27483).

Everything here imports and runs with Prefect, Ray and MLflow absent; the
orchestration adapters live in ``tasks`` (tasks/) and ``flows`` (flows/).
"""

__version__ = "0.1.0"

"""triton-mig-exporter: fleet figures for NVIDIA Triton on MIG slices, from a Prometheus."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("triton-mig-exporter")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

__all__ = ["__version__"]

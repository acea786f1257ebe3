"""ctquant: chest CT quantification of COVID-19 pneumonia for trial endpoints."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ctquant")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+source"

__all__ = ["__version__"]

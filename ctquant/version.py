"""The installed ctquant version (``0.0.0+source`` in a source tree that is not installed)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ctquant")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+source"

"""The library's version, in one place (``jaxnet.__version__``, checkpoint manifests)."""

__version__ = "0.1.0"

"""The package version, in a module of its own: the modules that record it in their outputs
need not import the package's lazy API (``spp_detect.__getattr__``)."""

__version__ = "0.1.0"

"""sitefit: segmentation that adapts its early U-Net layers to each scanner site at test time.

The ``sitefit`` package holds what the server and the worker share without importing torch:
settings, exceptions, volume I/O, metrics, the report schema and the scanner phantoms.
"""

__version__ = "0.1.0"

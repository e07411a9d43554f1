"""medseg: medical image segmentation pipelines in plain PyTorch and MONAI.

The library knows nothing of Sacred: it takes plain arguments and reports through
:class:`medseg.engine.reporting.Reporter`, which a Sacred run (or anything else) satisfies.
"""

__version__ = "0.1.0"

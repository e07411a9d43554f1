"""medseg: medical image segmentation pipelines in plain PyTorch and MONAI.

The library knows nothing of Sacred: it takes plain arguments and reports through
:class:`medseg.engine.reporting.Reporter`, which a Sacred run (or anything else) satisfies.
"""

__version__ = "0.1.0"

import sys as _sys

# Start-up time. MONAI imports every submodule on ``import monai``, among them monai.bundle,
# which imports jsonschema; jsonschema imports ``rfc3987_syntax`` when it is installed (the
# Jupyter stack that incense needs installs it), and that module builds a parser for IRIs at
# import: about 2.5 s of CPU, a quarter of every command's start, for an IRI format check
# nothing here uses. Marking it absent makes jsonschema skip that optional check, as it does
# where the package is not installed; a process that imported it earlier keeps it.
_sys.modules.setdefault("rfc3987_syntax", None)  # type: ignore[arg-type]

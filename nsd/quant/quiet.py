"""Log lines of torch and torchao that look like errors and are not, dropped where they are logged.

Each entry is one logger and the exact message it drops; everything else those loggers say still shows,
and nothing here touches Python warnings. `install()` runs before torch is imported: in a runner
(`nsd.worker.runner`) and wherever a quantized model is loaded in a user's process (`examples/minilm/demo.py`).
"""

from __future__ import annotations

import logging
import re

NOISE = {
    # torchao tries to load its CUDA-only kernels (MX-FP8, CUTLASS for sm90a) at import; on a CPU machine
    # they cannot load and are never used.
    "torchao": re.compile(r"Failed to load \S*/torchao/_C_(mxfp8|cutlass_\w+)\S*\.so: "),
    # torchao registers its enums as pytree constants; torch 2.1x deprecates that for enums (torchao's to fix).
    "torch.utils._pytree": re.compile(r"<enum '\w+'> is an Enum subclass and is now natively supported by "
                                      r"torch\.compile as an opaque value type\. Calling register_constant\(\)"),
    # INC's load() first tries a PT2 archive on the saved quantized_weight.pt, then loads it as what it is;
    # its save() writes that archive under INC's own file name.
    "torch.export.pt2_archive._package": re.compile(
        r"(Unable to load package\. f must be a buffer or a file ending in \.pt2\.|Expect archive file to be a "
        r"file ending in \.pt2, or is a buffer\.) Instead got \{\S*quantized_weight\.pt\}"),
}


class DropKnownNoise(logging.Filter):
    def __init__(self, pattern: re.Pattern):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def install() -> None:
    """Attach each filter to its logger (once; loggers are found by name, so torch need not be imported)."""
    for name, pattern in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropKnownNoise) for f in logger.filters):
            logger.addFilter(DropKnownNoise(pattern))

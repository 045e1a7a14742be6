"""nsd.quant.quiet drops exactly the known harmless torch/torchao log lines, and nothing else."""

from __future__ import annotations

import logging

from nsd.quant import quiet


class Kept(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_only_the_known_noise_is_dropped():
    quiet.install()
    quiet.install()  # idempotent: one filter a logger
    kept = Kept()
    loggers = {name: logging.getLogger(name) for name in quiet.NOISE}
    for logger in loggers.values():
        assert sum(isinstance(f, quiet.DropKnownNoise) for f in logger.filters) == 1
        logger.addHandler(kept)
    try:
        so = "/venv/lib/python3.11/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so"
        loggers["torchao"].warning(f"Failed to load {so}: Could not load this library: {so}")
        loggers["torchao"].warning("Failed to load /venv/torchao/_C_cutlass_90a.abi3.so: Could not load")
        loggers["torchao"].warning("Failed to load /venv/torchao/_C_cpu_kernels.so: undefined symbol")  # real
        loggers["torch.utils._pytree"].warning(
            "%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type. "
            "Calling register_constant() on Enum subclasses is deprecated and will be an error in a future "
            "release.", "<enum 'KernelPreference'>")
        loggers["torch.utils._pytree"].warning("some other pytree warning")
        loggers["torch.export.pt2_archive._package"].warning(
            "Unable to load package. f must be a buffer or a file ending in .pt2. Instead got {%s}",
            "/out/model/quantized_weight.pt")
        loggers["torch.export.pt2_archive._package"].warning("Unable to load package: a real failure")
    finally:
        for logger in loggers.values():
            logger.removeHandler(kept)
    assert kept.messages == ["Failed to load /venv/torchao/_C_cpu_kernels.so: undefined symbol",
                             "some other pytree warning", "Unable to load package: a real failure"]

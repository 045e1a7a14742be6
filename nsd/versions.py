"""What a worker reports it runs (READY's `versions`): part of every metric cache key, so that a result
computed by other software is never reused. No torch import: versions come from package metadata."""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path

import nsd

# nsd-code: a hash of the code that computes metrics (nsd/quant, the runner), so that a change to it
# without a version bump still misses the cache.
VERSION_KEYS = ("nsd", "nsd-code", "neural-compressor-pt", "neural-compressor", "torch", "transformers")
_METRIC_CODE = ("quant/*.py", "worker/runner.py", "worker/measuring.py")


def code_hash() -> str:
    root = Path(nsd.__file__).parent
    digest = hashlib.sha256()
    for pattern in _METRIC_CODE:
        for path in sorted(root.glob(pattern)):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def installed_versions() -> dict[str, str]:
    found = {"nsd": nsd.__version__, "nsd-code": code_hash()}
    for name in VERSION_KEYS[2:]:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found

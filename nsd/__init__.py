"""nsd: Intel Neural Compressor's accuracy-aware tuning as a service across a cluster of CPU nodes."""

__version__ = "0.1.0"

"""What kind of machine a worker is (READY's `hardware`): its CPU model, the cores it offers, the ISA features
that decide how fast int8 runs (AVX-512 VNNI, AMX) and its `--label`. Deployment figures belong to this:
the broker's cache keeps them per hardware (`nsd.broker.metric_cache.hardware_key`), and a task can be pinned
to a label (`resources.hardware`). Pure parsing of /proc/cpuinfo, no torch."""

from __future__ import annotations

# The flags that change what a quantized model costs to run (int8 dot products, bf16, tile matrix units).
ISA_FLAGS = ("avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def parse_cpuinfo(text: str) -> tuple[str, list[str]]:
    """(CPU model name, the ISA_FLAGS it has, in ISA_FLAGS order) from /proc/cpuinfo's text."""
    model, flags = "unknown", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = " ".join(value.split())[:256] or "unknown"
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model, [f for f in ISA_FLAGS if f in flags]


def describe(cores: int, label: str | None, cpuinfo: str = "/proc/cpuinfo") -> dict:
    """READY's hardware map for a worker of `cores` cores."""
    try:
        with open(cpuinfo) as f:
            model, isa = parse_cpuinfo(f.read())
    except OSError:
        model, isa = "unknown", []
    return {"cpu": model, "cores": cores, "isa": isa, "label": label}

"""INC integration (imported by runners only: it pulls in torch and neural-compressor)."""

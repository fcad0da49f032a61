"""Model loading and per-family adapters."""

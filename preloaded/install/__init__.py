"""Installs: requirements into uv overlays, and `py-preload run`'s per-script bundles."""

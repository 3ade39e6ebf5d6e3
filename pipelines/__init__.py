"""Thin DVC stage entry points: read params.yaml, call the selfsup library, write outputs."""

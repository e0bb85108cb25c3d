"""Bundled benchmark data (a ShareGPT-format sample written for Kiln)."""

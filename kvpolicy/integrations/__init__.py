"""Engines a compiled policy plugs into (vLLM)."""

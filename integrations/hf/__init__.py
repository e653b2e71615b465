"""Adapter for hf (thin: host objects in, archopt_plugins calls out)."""

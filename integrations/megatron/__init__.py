"""Adapter for megatron (thin: host objects in, archopt_plugins calls out)."""

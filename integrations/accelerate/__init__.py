"""Adapter for accelerate (thin: host objects in, archopt_plugins calls out)."""

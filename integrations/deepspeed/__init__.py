"""Adapter for deepspeed (thin: host objects in, archopt_plugins calls out)."""

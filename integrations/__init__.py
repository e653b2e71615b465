"""Thin adapters, one subpackage per stack (hf, accelerate, deepspeed, megatron).

Installed as ``archopt_plugins.integrations`` (see pyproject's package-dir mapping). Adapters take
host objects in and call archopt_plugins out: no math and no communication of their own.
"""

"""``enable()``: make megatron-core's own ``get_megatron_optimizer`` build archopt for ``optimizer="archopt_<name>"``.

megatron-core 0.19 has no public registry for third-party optimizers (REFERENCES.md §1).
``get_megatron_optimizer`` builds ``adam``/``sgd`` itself and hands every other name to the
module-level function ``megatron.core.optimizer._get_megatron_emerging_optimizer``, which looks
the name up in the module-private "emerging optimizer" registry — behind a check that NVIDIA's
``emerging-optimizers`` package is installed, and always wrapping the result in an FP32 /
Float16 wrapper or the layer-wise optimizer, never in the distributed optimizer archopt needs.
Registering there would need that package and still lose the distributed optimizer, so
``enable()`` wraps that one routing function instead: ``archopt_*`` names go to
:func:`optimizer.build_megatron_optimizer`, every other name to Megatron's original, unchanged.
The call site stays Megatron's: ``get_megatron_optimizer(OptimizerConfig(optimizer="archopt_muon", …), model)``.

The wrapped function is private, so ``enable()`` checks the megatron-core version against the
range this adapter was tested with and refuses any other, saying what to do. ``disable()``
restores Megatron's function (tests use it).
"""

from __future__ import annotations

from typing import Any

# Tested with 0.19.2; the routing function and the distributed optimizer's internals used here
# (model_param_group_index_map, gbuf ranges) are private and change between minor versions.
SUPPORTED_MEGATRON = ">=0.19,<0.20"
_ROUTER = "_get_megatron_emerging_optimizer"

_state: dict[str, Any] = {"original": None}


class UnsupportedMegatronVersion(RuntimeError):
    """``enable()`` was called with a megatron-core version outside ``SUPPORTED_MEGATRON``."""


def check_megatron_version(version: str | None = None) -> str:
    """The installed (or given) megatron-core version if the adapter supports it; raises otherwise."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    if version is None:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as installed

        try:
            version = installed("megatron-core")
        except PackageNotFoundError:
            raise UnsupportedMegatronVersion("megatron-core is not installed: pip install "
                                             "'archopt-plugins[megatron]' (megatron-core 0.19)") from None
    if Version(version) not in SpecifierSet(SUPPORTED_MEGATRON):
        raise UnsupportedMegatronVersion(
            f"archopt_plugins.integrations.megatron supports megatron-core {SUPPORTED_MEGATRON}, found {version}: "
            "it hooks get_megatron_optimizer's private routing and the distributed optimizer's internals, which "
            "differ in other versions. Install megatron-core 0.19.x (pip install 'megatron-core==0.19.2')")
    return version


def is_enabled() -> bool:
    return _state["original"] is not None


def enable() -> None:
    """Route ``OptimizerConfig(optimizer="archopt_<name>")`` to archopt (idempotent)."""
    if is_enabled():
        return
    check_megatron_version()
    import megatron.core.optimizer as mcore_optimizer

    original = getattr(mcore_optimizer, _ROUTER, None)
    if not callable(original):
        raise UnsupportedMegatronVersion(f"megatron.core.optimizer.{_ROUTER} is missing: this megatron-core build "
                                         f"does not route names the way {SUPPORTED_MEGATRON} does")

    def route(config: Any, model_chunks: Any, config_overrides: Any = None, pg_collection: Any = None) -> Any:
        from .config import is_archopt

        if is_archopt(getattr(config, "optimizer", None)):
            from .optimizer import build_megatron_optimizer

            return build_megatron_optimizer(config, model_chunks, config_overrides, pg_collection)
        return original(config=config, model_chunks=model_chunks, config_overrides=config_overrides,
                        pg_collection=pg_collection)

    route.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(mcore_optimizer, _ROUTER, route)
    _state["original"] = original


def disable() -> None:
    """Restore Megatron's routing function."""
    if not is_enabled():
        return
    import megatron.core.optimizer as mcore_optimizer

    setattr(mcore_optimizer, _ROUTER, _state["original"])
    _state["original"] = None

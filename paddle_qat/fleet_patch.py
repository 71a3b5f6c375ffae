"""Install paddle_qat into fleet: our QATOptimizer, and checked ``qat_configs``."""

from __future__ import annotations

from .config import QATConfig, attach_config, check_fleet_qat_configs, fleet_dict

_installed = False


def install() -> None:
    """Make fleet use paddle_qat for ``strategy.qat = True``. Idempotent; run on import."""
    global _installed
    if _installed:
        return
    from paddle.distributed.fleet import meta_optimizers
    from paddle.distributed.fleet.base import distributed_strategy, meta_optimizer_factory

    from .legacy_api import install as install_legacy_api
    from .legacy_branches import install as install_legacy_branches
    from .meta_optimizer import QATOptimizer

    # paddle.any (static AMP's found-inf check), paddle.matmul, ... on the legacy IR again
    install_legacy_api()
    install_legacy_branches()  # F.normalize, paddle.fft, ... whose legacy code is broken
    # The factory instantiates meta-optimizers by looking their names up in its globals.
    meta_optimizer_factory.QATOptimizer = QATOptimizer
    meta_optimizers.QATOptimizer = QATOptimizer

    strategy_cls = distributed_strategy.DistributedStrategy
    fleet_property = strategy_cls.__dict__["qat_configs"]

    def checked_setter(self, configs):
        check_fleet_qat_configs(configs)
        if "not_quant_pattern" in configs:
            # fleet appends to this repeated field; a user assigning a list means "these".
            del self.strategy.qat_configs.not_quant_pattern[:]
        fleet_property.fset(self, configs)

    strategy_cls.qat_configs = property(fleet_property.fget, checked_setter,
                                        doc=fleet_property.__doc__)
    _guard_fleet_minimize()
    _quantize_in_distributed_model()
    _installed = True


def configure(strategy, config: QATConfig) -> None:
    """Turn QAT on in a fleet ``DistributedStrategy`` with a full :class:`QATConfig`.

    Writes fleet's five ``qat_configs`` keys from ``config`` and attaches the rest; a later
    ``strategy.qat_configs = {...}`` still overrides those five keys.

    Example::

        strategy = fleet.DistributedStrategy()
        paddle_qat.configure(strategy, paddle_qat.QATConfig(weight_bits=4))
    """
    attach_config(strategy, config)
    strategy.qat = True
    strategy.qat_configs = fleet_dict(config)


def _guard_fleet_minimize() -> None:
    """Fail with LegacyIRRequiredError, not fleet's pybind TypeError, for QAT under PIR."""
    import functools

    from paddle.distributed.fleet.fleet import Fleet

    from .legacy_ir import require_legacy_program

    fleet_minimize = Fleet.minimize

    @functools.wraps(fleet_minimize)
    def minimize(self, loss, *args, **kwargs):
        strategy = getattr(self, "_user_defined_strategy", None)
        if strategy is not None and strategy.qat:
            require_legacy_program(loss, "the loss passed to fleet minimize() with strategy.qat")
        return fleet_minimize(self, loss, *args, **kwargs)

    Fleet.minimize = minimize


def _quantize_in_distributed_model() -> None:
    """Dygraph: ``fleet.distributed_model(model)`` quantizes ``model`` when ``strategy.qat``.

    In place, so the optimizer the user built on ``model.parameters()`` (before or after
    this call) trains the quantized model; quant state is synced across the data-parallel
    group before every training forward.
    """
    import functools

    import paddle
    from paddle.distributed import fleet
    from paddle.distributed.fleet import model as fleet_model

    original = fleet_model.distributed_model

    @functools.wraps(original)
    def distributed_model(model):
        strategy = fleet.fleet._user_defined_strategy
        if strategy is not None and strategy.qat:
            from .config import resolve_config
            from .dygraph import quantize_model

            group = None
            if paddle.distributed.get_world_size() > 1 and fleet.fleet._hcg is not None:
                group = fleet.fleet._hcg.get_data_parallel_group()
            model = quantize_model(model, resolve_config(strategy), inplace=True, group=group)
        return original(model)

    fleet_model.distributed_model = distributed_model
    fleet.distributed_model = distributed_model

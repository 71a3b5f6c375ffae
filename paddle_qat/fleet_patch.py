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

    from .meta_optimizer import QATOptimizer

    # The factory instantiates meta-optimizers by looking their names up in its globals.
    meta_optimizer_factory.QATOptimizer = QATOptimizer
    meta_optimizers.QATOptimizer = QATOptimizer

    strategy_cls = distributed_strategy.DistributedStrategy
    fleet_property = strategy_cls.__dict__["qat_configs"]

    def checked_setter(self, configs):
        check_fleet_qat_configs(configs)
        fleet_property.fset(self, configs)

    strategy_cls.qat_configs = property(fleet_property.fget, checked_setter,
                                        doc=fleet_property.__doc__)
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

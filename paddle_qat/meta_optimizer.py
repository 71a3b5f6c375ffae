"""paddle_qat's QAT meta-optimizer for fleet: a thin adapter over :mod:`paddle_qat.passes`.

Fleet chains meta-optimizers along the longest path of ``meta_optimizers_white_list`` edges.
Paddle 3.3.1's own ``QATOptimizer`` leaves ``RawProgramOptimizer`` off its list, so with two
or more ranks no gradient all-reduce is inserted and ranks silently train apart. This one is
the outermost link: it turns off QAT-hostile fusions, lets the inner chain (data parallel,
AMP, recompute, gradient merge) build forward, backward, all-reduce and optimizer ops, then
quantizes the finished program.
"""

from __future__ import annotations

import logging

from paddle.distributed.fleet.meta_optimizers.meta_optimizer_base import MetaOptimizerBase

from .build_strategy import disable_qat_incompatible_fusions
from .config import QATConfig, fleet_dict, resolve_config
from .legacy_ir import require_legacy_program
from .passes import quantize_program
from .scale_sync import insert_scale_sync

_logger = logging.getLogger(__name__)


class QATOptimizer(MetaOptimizerBase):
    """Applied by fleet when ``strategy.qat = True`` (after ``import paddle_qat``).

    The class keeps Paddle's name because other meta-optimizers and fleet's strategy
    bookkeeping refer to it by class name.
    """

    def __init__(self, optimizer):
        super().__init__(optimizer)
        self.inner_opt = optimizer
        # Every optimizer that may run inside QAT. RawProgramOptimizer is what inserts the
        # data-parallel gradient all-reduce; Paddle's QATOptimizer lacks it.
        self.meta_optimizers_white_list = [
            "RawProgramOptimizer",
            "AMPOptimizer",
            "RecomputeOptimizer",
            "GradientMergeOptimizer",
            "LarsOptimizer",
            "LambOptimizer",
            "GraphExecutionOptimizer",
        ]
        self.meta_optimizers_black_list = []
        self.config: QATConfig | None = None

    def _can_apply(self):
        if not self.role_maker._is_collective:
            return False
        return bool(self.user_defined_strategy.qat)

    def _disable_strategy(self, dist_strategy):
        dist_strategy.qat = False
        dist_strategy.qat_configs = {}

    def _enable_strategy(self, dist_strategy, context):
        dist_strategy.qat = True
        dist_strategy.qat_configs = fleet_dict(QATConfig())

    def _switch_build_strategy(self):
        strategy = self.user_defined_strategy
        build_strategy = strategy.build_strategy
        if disable_qat_incompatible_fusions(build_strategy):
            strategy.build_strategy = build_strategy

    def minimize_impl(self, loss, startup_program=None, parameter_list=None, no_grad_set=None):
        require_legacy_program(loss, "the loss passed to minimize()")
        self.config = resolve_config(self.user_defined_strategy)
        if self.config.adjust_build_strategy:
            # Before the inner chain: RawProgramOptimizer applies the build strategy's fusion
            # passes to the program inside its own minimize.
            self._switch_build_strategy()
        optimize_ops, params_grads = self.inner_opt.minimize(
            loss, startup_program, parameter_list, no_grad_set)
        import paddle

        startup = startup_program or paddle.static.default_startup_program()
        program = loss.block.program
        summary = quantize_program(program, self.config, startup_program=startup)
        synced = insert_scale_sync(program, self.role_maker._worker_num())
        _logger.info("paddle_qat: quantized %d ops, left %d in float; %d quant state "
                     "variables averaged across ranks each step", len(summary.quantized_ops),
                     len(summary.skipped_ops), len(synced))
        return optimize_ops, params_grads

    def qat_init(self, place, scope=None, test_program=None):
        """Quantize ``test_program`` to read the same scale variables as training.

        Called through ``fleet.qat_init(place, test_program=eval_prog)``. Safe before or after
        training: scales already learnt in ``scope`` are kept.
        """
        if test_program is None:
            return
        if self.config is None:
            self.config = resolve_config(self.user_defined_strategy)
        quantize_program(test_program, self.config, scope=scope, place=place, for_test=True)

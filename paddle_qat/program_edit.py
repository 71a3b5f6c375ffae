"""Edit a legacy-IR program in linear time.

Paddle's editing helpers check or re-sync the whole program on every single edit: each
``IrGraph.link_to`` / ``update_*_link`` asserts membership by listing every node of the graph,
and each ``Block._rename_var`` / ``_remove_op`` / ``_remove_var`` re-syncs the Python block
with the C++ one. A pass that makes one edit per quantized tensor is then quadratic in the
program's size: on MobileNetV3 those checks took 30 of the 47 s that quantizing its training
and eval programs took (measured, 2 CPU cores). Here the edits are the same, the checks and
the sync happen once.
"""

from __future__ import annotations

import contextlib


def _ir_graph_class():
    from paddle.base.framework import IrGraph

    class LinkingIrGraph(IrGraph):
        """An ``IrGraph`` whose link edits skip the membership asserts (one full node listing
        each). The nodes a pass links come from the graph it walks."""

        def link_to(self, node_in, node_out):
            node_in.append_output(node_out)
            node_out.append_input(node_in)

        def update_input_link(self, old_input_node, new_input_node, op_node):
            _move_link(op_node, old_input_node, new_input_node, "input")

        def update_output_link(self, old_output_node, new_output_node, op_node):
            _move_link(op_node, old_output_node, new_output_node, "output")

    return LinkingIrGraph


def _move_link(op_node, old, new, side: str) -> None:
    """``op_node``'s ``side`` ("input" or "output") link from ``old`` to ``new``, both ways."""
    far = "output" if side == "input" else "input"
    getattr(old, f"remove_{far}")(op_node)
    getattr(op_node, f"remove_{side}")(old)
    getattr(new, f"append_{far}")(op_node)
    getattr(op_node, f"append_{side}")(new)
    getattr(op_node, f"rename_{side}")(old.name(), new.name())


def ir_graphs(program, for_test: bool):
    """(the program's graph, its sub-graphs), for Paddle's quant passes to rewrite."""
    from paddle.base import core

    linking = _ir_graph_class()
    graph = linking(core.Graph(program.desc), for_test=for_test)
    subs = [linking(graph.graph.get_sub_graph(i), for_test=for_test)
            for i in range(graph.graph.sub_graph_size())]
    return graph, subs


@contextlib.contextmanager
def one_sync(program):
    """Within it, ``Block._rename_var`` (which, unlike ``_remove_op(sync=False)``, has no way
    to skip its sync) edits without re-syncing each block; the program is synced once on the
    way out (also when the body raises)."""
    blocks = list(program.blocks)
    for block in blocks:
        block._sync_with_cpp = _no_sync
    try:
        yield
    finally:
        for block in blocks:
            del block._sync_with_cpp  # the class's method again
        program._sync_with_cpp()


def _no_sync() -> None:
    return None

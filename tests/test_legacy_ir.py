"""PIR mode: painless when the user did not ask for it, one clear error when they did."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FLEET_QAT_SCRIPT = textwrap.dedent("""
    import sys
    {imports}
    import paddle
    paddle.enable_static()
    from paddle.distributed import fleet
    fleet.init(is_collective=True)
    main, startup = paddle.static.Program(), paddle.static.Program()
    with paddle.static.program_guard(main, startup):
        x = paddle.static.data("x", [None, 4], "float32")
        loss = paddle.mean(paddle.nn.Linear(4, 2)(x))
        strategy = fleet.DistributedStrategy()
        strategy.qat = True
        fleet.distributed_optimizer(paddle.optimizer.SGD(0.1), strategy).minimize(loss)
    types = [op.type for op in main.global_block().ops]
    print("QUANT_OPS", types.count("quantize_linear"))
""")


def _run(imports: str, pir_env: str | None):
    env = {k: v for k, v in os.environ.items() if k != "FLAGS_enable_pir_api"}
    if pir_env is not None:
        env["FLAGS_enable_pir_api"] = pir_env
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-c", FLEET_QAT_SCRIPT.format(imports=imports)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_import_before_paddle_selects_legacy_ir():
    result = _run("import paddle_qat", None)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "QUANT_OPS 2" in result.stdout


def test_import_after_paddle_switches_the_process_to_legacy_ir():
    result = _run("import paddle\nimport paddle_qat", None)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "QUANT_OPS 2" in result.stdout
    assert "switched this process from PIR" in result.stderr


def test_explicit_pir_gets_one_clear_error_and_no_pybind_traceback():
    result = _run("import paddle_qat", "1")
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("paddle_qat.errors.LegacyIRRequiredError"), last_line
    assert "FLAGS_enable_pir_api=0" in last_line
    assert "incompatible function arguments" not in result.stderr


def test_the_readmes_calls_work_after_import_paddle_qat_alone():
    """README: ``paddle_qat.export.export_onnx(...)``, ``paddle_qat.dygraph.quantize_model``,
    ``paddle_qat.ptq.calibrate`` and ``paddle_qat.runtime.open_runner`` after nothing but
    ``import paddle_qat`` (a fresh process: no test imported them before)."""
    script = ("import paddle_qat\n"
              "calls = [paddle_qat.export.export_onnx, paddle_qat.dygraph.quantize_model,\n"
              "         paddle_qat.dygraph.export_onnx, paddle_qat.ptq.calibrate,\n"
              "         paddle_qat.runtime.open_runner]\n"
              "print('CALLABLE', all(map(callable, calls)))\n"
              "try:\n"
              "    paddle_qat.no_such_module\n"
              "except AttributeError as error:\n"
              "    print('MISSING', error)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "CALLABLE True" in done.stdout
    assert "MISSING module 'paddle_qat' has no attribute 'no_such_module'" in done.stdout

"""The command-line tools and the inference scripts, run as a user runs them."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from paddle_qat.runtime.int8_kernels import open_session

ROOT = Path(__file__).resolve().parents[1]


def run(*args, script=None):
    command = ["bash", str(ROOT / script), *args] if script else [
        sys.executable, "-m", "paddle_qat", *args]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def test_export_from_checkpoint_equals_the_live_export(demo_run, tmp_path):
    out, _, _ = demo_run
    result = run("export", "--checkpoint", str(out / "checkpoints"), "--onnx",
                 str(tmp_path / "m.onnx"), "--paddle-model", str(tmp_path / "paddle" / "m"))
    assert result.returncode == 0, result.stderr
    assert "7 quantized inputs" in result.stdout
    assert (tmp_path / "paddle" / "m.pdmodel").is_file()
    images = np.load(out / "test_images.npy")

    def logits(path):
        return open_session(str(path))[0].run(None, {"image": images})[0]

    # the demo exported the last epoch from its live program and scope
    np.testing.assert_array_equal(logits(tmp_path / "m.onnx"), logits(out / "qat_w8.onnx"))


def test_export_from_paddle_inference_model(demo_run, tmp_path):
    out, _, _ = demo_run
    result = run("export", "--paddle-input", str(out / "inference" / "qat"), "--onnx",
                 str(tmp_path / "m.onnx"))
    assert result.returncode == 0, result.stderr
    assert onnx.load(str(tmp_path / "m.onnx")).graph.node


def test_check_exit_codes(demo_run, tmp_path):
    out, _, _ = demo_run
    good = run("check", str(out / "qat_w8.onnx"))
    assert good.returncode == 0 and "0 violation(s)" in good.stdout
    model = onnx.load(str(out / "qat_w8.onnx"))
    for init in model.graph.initializer:
        if init.name.endswith(".zero_point") and init.dims == []:
            init.raw_data = np.int8(5).tobytes()
            break
    onnx.save(model, str(tmp_path / "bad.onnx"))
    bad = run("check", str(tmp_path / "bad.onnx"))
    assert bad.returncode == 1
    assert "rule 2 [" in bad.stdout and "all zeros" in bad.stdout


def _qat_w8(rows):
    return next(r for r in rows if r.name == "QAT w8a8")


def test_infer_reports_accuracy_and_writes_logits(demo_run, tmp_path):
    """``infer`` on each fold's QAT model and test split: their correct counts add up to the
    demo's cross-validated row."""
    out, rows, _ = demo_run
    correct = 0
    for fold in (out, out / "folds" / "1"):
        labels = np.load(fold / "test_labels.npy")
        result = run("infer", str(fold / "qat_w8.onnx"), "--input",
                     str(fold / "test_images.npy"), "--labels", str(fold / "test_labels.npy"),
                     "--output", str(tmp_path / "l.npy"), "--benchmark", "5", "--batch", "8")
        assert result.returncode == 0, result.stderr
        assert "samples/s" in result.stdout
        assert np.load(tmp_path / "l.npy").shape == (len(labels), 10)
        accuracy = float(re.search(r"top-1 accuracy: ([0-9.]+)", result.stdout).group(1))
        correct += round(accuracy * len(labels))
    assert correct == _qat_w8(rows).correct


@pytest.mark.parametrize("args, text", [
    (["export", "--checkpoint", "/nowhere", "--onnx", "x.onnx"], "/nowhere does not exist"),
    (["export", "--paddle-input", "/nowhere/m", "--onnx", "x.onnx"],
     "/nowhere/m.pdmodel does not exist"),
    (["check", "/nowhere.onnx"], "/nowhere.onnx does not exist"),
    (["infer", "/nowhere.onnx"], "/nowhere.onnx does not exist"),
    (["compare", "/nowhere.onnx"], "/nowhere.onnx does not exist"),
])
def test_bad_input_is_one_clear_line(args, text):
    result = run(*args)
    assert result.returncode == 2
    assert text in result.stderr and "Traceback" not in result.stderr


def test_truncated_onnx_is_named(demo_run, tmp_path):
    out, _, _ = demo_run
    broken = tmp_path / "cut.onnx"
    broken.write_bytes((out / "qat_w8.onnx").read_bytes()[:500])
    result = run("infer", str(broken))
    assert result.returncode == 2 and "truncated" in result.stderr


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                    reason="TensorRT is installed; tests/test_tensorrt.py runs it")
def test_tensorrt_without_tensorrt_says_how_to_get_it(demo_run):
    out, _, _ = demo_run
    result = run(str(out / "qat_w8.onnx"), script="scripts/inference/infer_tensorrt.sh")
    assert result.returncode == 2
    assert "pip install paddle-qat[tensorrt]" in result.stderr
    assert "Traceback" not in result.stderr


def _accuracy(onnx_path, images, labels) -> float:
    session, _ = open_session(str(onnx_path))
    logits = session.run(None, {session.get_inputs()[0].name: images})[0]
    return float((logits.argmax(1) == labels).mean())


def test_inference_scripts_run_on_cpu(demo_run, tmp_path):
    """The scripts export the first fold's last checkpoint and run it: the same accuracy as
    the demo's own export of that fold's live program."""
    out, _, _ = demo_run
    images, labels = np.load(out / "test_images.npy"), np.load(out / "test_labels.npy")
    for checkpoints, live, checked in (
            ("checkpoints", "qat_w8.onnx", "TensorRT Q/DQ rules checked"),
            ("checkpoints_onnxruntime", "qat_w8_onnxruntime.onnx",
             "every quantized op runs INT8 in ONNX Runtime")):
        export = run(str(out / checkpoints), str(tmp_path / checkpoints),
                     script="scripts/inference/export_qat.sh")
        assert export.returncode == 0, export.stderr
        assert checked in export.stdout
        infer = run(str(tmp_path / checkpoints / "qat_int8.onnx"), "--input",
                    str(out / "test_images.npy"), "--labels", str(out / "test_labels.npy"),
                    script="scripts/inference/infer_onnxruntime.sh")
        assert infer.returncode == 0, infer.stderr
        expected = _accuracy(out / live, images, labels)
        assert f"top-1 accuracy: {expected:.4f}" in infer.stdout


@pytest.mark.parametrize("script", sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "scripts").rglob("*.sh")
))
def test_every_script_has_help(script):
    result = run("--help", script=script)
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout or "usage" in result.stdout


@pytest.mark.parametrize("command", ["export", "check", "compare", "sensitivity", "infer",
                                     "migrate"])
def test_every_command_has_help(command):
    result = run(command, "--help")
    assert result.returncode == 0 and "usage:" in result.stdout


def test_dockerfile_installs_gpu_paddle_and_existing_extras_only():
    """The Dockerfile cannot be built here; keep it consistent with setup.py and the README."""
    import re

    dockerfile = (ROOT / "Dockerfile").read_text()
    setup = (ROOT / "setup.py").read_text()
    (extras,) = re.findall(r'install --no-cache-dir -e "\.\[([a-z,]+)\]"', dockerfile)
    for extra in extras.split(","):
        assert f'"{extra}":' in setup, extra
    assert "cpu" not in extras.split(",")  # would install CPU Paddle over the GPU one
    assert "paddlepaddle-gpu==${PADDLE_VERSION}" in dockerfile
    assert re.search(r"ARG PADDLE_VERSION=3\.3\.1", dockerfile)  # the version CI tests
    assert '"paddlepaddle==3.3.1"' in setup
    assert "docker build -t paddle-qat ." in (ROOT / "README.md").read_text()


def test_training_script_help_lists_the_dle_flags():
    result = subprocess.run([sys.executable, "-m", "paddle_qat.train", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for flag in ("--qat", "--amp", "--from-pretrained-params", "--from-checkpoint",
                 "--inference-dir", "--image-root", "--use-pure-fp16", "--qat-init"):
        assert flag in result.stdout


def test_compare_puts_qat_beside_our_ptq_and_onnx_runtimes_ptq(demo_run):
    out, _, _ = demo_run
    result = run("compare", str(out / "qat_w8.onnx"), "--ptq", str(out / "ptq_w8_mse.onnx"),
                 "--float", str(out / "fp32.onnx"), "--calibration",
                 str(out / "test_images.npy"))
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    conv = rows["conv2d_0.tmp_0"].split()
    assert conv[1:3] == ["Conv", "int8"] and conv[4] == "int8"  # QAT and our PTQ
    assert "QAT: 4 Q / 7 DQ, 3 int8 compute nodes, 0 TensorRT rule violation(s)" in result.stdout
    # ONNX Runtime's PTQ quantizes between BN and ReLU: TensorRT's rule 6 (measured: 3 times).
    ort_line = next(line for line in result.stdout.splitlines()
                    if line.startswith("ORT PTQ (MinMax):"))
    assert "rules 6" in ort_line and " 0 TensorRT" not in ort_line
    assert "<--" in result.stdout


def test_compare_for_onnx_runtime_counts_the_ops_it_would_run_in_float(demo_run):
    out, _, _ = demo_run
    result = run("compare", str(out / "qat_w8_onnxruntime.onnx"), "--ptq",
                 str(out / "qat_w8.onnx"), "--float", str(out / "fp32.onnx"), "--calibration",
                 str(out / "test_images.npy"), "--target", "onnxruntime")
    assert result.returncode == 0, result.stderr
    lines = {line.split(":")[0]: line for line in result.stdout.splitlines() if ": " in line}
    assert "0 quantized op(s) ONNX Runtime runs in float" in lines["QAT"]
    assert "0 quantized op(s)" in lines["ORT PTQ (MinMax)"]  # its CPU settings
    assert "0 quantized op(s)" not in lines["PTQ 1"]  # the TensorRT placement's convs


def test_check_for_onnx_runtime(demo_run):
    out, _, _ = demo_run
    good = run("check", "--target", "onnxruntime", str(out / "qat_w8_onnxruntime.onnx"))
    assert good.returncode == 0 and "0 op(s) ONNX Runtime runs in float" in good.stdout
    # 8-bit weights: INT8 kernels exact only on CPUs with VNNI, whichever CPU checks
    assert "note: weights reach +-12" in good.stdout and "weight_bits=7" in good.stdout
    portable = run("check", "--target", "onnxruntime", str(out / "qat_w7_onnxruntime.onnx"))
    assert portable.returncode == 0 and "note:" not in portable.stdout
    bad = run("check", "--target", "onnxruntime", str(out / "qat_w8.onnx"))
    assert bad.returncode == 1 and "runs in float" in bad.stdout


def test_sensitivity_ranks_layers_and_checks_paddle_against_onnx(demo_run):
    out, _, _ = demo_run
    result = run("sensitivity", "--checkpoint", str(out / "checkpoints"), "--images",
                 str(out / "test_images.npy"), "--labels", str(out / "test_labels.npy"),
                 "--weight-bits", "3", "--auto-skip", "1", "--onnx", str(out / "qat_w8.onnx"))
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()
            if line.startswith(("conv2d_", "fc_"))]
    assert sorted(r[0] for r in rows) == ["conv2d_0.w_0", "conv2d_1.w_0", "fc_0.w_0"]
    only = [float(r[2]) for r in rows]
    assert only == sorted(only) and all(0 < c <= 1 for c in only)  # most sensitive first
    all_but = {r[0]: float(r[4]) for r in rows}
    skipped = max(all_but, key=all_but.get)
    assert f"skip_weights=('{skipped}',)" in result.stdout
    fidelity = [float(line.rsplit(" ", 1)[1]) for line in result.stdout.splitlines()
                if line.startswith("Paddle vs ONNX Runtime")]
    assert len(fidelity) >= 2 and min(fidelity) > 0.999


@pytest.mark.parametrize("script, args", [
    ("scripts/inference/export_qat.sh", ["only-a-checkpoint"]),
    ("scripts/inference/infer_onnxruntime.sh", []),
    ("scripts/inference/infer_tensorrt.sh", []),
])
def test_scripts_missing_arguments_print_usage_and_exit_2(script, args):
    result = run(*args, script=script)
    assert result.returncode == 2
    assert "Usage:" in result.stderr and not result.stdout

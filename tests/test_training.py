"""scripts/training/*.sh and paddle_qat/train.py on a real ImageNet-style folder (the digits
written as PNGs): FP32 baseline -> QAT fine-tuning -> export, resume, and bad input."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from paddle_qat.checkpoint import read_meta, read_values
from paddle_qat.data import ImageSpec, eval_batches, image_folder, write_digits_folder
from paddle_qat.export.checker import check_model
from paddle_qat.export.onnxruntime_check import float_ops
from paddle_qat.runtime.int8_kernels import open_session

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--model-arch-name", "residual_cnn", "--image-shape", "3,16,16", "--batch-size", "32",
         "--warmup-epochs", "0", "--rand-crop-scale", "0.6,1", "--label-smoothing", "0",
         "--print-interval", "1000", "--workers", "2"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_digits_folder(tmp_path_factory.mktemp("digits"), size=16)


def train(cwd, *args, script="scripts/training/launch.sh"):
    env = dict(os.environ, LAUNCH=sys.executable,
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    result = subprocess.run(["bash", str(ROOT / script), *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    return result


def epochs(stdout):
    """{epoch: {metric: value}} from the per-epoch log lines."""
    found = {}
    for line in stdout.splitlines():
        match = re.search(r"epoch (\d+) loss ([\d.]+)(?: top1 ([\d.]+))?", line)
        if match and "step" not in line:
            found[int(match[1])] = {"loss": float(match[2]),
                                    "top1": float(match[3]) if match[3] else None}
    return found


@pytest.mark.slow
def test_fp32_baseline_then_qat_fine_tuning_through_the_scripts(digits, tmp_path):
    fp32 = train(tmp_path, "--image-root", str(digits), *SMALL, "--epochs", "3", "--lr", "0.05",
                 script="scripts/training/train_resnet50_FP32_90E.sh")
    assert fp32.returncode == 0, fp32.stderr[-3000:]
    fp32_epochs = epochs(fp32.stdout)
    assert sorted(fp32_epochs) == [1, 2, 3]
    assert fp32_epochs[3]["loss"] < fp32_epochs[1]["loss"]
    assert fp32_epochs[3]["top1"] > 0.2  # 10 classes
    assert (tmp_path / "inference_fp32" / "resnet_50_paddle.onnx").is_file()

    qat = train(tmp_path, "output", "--image-root", str(digits), *SMALL, "--epochs", "2",
                "--lr", "0.005", script="scripts/training/train_resnet50_AMP_QAT_10E.sh")
    assert qat.returncode == 0, qat.stderr[-3000:]
    assert "QAT scales calibrated (max)" in qat.stdout
    qat_epochs = epochs(qat.stdout)
    assert qat_epochs[2]["top1"] >= fp32_epochs[3]["top1"] - 0.05
    assert sorted(p.name for p in (tmp_path / "output_qat").iterdir()) == [
        "epoch_0001", "epoch_0002", "latest"]
    exported = tmp_path / "inference_qat" / "resnet_50_paddle.onnx"
    model = onnx.load(str(exported))
    assert check_model(model) == []
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) >= 3
    assert (tmp_path / "inference_qat" / "resnet_50_paddle.pdmodel").is_file()
    # ONNX Runtime on the validation folder agrees with the accuracy training reported.
    val = image_folder(digits / "val", image_folder(digits / "train").classes)
    session, _ = open_session(str(exported))
    correct = total = 0
    for batch in eval_batches(val, ImageSpec(16, 18), 128, workers=2):
        logits = session.run(None, {"image": batch["image"]})[0]
        correct += int((logits.argmax(1) == batch["label"][:, 0]).sum())
        total += len(batch["label"])
    assert abs(correct / total - qat_epochs[2]["top1"]) <= 2 / total

    # the same fine-tuning for ONNX Runtime's CPU: every quantized op gets an INT8 kernel
    cpu = train(tmp_path, "output", "--image-root", str(digits), *SMALL, "--epochs", "1",
                "--lr", "0.005", "--qat-target", "onnxruntime", "--output-dir", "output_cpu",
                "--inference-dir", "inference_cpu",
                script="scripts/training/train_resnet50_AMP_QAT_10E.sh")
    assert cpu.returncode == 0, cpu.stderr[-3000:]
    exported = tmp_path / "inference_cpu" / "resnet_50_paddle.onnx"
    assert float_ops(str(exported)) == []
    assert read_meta(tmp_path / "output_cpu" / "epoch_0001")["qat_config"]["target"] == \
        "onnxruntime"


@pytest.mark.slow
def test_resuming_from_a_checkpoint_continues_the_same_run(digits, tmp_path):
    common = ["--image-root", str(digits), *SMALL, "--epochs", "2", "--steps-per-epoch", "8",
              "--lr", "0.02", "--qat", "--qat-init", "max", "--eval-interval", "0"]
    full = train(tmp_path, *common, "--output-dir", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-3000:]
    resumed = train(tmp_path, *common, "--output-dir", str(tmp_path / "resumed"),
                    "--from-checkpoint", str(tmp_path / "full" / "epoch_0001"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "epoch 1 done" in resumed.stdout
    assert epochs(resumed.stdout)[2]["loss"] == pytest.approx(epochs(full.stdout)[2]["loss"],
                                                              rel=1e-5)
    a = read_values(tmp_path / "full" / "epoch_0002", "model.pdparams")
    b = read_values(tmp_path / "resumed" / "epoch_0002", "model.pdparams")
    assert a.keys() == b.keys() and any(k.endswith("@scale") for k in a)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("args, message", [
    (["--image-root", "/nowhere"], "image folder /nowhere/train does not exist"),
    (["--from-pretrained-params", "a", "--from-checkpoint", "b"], "exclude each other"),
    (["--data-layout", "NHWC"], "invalid choice: 'NHWC'"),
    (["--rand-crop-scale", "0,1"], "--rand-crop-scale wants LOW,HIGH"),
    (["--num-of-class", "1000"], "--num-of-class 1000, but"),
    (["--from-checkpoint", "/nowhere/ckpt"], "checkpoint /nowhere/ckpt does not exist"),
])
def test_bad_input_is_one_clear_error(digits, tmp_path, args, message):
    base = [] if "--image-root" in args else ["--image-root", str(digits)]
    result = train(tmp_path, *SMALL, *base, *args, "--epochs", "1")
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_seed_zero_gives_the_same_initial_weights_every_time():
    """Paddle reads program seed 0 as "random": the demo's default seed drew new weights
    on every run until the global generator was seeded as well."""
    import paddle

    from paddle_qat.models import ModelSpec, build_classifier, seeded_programs

    def initial_weights(seed):
        main, startup = seeded_programs(seed)
        with paddle.utils.unique_name.guard(), paddle.static.program_guard(main, startup):
            build_classifier(ModelSpec("residual_cnn", in_channels=1, image_size=8,
                                       classes=4, width=4))
        scope = paddle.static.Scope()
        with paddle.static.scope_guard(scope):
            paddle.static.Executor(paddle.CPUPlace()).run(startup)
            return {p.name: np.array(scope.find_var(p.name).get_tensor())
                    for p in main.all_parameters()}

    first, again, other = initial_weights(0), initial_weights(0), initial_weights(1)
    assert first.keys() == again.keys()
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
    assert any(not np.array_equal(first[n], other[n]) for n in first if "conv" in n)

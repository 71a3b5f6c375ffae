from setuptools import find_packages, setup

setup(
    name="paddle-qat",
    version="0.1.0",
    description="Quantization-aware training for PaddlePaddle fleet, exported to TensorRT / ONNX",
    packages=find_packages(include=["paddle_qat", "paddle_qat.*"]),
    python_requires=">=3.9",
    # Tested with paddlepaddle 3.3.1 (CPU); paddlepaddle-gpu 3.x users install that instead.
    install_requires=["numpy", "tqdm"],
    extras_require={
        "cpu": ["paddlepaddle==3.3.1"],
        "export": ["onnx==1.23.2", "onnxruntime==1.32.0", "paddle2onnx==1.3.1"],
        "tensorrt": ["tensorrt>=10,<12", "cuda-python>=12"],
        "demo": ["scikit-learn==1.9.1"],
        "test": ["pytest==9.2.0", "ruff==0.17.6", "scikit-learn==1.9.1"],
    },
)

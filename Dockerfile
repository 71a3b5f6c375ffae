# paddle-qat for GPU machines: Paddle GPU (CUDA 12.6, cuDNN 9.5, TensorRT 10.5 libraries)
# plus this package with its export (ONNX, ONNX Runtime, paddle2onnx) and TensorRT extras.
#
#   docker build -t paddle-qat .
#   docker run --gpus all --shm-size=8g -v /data/imagenet:/imagenet -it paddle-qat \
#       bash scripts/training/train_resnet50_AMP_QAT_10E.sh /checkpoints/epoch_0090
#
# Not built in CI (no GPU, no registry access there). paddle-qat is tested with Paddle 3.3.1;
# the base image ships 3.0.0, so the matching paddlepaddle-gpu wheel is installed over it.
ARG BASE_IMAGE=ccr-2vdh3abv-pub.cnc.bj.baidubce.com/paddlepaddle/paddle:3.0.0-gpu-cuda12.6-cudnn9.5-trt10.5
FROM ${BASE_IMAGE}

ARG PADDLE_VERSION=3.3.1
ARG PADDLE_INDEX=https://www.paddlepaddle.org.cn/packages/stable/cu126/

# fleet's static QAT needs Paddle's legacy program IR; import paddle_qat sets this too.
ENV FLAGS_enable_pir_api=0

WORKDIR /workspace/paddle-qat
COPY . .
RUN python -m pip install --no-cache-dir "paddlepaddle-gpu==${PADDLE_VERSION}" -i "${PADDLE_INDEX}" \
    && python -m pip install --no-cache-dir -e ".[export,tensorrt,demo]"

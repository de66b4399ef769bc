# ofbdeploy with CUDA, TensorRT and ONNX Runtime's CUDA provider: the place where the GPU and TensorRT
# stages (and their tests) run.
#
#   docker build -t ofbdeploy .
#   docker run --gpus all -v $PWD/runs:/work/runs ofbdeploy run recipes/quickstart.yaml
#   docker run --gpus all --entrypoint pytest ofbdeploy -q     # the suite, real TensorRT engine tests included
#   docker run --gpus all --entrypoint python ofbdeploy -m ofbdeploy.deploy.provider_check   # the image's check
#
# Base image: NGC PyTorch 25.06 (CUDA 12.9.1, TensorRT 10.11 with its Python bindings, PyTorch 2.8 built
# against that CUDA, Python 3.12).
# - TensorRT and torch come from one NVIDIA build on one CUDA runtime, which the TensorRT runner relies on
#   (it hands TensorRT pointers to torch CUDA tensors and captures the engine in a torch CUDA graph); a PyPI
#   TensorRT next to it could be a second, mismatched copy, so the install below pins the base's torch,
#   torchvision and tensorrt and checks them.
# - ONNX Runtime GPU is pinned to 1.26.0, the last onnxruntime-gpu on PyPI built for CUDA 12 (its CUDA
#   provider needs libcudart.so.12 and libcublas.so.12, its TensorRT provider libnvinfer.so.10); 1.27 and
#   later are built for CUDA 13 and would not load here. The image stays on CUDA 12 for that reason: the
#   CUDA 13 images (25.08 on) would need the CUDA 13 builds.
# - The build proves the providers' libraries resolve in the image (no GPU is needed for that); the image's
#   check (provider_check, above) proves on a GPU that each provider starts a session and computes.
# - The host needs a driver recent enough for CUDA 12.9 (NVIDIA's container release notes list them).
#   ENTRYPOINT skips NVIDIA's start script; with an older data-centre driver that relies on CUDA forward
#   compatibility, put it back: docker run --gpus all --entrypoint /opt/nvidia/nvidia_entrypoint.sh ofbdeploy
#   ofbdeploy run recipes/quickstart.yaml
FROM nvcr.io/nvidia/pytorch:25.06-py3
ARG ORT_GPU=1.26.0

WORKDIR /work
COPY . /work

# The project's base dependencies pull the CPU onnxruntime next to the gpu extra's onnxruntime-gpu; both
# own the same onnxruntime/ package directory, so the CPU one is removed and the GPU one put back whole.
# dev adds pytest, for running the TensorRT tests inside the image.
RUN set -eux; \
    trt_base="$(python -c 'import tensorrt; print(tensorrt.__version__)')"; \
    torch_base="$(python -c 'import torch; print(torch.__version__)')"; \
    pip list --format=freeze | grep -iE '^(torch|torchvision|tensorrt[a-z0-9_-]*)==' > /tmp/base-pins.txt; \
    PIP_CONSTRAINT="${PIP_CONSTRAINT:+$PIP_CONSTRAINT }/tmp/base-pins.txt" \
        pip install --no-cache-dir '.[gpu,trt,dev]' "onnxruntime-gpu==${ORT_GPU}"; \
    pip uninstall -y onnxruntime; \
    pip install --no-cache-dir --no-deps --force-reinstall "onnxruntime-gpu==${ORT_GPU}"; \
    test "$(python -c 'import tensorrt; print(tensorrt.__version__)')" = "$trt_base"; \
    test "$(python -c 'import torch; print(torch.__version__)')" = "$torch_base"; \
    python -c "import onnxruntime as o; p = o.get_available_providers(); assert {'CUDAExecutionProvider', 'TensorrtExecutionProvider'} <= set(p), p"; \
    capi="$(python -c 'import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), "capi"))')"; \
    for lib in "$capi"/libonnxruntime_providers_cuda.so "$capi"/libonnxruntime_providers_tensorrt.so; do \
        if ldd "$lib" | grep -v 'libcuda\.so' | grep 'not found'; then echo "$lib: unresolved libraries"; exit 1; fi; \
    done; \
    rm -rf build ofbdeploy.egg-info /tmp/base-pins.txt

ENTRYPOINT ["ofbdeploy"]
CMD ["--help"]

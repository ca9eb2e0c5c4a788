#!/usr/bin/env bash
# What a session with a lent GPU runs, stage by stage (each stage fits one device call):
#   bash bench/gpu_session.sh tests    # kernel/API/decode tests, CUDA cases included (fp32, fp16, bf16)
#   bash bench/gpu_session.sh nccl     # real 2-rank NCCL run of ring, zigzag, Ulysses (one GPU: NCCL >= 2.30)
#   bash bench/gpu_session.sh bench    # every benchmark; results in bench/results/<device>/
# The machine has torch and triton but no network: the install uses no build isolation.
# Where $OUT is set (the device tool), results are copied there too.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
python3 -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__,
      'triton', triton.__version__, 'nccl', '.'.join(map(str, torch.cuda.nccl.version())))" || exit 1
export PYTHONUNBUFFERED=1
status=0
case "${1:-tests}" in
    tests)
        python3 -m pytest -q tests/test_kernels.py tests/test_api.py tests/test_inference_kernel.py || status=1 ;;
    nccl)
        NCCL_MULTI_RANK_GPU_ENABLE=1 python3 bench/check_nccl.py --ranks 2 || status=1 ;;
    bench)
        for script in bench_attention bench_merge bench_cp_decomposition bench_memory bench_decode; do
            python3 "bench/$script.py" || status=1
        done ;;
    *)
        echo "usage: bash bench/gpu_session.sh [tests|nccl|bench]" >&2; exit 2 ;;
esac
if [ -n "${OUT:-}" ] && [ -d bench/results ]; then
    cp -r bench/results "$OUT/" || true
fi
exit $status

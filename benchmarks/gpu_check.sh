#!/usr/bin/env bash
# GPU checks for one short device session (about 10 minutes at the limits): installs nothing, prints tables, writes to $OUT.
#   bash benchmarks/gpu_check.sh              (from the repository root, on a machine with an NVIDIA GPU)
#   bash benchmarks/gpu_check.sh --dry-run    print the commands and their time limits, run nothing
#   bash benchmarks/gpu_check.sh --cpu-smoke  the same steps on the CPU with tiny shapes (checks the script)
#   PARTS=234 bash benchmarks/gpu_check.sh    only the parts named (default: all five)
# Parts run independently with their own time limits (240 + 60 + 240 + 90 + 150 s at most), so one
# failure does not hide the rest; a part that hits its limit prints "TIMEOUT".
set -u
MODE=${1:-}
case "$MODE" in ""|--dry-run|--cpu-smoke) ;; *) echo "usage: $0 [--dry-run | --cpu-smoke]" >&2; exit 2 ;; esac
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/jaxllm_gpu}
PY=${PY:-python3}
PARTS=${PARTS:-12345}
mkdir -p "$OUT"

# The benchmark table: bf16, a ~1B config (TinyLlama-1.1B shapes: 22 layers, d 2048, GQA 32/4,
# d_ff 5632), batch 1 and 32, fp / int8 / int4 (g64) weights, vs transformers in bf16 on the same
# GPU; roofline = B * measured device read bandwidth / the bytes a decode step must read
# (benchmarks/roofline.py: weights multiplied, filled KV slots, gathered embedding rows).
SUITE=(benchmarks/suite.py --configs 1b --dtype bfloat16 --modes greedy --batches 1,32 --weights fp,int8,int4
       --new_tokens 128 --reps 2 --ttft_configs "" --train_configs "" --results "$OUT/RESULTS_gpu.md"
       --note "benchmarks/gpu_check.sh")
TESTS=(tests/test_model.py tests/test_generate.py tests/test_sampling.py tests/test_quantize.py
       tests/test_attention.py tests/test_long_context.py tests/test_half_precision.py tests/test_devices.py)
# attention: cuDNN flash (bf16, fp16) vs the reference; half precision with cuDNN's finite mask; the GPU layout
PROFILE=(--config 1b --dtype bfloat16 --batch 1 --weights fp,int8 --new_tokens 64)
if [ "$MODE" = "--cpu-smoke" ]; then
  export JAX_PLATFORMS=cpu
  SUITE=(benchmarks/suite.py --configs tiny --dtype float32 --modes greedy --batches 1 --weights fp,int8,int4
         --new_tokens 8 --reps 1 --ttft_configs "" --train_configs "" --no_reference --results "$OUT/RESULTS_gpu.md"
         --note "gpu_check.sh --cpu-smoke")
  TESTS=(tests/test_quantize.py tests/test_attention.py)
  PROFILE=(--config tiny --batch 1 --weights fp,int8 --new_tokens 8)
fi

part() {  # part SECONDS DESCRIPTION -- COMMAND...
  local limit=$1 what=$2; shift 3
  [[ "$PARTS" == *"${what:0:1}"* ]] || return 0
  echo "== $what (limit ${limit}s) =="
  if [ "$MODE" = "--dry-run" ]; then printf '   %q' "$@"; echo; return 0; fi
  timeout "$limit" "$@"
  local rc=$?
  [ $rc -eq 124 ] && echo "TIMEOUT after ${limit}s: $what"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && echo "FAILED (exit $rc): $what"
  return 0
}

date -u
if [ -z "$MODE" ]; then
  nvidia-smi -L || { echo "no NVIDIA GPU visible (nvidia-smi failed); try --cpu-smoke" >&2; exit 2; }
fi
[ "$MODE" = "--dry-run" ] || $PY -c "import jax; print('jax', jax.__version__, jax.devices())
try:
    import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())
except ImportError: print('torch not installed: the transformers reference is skipped')"

# float32 matmuls at full precision so the numpy-reference tolerances hold on TF32 hardware;
# four workers and no GEMM autotuning, since compiling dominates (one worker took 150 s for half).
# JAXLLM_TEST_XLA_FLAGS= : the suite's fast-compile flags (tests/conftest.py) are measured on
# XLA:CPU only; on the device the kernels are compiled as users get them.
part 240 "1. numerics on the device: model, generation, sampling, quantization, attention backends, ring caches" -- \
  env JAXLLM_TEST_XLA_FLAGS= JAX_DEFAULT_MATMUL_PRECISION=highest XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" \
  $PY -m pytest -q -n 4 --durations=8 -p no:cacheprovider "${TESTS[@]}"

part 60 "2. where a decode step's time goes: kernels per step, 1B bf16, batch 1, fp and int8" -- \
  $PY benchmarks/profile_decode.py "${PROFILE[@]}"

part 240 "3. benchmark table: 1B bf16, batch 1 and 32, fp/int8/int4, roofline, vs transformers" -- \
  $PY "${SUITE[@]}"
PREFILL_CFG="vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, d_ff=2048, max_seq_len=8192, compute_dtype='bfloat16', param_dtype='bfloat16'"
PREFILL_LENGTHS="2048, 8192"
if [ "$MODE" = "--cpu-smoke" ]; then
  PREFILL_CFG="vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=256"
  PREFILL_LENGTHS="128,"
fi
part 90 "4. prefill attention: cuDNN flash vs XLA, small config in bf16, 2k and 8k tokens" -- $PY - <<PYEOF
import time, jax, jax.numpy as jnp, jaxllm
from jaxllm.model import hidden_states
base = jaxllm.ModelConfig($PREFILL_CFG)
params = jaxllm.init_params(base, jax.random.key(0))
for n in ($PREFILL_LENGTHS):
    tokens = jax.random.randint(jax.random.key(n), (1, n), 3, base.vocab_size)
    pos = jnp.arange(n)[None]
    for impl in ("xla", "cudnn"):
        cfg = base.replace(attention_impl=impl)
        f = jax.jit(lambda p, t, q: hidden_states(p, cfg, t, q)[0])
        try:
            f(params, tokens, pos).block_until_ready()
            best = 1e9
            for _ in range(3):
                t = time.perf_counter(); f(params, tokens, pos).block_until_ready(); best = min(best, time.perf_counter() - t)
            print(f"prefill {n:5d} tokens  {impl:5s} {n / best:10.0f} tok/s  {best * 1e3:8.1f} ms", flush=True)
        except Exception as e:  # noqa: BLE001  (a check script: report and go on)
            print(f"prefill {n:5d} tokens  {impl:5s} failed: {type(e).__name__}: {str(e)[:200]}")
PYEOF
TRAIN=(benchmarks/train.py --configs gpt2 --dtype bfloat16 --steps 10 --no_reference)
[ "$MODE" = "--cpu-smoke" ] && TRAIN=(benchmarks/train.py --configs small --steps 2 --no_reference)
part 150 "5. training MFU: GPT-2-small shapes (124M), bf16, batch 16 x 1024" -- $PY "${TRAIN[@]}"
[ "$MODE" = "--dry-run" ] || { echo "results: $OUT/RESULTS_gpu.md"; date -u; }

#!/usr/bin/env bash
# GPU checks for one short device session: installs nothing, prints tables, writes to $OUT.
#   bash benchmarks/gpu_check.sh            (from the repository root, on a machine with a GPU)
# Parts run independently with their own time limits, so one failure does not hide the rest.
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/jaxllm_gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
date -u; nvidia-smi -L
$PY -c "import jax, torch; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, torch.cuda.is_available())"

echo "== 1. numerics on the GPU (float32 matmuls at full precision) =="
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 150 $PY -m pytest -q -x -p no:cacheprovider \
  tests/test_model.py tests/test_generate.py tests/test_sampling.py 2>&1 | tail -4

echo "== 2. decode with stacked (scan) vs unstacked layers on the GPU =="
timeout 120 $PY - <<'PYEOF'
import jax, jaxllm
from jaxllm.model import unstack_layers
cfg = jaxllm.ModelConfig(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, d_ff=2048, max_seq_len=1024)
params = jaxllm.init_params(cfg, jax.random.key(0))
for name, p in [("stacked (scan)", params), ("unstacked", unstack_layers(params))]:
    for B in (1, 8):
        kw = dict(max_new_tokens=128, temperature=0.0, eos_token_id=[])
        jaxllm.generate(p, cfg, [[1] * 32] * B, **kw)
        best = min(jaxllm.generate(p, cfg, [[1] * 32] * B, **kw).timing["decode_s"] for _ in range(3))
        print(f"small B={B:2d} {name:15s} {B * 128 / best:8.1f} tok/s")
PYEOF

echo "== 3. decode vs transformers on the same GPU =="
timeout 240 $PY benchmarks/decode.py --reps 2 --batches 1,8,32 --markdown 2>&1 | tee "$OUT/decode.txt" | grep -v "^\[" 

echo "== 4. attention backends equal the reference on the GPU (cuDNN flash in bf16), ring caches, sinks =="
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_long_context.py 2>&1 | tail -4

echo "== 5. prefill attention: cuDNN flash vs XLA, small config in bf16, 2k and 8k tokens =="
timeout 200 $PY - <<'PYEOF'
import time, jax, jax.numpy as jnp, jaxllm
from jaxllm.model import hidden_states
base = jaxllm.ModelConfig(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, d_ff=2048,
                          max_seq_len=8192, compute_dtype="bfloat16", param_dtype="bfloat16")
params = jaxllm.init_params(base, jax.random.key(0))
for n in (2048, 8192):
    tokens = jax.random.randint(jax.random.key(n), (1, n), 3, 32000)
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

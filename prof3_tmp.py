import time, resource, sys, jax, jax.numpy as jnp
import jaxllm
from jaxllm import devices
from jaxllm.generate import _prepare, decode_chunk, init_state, left_pad, bucket
from jaxllm.kvcache import CacheSpec, init_cache
from jaxllm.sampling import choose_next
params, cfg, tok = jaxllm.load_checkpoint("jaxllm/assets/default")
p = devices.prepare(params, cfg)
spec = CacheSpec().check(cfg)
req = _prepare(cfg, ["def fibonacci(n):"], tok, max_new_tokens=64, n=1, stop=[], eos_token_id=None, repeat_count=0, add_bos=True,
               parse_special=False, sampling=None, sampling_kwargs=dict(temperature=0.8), chunk=16, spec=spec)
tokens, positions = left_pad(req.prompts, bucket(max(map(len, req.prompts))), req.pad_id)
def cpu(): r = resource.getrusage(resource.RUSAGE_SELF); return r.ru_utime + r.ru_stime
def measure(name, f, *a, **k):
    lo = jax.jit(f, **k).lower(*a)
    c0 = cpu(); lo.compile(); print(f"{name}: compile cpu {cpu() - c0:.2f}s", flush=True)
abstract = jax.eval_shape(lambda p, t, q, s: init_state(p, cfg, t, q, s, buffer_len=req.buffer_len, spec=spec), p, jnp.asarray(tokens), jnp.asarray(positions), req.stops)
measure("init_state", lambda p, t, q, s: init_state(p, cfg, t, q, s, buffer_len=req.buffer_len, spec=spec), p, jnp.asarray(tokens), jnp.asarray(positions), req.stops)
measure("decode_chunk", lambda p, s, sp, st: decode_chunk(p, cfg, s, sp, st, None, chunk=16, pad_id=req.pad_id), p, abstract, req.sampling, req.stops)
measure("forward step", lambda p, s: jaxllm.forward(p, cfg, jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32), s.cache), p, abstract)
measure("forward step stacked", lambda p, s: jaxllm.forward(p, cfg, jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32), s.cache), params, abstract)
measure("choose_next", lambda s, sp, st: choose_next(s.logits, sp, s.history, st.eos_ids), abstract, req.sampling, req.stops)

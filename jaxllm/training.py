"""Training as pure functions: loss, optimizer, one jitted step, eval, and the device mesh
(the host loop that drives them is `train_loop.py`).

Legend: B batch (sequences), T tokens per window, V vocab, A micro-batches per step
(gradient accumulation), b = B / A rows per micro-batch.

    batch [A, b, T+1] ──scan(grad of loss_fn)──▶ mean grads ──clip──▶ AdamW (warmup+cosine)
                      ──▶ new TrainState (skipped when the loss or grads are not finite)

Master weights are float32 whatever the model's `param_dtype` (that is how a finished
model is *stored*); `compute_dtype="bfloat16"` casts them to bf16 at each matmul, so
gradients and the optimizer stay in float32.

A fine-tune starts from given params (`init_state(..., params=)`). With `tcfg.lora_rank`,
the trained params are LoRA adapters instead (lora.py): the frozen base is an argument of
the step, merged with the adapters inside the loss, so gradients and the optimizer state
cover only the adapters, and the base is never donated or changed.

Scale-out is JAX's own: a `Mesh` with a "data" and an "fsdp" axis. Batches are split
over both axes (FSDP is data parallel too); each param is sharded over "fsdp" along its
largest divisible axis, and the optimizer state follows its param. XLA inserts the
collectives, so the step below is the same code on 1 CPU, 4 simulated CPUs, a GPU or a
TPU slice.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxllm import lora
from jaxllm.config import ModelConfig, TrainConfig
from jaxllm.errors import ConfigError
from jaxllm.model import forward, init_params, param_shapes

AXES = ("data", "fsdp")
BATCH_AXES = AXES  # batch rows are split over every device


# ---------------------------------------------------------------------------- loss


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """logits [B, T, V] (float32), targets [B, T] int -> negative log-likelihoods [B, T] in nats."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return logz - picked


def token_losses(params: dict, cfg: ModelConfig, batch: jax.Array) -> jax.Array:
    """batch [B, T+1] int -> next-token losses [B, T]: position t predicts token t+1."""
    tokens, targets = batch[:, :-1], batch[:, 1:]
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits, _ = forward(params, cfg, tokens, positions)
    return cross_entropy(logits, targets)


def loss_fn(params: dict, cfg: ModelConfig, batch: jax.Array) -> jax.Array:
    """batch [B, T+1] -> mean next-token cross-entropy (scalar, nats)."""
    return jnp.mean(token_losses(params, cfg, batch))


# ---------------------------------------------------------------------------- optimizer


def learning_rate(step: jax.Array, tcfg: TrainConfig) -> jax.Array:
    """Linear warmup over `warmup_steps`, then cosine from `lr` to `lr * min_lr_ratio` at `max_steps`."""
    step = jnp.asarray(step, jnp.float32)
    warm = jnp.minimum(1.0, (step + 1) / max(tcfg.warmup_steps, 1))
    span = max(tcfg.max_steps - tcfg.warmup_steps, 1)
    progress = jnp.clip((step - tcfg.warmup_steps) / span, 0.0, 1.0)
    floor = tcfg.min_lr_ratio
    cosine = floor + (1 - floor) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
    return tcfg.lr * jnp.where(step < tcfg.warmup_steps, warm, cosine)


def decay_mask(params: dict) -> dict:
    """True for matrices (decayed), False for vectors: norm gains are never pulled to zero.

    Layer params carry a leading L axis, so "vector" means rank 1 per layer.
    """

    def is_matrix(path, x):
        per_layer_rank = x.ndim - (1 if path[0].key == "layers" else 0)
        return per_layer_rank >= 2

    return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(tcfg: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with the warmup+cosine schedule and masked decay."""
    adamw = optax.adamw(
        lambda step: learning_rate(step, tcfg),
        b1=tcfg.beta1,
        b2=tcfg.beta2,
        eps=tcfg.adam_eps,
        weight_decay=tcfg.weight_decay,
        mask=decay_mask,
    )
    if tcfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(tcfg.grad_clip), adamw)
    return adamw


# ---------------------------------------------------------------------------- state and step


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything a resumed run needs besides the data, which is a function of `step`.

    step: int32 [] optimizer steps taken (= batches consumed); params: float32 pytree (the
    model's params, or a LoRA run's adapters); opt_state: optax state whose moments mirror params.
    """

    step: jax.Array
    params: dict
    opt_state: optax.OptState


def master_config(cfg: ModelConfig) -> ModelConfig:
    """The config training runs with: float32 master weights, `cfg`'s compute dtype."""
    return cfg.replace(param_dtype="float32")


def init_state(cfg: ModelConfig, tcfg: TrainConfig, key: jax.Array, params: dict | None = None) -> TrainState:
    """A step-0 state: params drawn from `key` (init_params), or `params` (a fine-tune's start)
    as float32 master weights. With `tcfg.lora_rank`, the state's params are LoRA adapters for
    cfg's layer matrices drawn from `key`, and `params` (the frozen base) is not part of it."""
    if tcfg.lora_rank:
        params = lora.init_adapters(param_shapes(cfg), tcfg.lora_target_names, tcfg.lora_rank, key)
    elif params is not None:
        params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    else:
        params = init_params(master_config(cfg), key)
    return TrainState(jnp.zeros((), jnp.int32), params, make_optimizer(tcfg).init(params))


def model_params(params: dict, base: dict | None, tcfg: TrainConfig) -> dict:
    """The params the model runs with: `params` itself, or with a frozen `base`, the base merged
    with the adapters `params` (lora.merge at tcfg's scale)."""
    return params if base is None else lora.merge(base, params, tcfg.lora_scale)


def train_step(
    state: TrainState, batch: jax.Array, cfg: ModelConfig, tcfg: TrainConfig, base: dict | None = None
) -> tuple[TrainState, dict]:
    """One optimizer step over batch [A, b, T+1] -> (new state, {loss, grad_norm, lr}).

    Gradients are averaged over the A micro-batches with a `scan`, so memory holds one
    micro-batch's activations. A non-finite loss or gradient leaves params and optimizer
    state unchanged (the host sees the loss and stops the run). With a frozen `base`, the
    state's params are LoRA adapters: the loss runs on their merge with it, and only they
    get gradients.
    """
    cfg = master_config(cfg)
    grad_fn = jax.value_and_grad(lambda p, mb: loss_fn(model_params(p, base, tcfg), cfg, mb))

    def micro(carry, mb):
        loss_sum, grad_sum = carry
        loss, grads = grad_fn(state.params, mb)
        return (loss_sum + loss, jax.tree_util.tree_map(jnp.add, grad_sum, grads)), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
    (loss_sum, grad_sum), _ = jax.lax.scan(micro, (jnp.zeros((), jnp.float32), zeros), batch)
    A = batch.shape[0]
    loss = loss_sum / A
    grads = jax.tree_util.tree_map(lambda g: g / A, grad_sum)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(grads)))

    optimizer = make_optimizer(tcfg)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    new = TrainState(
        state.step + 1,
        jax.tree_util.tree_map(keep, params, state.params),
        jax.tree_util.tree_map(keep, opt_state, state.opt_state),
    )
    return new, {"loss": loss, "grad_norm": grad_norm, "lr": learning_rate(state.step, tcfg)}


def eval_step(params: dict, cfg: ModelConfig, batch: jax.Array) -> jax.Array:
    """batch [B, T+1] -> summed next-token loss (nats) over its B*T predictions."""
    return jnp.sum(token_losses(params, master_config(cfg), batch))


# ---------------------------------------------------------------------------- devices


def maybe_initialize_distributed() -> bool:
    """Calls `jax.distributed.initialize()` when the environment describes a multi-host job.

    TPU pods (several worker hostnames), SLURM/Open MPI jobs of more than one task, or an
    explicit JAX_COORDINATOR_ADDRESS; a single machine never needs it.
    """
    env = os.environ
    multi = (
        "JAX_COORDINATOR_ADDRESS" in env
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
        or int(env.get("SLURM_NTASKS", "1") or 1) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1
    )
    if multi and not jax.distributed.is_initialized():
        jax.distributed.initialize()
    return multi


def make_mesh(fsdp: int = 1, devices=None) -> Mesh:
    """A ("data", "fsdp") mesh over all devices (or `devices`): data = n_devices // fsdp."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    n = devices.size
    if n % fsdp:
        raise ConfigError(f"fsdp={fsdp} does not divide the {n} available devices")
    return Mesh(devices.reshape(n // fsdp, fsdp), AXES)


def param_shardings(params: dict, mesh: Mesh) -> dict:
    """NamedShardings for a params tree (a frozen base, say) laid out as `state_shardings` lays
    out trained params: each over "fsdp" along its largest divisible axis, or replicated."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree_util.tree_map_with_path(lambda path, x: NamedSharding(mesh, param_spec(path, x.shape, fsdp)), params)


def place(tree, shardings):
    """Host arrays (the same on every host) -> global arrays laid out as `shardings` say; each
    device gets only its part (works across hosts, unlike a plain device_put)."""

    def one(x, sharding):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(one, tree, shardings)


def param_spec(path, shape: tuple[int, ...], fsdp: int) -> P:
    """Shards a param's largest axis divisible by the fsdp size (never the stacked layer
    axis, which the layer scan walks through); replicated if none divides."""
    if fsdp == 1:
        return P()
    first = 1 if path and getattr(path[0], "key", None) == "layers" else 0
    candidates = [a for a in range(first, len(shape)) if shape[a] % fsdp == 0]
    if not candidates:
        return P()
    axis = max(candidates, key=lambda a: shape[a])
    return P(*[("fsdp" if a == axis else None) for a in range(len(shape))])


def _dict_keys(path) -> tuple:
    return tuple(p.key for p in path if isinstance(p, jax.tree_util.DictKey))


def state_shardings(state_shapes: TrainState, mesh: Mesh) -> TrainState:
    """NamedShardings for a whole TrainState (given its shapes, e.g. from `jax.eval_shape`).

    An optimizer-state leaf under the same dict keys as a param (Adam's mu and nu) gets that
    param's sharding; everything else (counters, the step) is replicated.
    """
    fsdp = mesh.shape["fsdp"]
    by_keys = {}

    def for_param(path, x):
        spec = param_spec(path, x.shape, fsdp)
        by_keys[_dict_keys(path)] = spec
        return NamedSharding(mesh, spec)

    params = jax.tree_util.tree_map_with_path(for_param, state_shapes.params)

    def for_opt(path, x):
        spec = by_keys.get(_dict_keys(path), P())
        if len(spec) > x.ndim or (len(spec) and x.ndim == 0):
            spec = P()
        return NamedSharding(mesh, spec)

    opt = jax.tree_util.tree_map_with_path(for_opt, state_shapes.opt_state)
    return TrainState(NamedSharding(mesh, P()), params, opt)


def batch_sharding(mesh: Mesh, accumulated: bool = True) -> NamedSharding:
    """[A, b, T+1] batches split on b (or [B, T+1] on B) over every device."""
    return NamedSharding(mesh, P(None, BATCH_AXES, None) if accumulated else P(BATCH_AXES, None))


def compile_step(cfg: ModelConfig, tcfg: TrainConfig, mesh: Mesh, shardings: TrainState, base_shardings: dict | None = None):
    """train_step jitted for this mesh, the state donated (updated in place): step(state, batch),
    or with `base_shardings` (a LoRA run) step(state, batch, base), the frozen base not donated."""
    replicated = NamedSharding(mesh, P())
    metrics = {"loss": replicated, "grad_norm": replicated, "lr": replicated}
    if base_shardings is None:
        return jax.jit(
            lambda state, batch: train_step(state, batch, cfg, tcfg),
            in_shardings=(shardings, batch_sharding(mesh)),
            out_shardings=(shardings, metrics),
            donate_argnums=0,
        )
    return jax.jit(
        lambda state, batch, base: train_step(state, batch, cfg, tcfg, base),
        in_shardings=(shardings, batch_sharding(mesh), base_shardings),
        out_shardings=(shardings, metrics),
        donate_argnums=0,
    )


def compile_eval(cfg: ModelConfig, mesh: Mesh, param_shardings: dict, base_shardings: dict | None = None, tcfg: TrainConfig | None = None):
    """eval_step jitted for this mesh: eval(params, batch), or with `base_shardings` (a LoRA run,
    `tcfg` giving its scale) eval(adapters, batch, base) on their merge."""
    out = NamedSharding(mesh, P())
    batch = batch_sharding(mesh, accumulated=False)
    if base_shardings is None:
        return jax.jit(lambda params, b: eval_step(params, cfg, b), in_shardings=(param_shardings, batch), out_shardings=out)
    return jax.jit(
        lambda params, b, base: eval_step(model_params(params, base, tcfg), cfg, b),
        in_shardings=(param_shardings, batch, base_shardings),
        out_shardings=out,
    )


def init_sharded_state(cfg: ModelConfig, tcfg: TrainConfig, key: jax.Array, mesh: Mesh) -> tuple[TrainState, TrainState]:
    """-> (state created directly in its sharded layout, its shardings): no device ever holds
    the whole unsharded state."""
    shapes = jax.eval_shape(lambda k: init_state(cfg, tcfg, k), key)
    shardings = state_shardings(shapes, mesh)
    state = jax.jit(lambda k: init_state(cfg, tcfg, k), out_shardings=shardings)(key)
    return state, shardings


def global_batch(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """This host's rows -> one global array (each host passes its own contiguous block)."""
    return jax.make_array_from_process_local_data(sharding, local)


def count_params(params: dict) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params))

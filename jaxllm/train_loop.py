"""A training run on the host: data, state, the step loop, evals, checkpoints, metrics.

    run: load_base ─▶ start_run ─▶ prepare_corpus ─▶ init_or_restore ─▶ train_steps ─▶ keep_best ─▶ write_plot
         load_base: only for a fine-tune (tcfg.init_from): the model, its config and tokenizer
         train_steps: a step per batch; at log points flush, at eval/save points evaluate, save

    OUT_DIR/
      run.json                       the model and train configs the run was started with
      data/                          token shards (+ tokenizer.model when trained here)
      state/<step>/                  Orbax checkpoints (TrainState + meta): the last `keep`
                                     and the best by val loss; a LoRA run's hold only the
                                     adapters and their optimizer state (the base is read
                                     again from init_from on --resume, checked by fingerprint)
      config.json params.safetensors tokenizer.model (or tokenizer.json + tokenizer_config.json)
                                     the model directory: `sample.py --checkpoint OUT_DIR`
                                     (a LoRA run's: the base merged with the adapters)
      adapters.safetensors adapters.json
                                     a LoRA run's adapters alone, with rank, alpha, targets,
                                     init_from and the base's fingerprint (lora.py)
      metrics.jsonl                  one JSON object per logged step
      loss.png                       the loss curves, written at the end (with matplotlib)

A fine-tune (`init_from`: a jaxllm checkpoint or Hugging Face directory) starts from that
model's weights, trains with its tokenizer, and keeps its config except for the fields
config.FINETUNE_FIELDS allows to change. With `lora_rank`, the model stays frozen (on the
devices once, sharded like trained params) and only low-rank adapters train (training.py).

The loop never waits on the device between log points: metrics stay on device until a
flush, which is also where a NaN/inf loss is caught. Orbax writes each checkpoint under a
temporary name and renames it when complete, so a run killed mid-save resumes from the
previous checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from jaxllm import data, lora, training
from jaxllm.checkpoint import load_any, save_checkpoint
from jaxllm.config import ModelConfig, TrainConfig, finetune_config
from jaxllm.errors import CheckpointError, ConfigError, TrainingError
from jaxllm.plot import INSTALL_HINT, loss_curve
from jaxllm.quantize import quantization_of
from jaxllm.tokenizer import Tokenizer

RUN_FILE, METRICS_FILE, PLOT_FILE, STATE_DIR = "run.json", "metrics.jsonl", "loss.png", "state"


@dataclasses.dataclass
class RunResult:
    step: int  # last step taken
    stop_reason: str  # "max_steps", "max_minutes" or "stop_at"
    losses: dict[int, float]  # step -> train loss, for the steps this call ran
    evals: dict[int, dict]  # step -> {"val_loss", "val_ppl", "val_bpb"}
    best_step: int | None  # the step whose params the model directory holds at the end


# ---------------------------------------------------------------------------- run directory


def read_run(out_dir: str | os.PathLike) -> tuple[ModelConfig, TrainConfig]:
    """The configs a run in `out_dir` was started with (for `--resume` without `--config`)."""
    path = Path(out_dir) / RUN_FILE
    try:
        values = json.loads(path.read_text())
        return ModelConfig.from_dict(values["model"]), TrainConfig.from_dict(values["train"])
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: {out_dir} holds no run to resume") from None
    except (OSError, ValueError, KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{path} is unreadable or corrupt ({e})") from None


def _config_diff(a: ModelConfig, b: ModelConfig) -> str:
    da, db = a.to_dict(), b.to_dict()
    return ", ".join(f"{k}={db[k]!r} (run has {da[k]!r})" for k in da if da[k] != db[k])


def _manager(state_dir: Path, keep: int) -> ocp.CheckpointManager:
    """Keeps the last `keep` checkpoints plus the best by val loss."""
    policies = getattr(ocp, "checkpoint_managers", None)
    if hasattr(policies, "AnyPreservationPolicy"):
        policy = policies.AnyPreservationPolicy(
            [
                policies.LatestN(n=keep),
                # BestN keeps the largest metric values: rank by minus the val loss.
                policies.BestN(get_metric_fn=lambda m: -m["val_loss"], n=1, keep_checkpoints_without_metrics=False),
            ]
        )
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, cleanup_tmp_directories=True, create=True)
    else:  # an Orbax without preservation policies: the best `keep + 1` by val loss
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep + 1, best_fn=lambda m: m["val_loss"], best_mode="min", create=True
        )
    return ocp.CheckpointManager(state_dir, options=options)


def _restore(mngr: ocp.CheckpointManager, step: int, abstract: training.TrainState) -> tuple[training.TrainState, dict]:
    try:
        out = mngr.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
        )
        return out["state"], dict(out["meta"])
    except Exception as e:  # Orbax and TensorStore raise many types for a damaged checkpoint
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"checkpoint {mngr.directory / str(step)} is unreadable or corrupt ({type(e).__name__}: {first})"
        ) from None


def _trim_metrics(path: Path, after_step: int) -> list[dict]:
    """Drops records past `after_step` (written by the run being resumed after its last
    checkpoint) and returns those kept."""
    if not path.exists():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if record.get("step", 0) <= after_step:
            kept.append(record)
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return kept


def write_plot(out_dir: str | os.PathLike) -> Path | None:
    """loss.png from metrics.jsonl: train loss per logged step, val loss per eval. -> its path,
    or None (nothing written) without matplotlib."""
    out_dir = Path(out_dir)
    records = [json.loads(line) for line in (out_dir / METRICS_FILE).read_text().splitlines() if line.strip()]
    series = {
        "train": ([r["step"] for r in records if "loss" in r], [r["loss"] for r in records if "loss" in r]),
        "val": ([r["step"] for r in records if "val_loss" in r], [r["val_loss"] for r in records if "val_loss" in r]),
    }
    return out_dir / PLOT_FILE if loss_curve(out_dir / PLOT_FILE, series) else None


# ---------------------------------------------------------------------------- the run's steps


@dataclasses.dataclass
class Base:
    """A fine-tune's starting model (tcfg.init_from): host params as stored, the config the run
    trains (its own, with the allowed changes), its tokenizer, and (for LoRA) its fingerprint."""

    params: dict | None  # None once the run has put them on the devices
    cfg: ModelConfig
    tokenizer: Tokenizer
    fingerprint: str  # lora.fingerprint of params; "" for a full fine-tune (which does not need it)


def load_base(tcfg: TrainConfig, changes: ModelConfig | dict | None) -> Base:
    """Reads `tcfg.init_from` and checks it can be fine-tuned: float weights, a tokenizer, and
    `changes` (model fields asked for) within config.FINETUNE_FIELDS (config.finetune_config)."""
    where = tcfg.init_from
    try:
        params, base_cfg, tokenizer, _ = load_any(where)
    except CheckpointError as e:
        raise CheckpointError(f"init_from: {e}") from None
    quantization = quantization_of(params)
    if quantization is not None:
        raise CheckpointError(
            f"init_from {where} holds {quantization['bits']}-bit quantized weights: fine-tune its float checkpoint instead"
        )
    if tokenizer is None:
        raise CheckpointError(f"init_from {where} has no tokenizer (tokenizer.model or tokenizer.json): a fine-tune needs the model's own")
    cfg = finetune_config(base_cfg, changes, where=f"init_from {where}")
    params = jax.device_get(params)
    return Base(params, cfg, tokenizer, lora.fingerprint(params) if tcfg.lora_rank else "")


@dataclasses.dataclass
class Run:
    """What every step of a run shares: its configs, where it writes, and this host's place."""

    cfg: ModelConfig
    tcfg: TrainConfig
    out_dir: Path  # absolute
    seq_len: int  # tokens per training row
    mesh: jax.sharding.Mesh
    micro: int  # rows per micro-batch (batch_size / grad_accum), all hosts together
    pid: int  # this host's index
    hosts: int
    say: Callable[[str], None]  # progress lines; silent on all but the lead host
    started: float  # time.monotonic() when the run began
    base: Base | None = None  # a fine-tune's starting model
    frozen: dict | None = None  # a LoRA run's base on the devices (global arrays)
    frozen_shardings: dict | None = None

    @property
    def lead(self) -> bool:
        return self.pid == 0

    @property
    def state_dir(self) -> Path:
        return self.out_dir / STATE_DIR


@dataclasses.dataclass
class Corpus:
    """The run's data, tokenized: the tokenizer, the train tokens and the validation split."""

    tokenizer: Tokenizer
    train_tokens: np.ndarray  # [N] uint16/uint32
    val: data.Split
    data_dir: Path


@dataclasses.dataclass
class Checkpoints:
    """The Orbax manager, the state's abstract form (shapes, dtypes, shardings) that restores
    need, and the bookkeeping of what has been saved."""

    mngr: ocp.CheckpointManager
    abstract: training.TrainState  # of jax.ShapeDtypeStruct with shardings
    best_val: float = math.inf
    best_step: int | None = None  # the step of the best val loss so far
    last_saved: int | None = None


@dataclasses.dataclass
class Meter:
    """Metrics between log points: kept on device until `flush`, and the throughput clock."""

    tokens_per_step: int
    clock_t: float  # time.monotonic() when the clock last started
    clock_step: int  # the step it started at
    pending: list[tuple[int, dict]] = dataclasses.field(default_factory=list)  # (step, device metrics)
    losses: dict[int, float] = dataclasses.field(default_factory=dict)  # step -> train loss, once flushed


def _finetune_diff(run: TrainConfig, now: TrainConfig) -> str:
    """The fine-tuning settings that differ between a run and its resume ("" if none may not)."""
    fields = [("init_from given", bool(run.init_from), bool(now.init_from)), ("lora_rank", run.lora_rank, now.lora_rank),
              ("lora_targets", run.lora_target_names, now.lora_target_names), ("lora_scale", run.lora_scale, now.lora_scale)]
    return ", ".join(f"{k}={b!r} (run has {a!r})" for k, a, b in fields if a != b)


def start_run(
    cfg: ModelConfig,
    tcfg: TrainConfig,
    out_dir: str | os.PathLike,
    resume: bool,
    log: Callable[[str], None] | None,
    base: Base | None = None,
) -> Run:
    """Checks the request before any heavy work (sequence length, the batch over devices and
    hosts, `resume` against what `out_dir` holds) and writes run.json; starts `jax.distributed`
    when the environment describes a multi-host job."""
    started = time.monotonic()
    training.maybe_initialize_distributed()
    pid, hosts = jax.process_index(), jax.process_count()
    say = log or (lambda msg: tqdm.write(msg))
    if pid != 0:
        say = lambda msg: None  # noqa: E731
    out_dir = Path(out_dir).absolute()
    state_dir = out_dir / STATE_DIR

    seq_len = tcfg.seq_len or cfg.max_seq_len
    if seq_len > cfg.max_seq_len:
        raise ConfigError(f"seq_len {seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
    mesh = training.make_mesh(tcfg.fsdp)
    micro = tcfg.batch_size // tcfg.grad_accum
    if micro % mesh.size or micro % hosts:
        raise ConfigError(
            f"batch_size / grad_accum = {micro} rows must divide over {mesh.size} devices and {hosts} hosts"
        )
    has_state = state_dir.is_dir() and any(p.name.isdigit() for p in state_dir.iterdir())
    if resume:
        run_cfg, run_tcfg = read_run(out_dir)
        if run_cfg != cfg:
            raise ConfigError(f"--resume: the model config differs from the run in {out_dir}: {_config_diff(run_cfg, cfg)}")
        if _finetune_diff(run_tcfg, tcfg):
            raise ConfigError(f"--resume: the fine-tuning settings differ from the run in {out_dir}: {_finetune_diff(run_tcfg, tcfg)}")
        if not has_state:
            raise CheckpointError(f"--resume: no checkpoint in {state_dir}")
    elif has_state:
        raise ConfigError(f"{out_dir} already holds a run; pass --resume to continue it, or choose another --out_dir")
    if pid == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / RUN_FILE).write_text(json.dumps({"model": cfg.to_dict(), "train": tcfg.to_dict()}, indent=2) + "\n")
    return Run(cfg, tcfg, out_dir, seq_len, mesh, micro, pid, hosts, say, started, base)


def prepare_corpus(run: Run) -> Corpus:
    """Tokenizes the corpus into shards (training a tokenizer unless one is given). The lead
    host prepares them; the others then read what it wrote (OUT_DIR is shared)."""
    cfg, tcfg = run.cfg, run.tcfg
    data_dir = Path(tcfg.data_dir) if tcfg.data_dir else run.out_dir / "data"
    given = run.base.tokenizer if run.base else Tokenizer.load(tcfg.tokenizer) if tcfg.tokenizer else None

    def prepare():
        return data.prepare(
            tcfg.data,
            data_dir,
            tokenizer=given,
            vocab_size=cfg.vocab_size,
            val_fraction=tcfg.val_fraction,
            limit_mb=tcfg.data_limit_mb,
            log=run.say,
        )

    if run.lead:
        tokenizer, splits = prepare()
    if run.hosts > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jaxllm: data prepared")
    if not run.lead:
        tokenizer, splits = prepare()
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {cfg.vocab_size}")
    train_tokens, val_split = splits["train"].tokens, splits["val"]
    run.say(
        f"data: {len(train_tokens):,} train / {len(val_split.tokens):,} val tokens "
        f"({val_split.bytes_per_token:.2f} bytes/token); {run.mesh.size} device(s) {dict(run.mesh.shape)}, {run.hosts} host(s)"
    )
    return Corpus(tokenizer, train_tokens, val_split, data_dir)


def init_or_restore(run: Run, corpus: Corpus, ckpts: Checkpoints, resume: bool) -> tuple[training.TrainState, int]:
    """-> (state, its step): fresh from the seed, or the latest checkpoint (with its
    bookkeeping) restored straight into the sharding it will train with."""
    if resume:
        start = ckpts.mngr.latest_step()
        state, meta = _restore(ckpts.mngr, start, ckpts.abstract)
        if meta.get("tokenizer") != corpus.tokenizer.fingerprint:
            raise CheckpointError(f"--resume: the tokenizer in {corpus.data_dir} is not the one the checkpoint was trained with")
        if run.frozen is not None and meta.get("base") != run.base.fingerprint:
            raise CheckpointError(
                f"--resume: the model in init_from {run.tcfg.init_from} is not the base the adapters in {run.state_dir} were trained on"
            )
        ckpts.best_val, ckpts.best_step, ckpts.last_saved = meta.get("best_val_loss", math.inf), meta.get("best_step"), start
        run.say(f"resumed from step {start}")
        return state, start
    shardings = jax.tree_util.tree_map(lambda a: a.sharding, ckpts.abstract)
    key = jax.random.key(run.tcfg.seed)
    if run.base is not None and run.frozen is None:  # a full fine-tune: the base's weights, float32
        start = training.place(
            jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), run.base.params), shardings.params
        )
        init = jax.jit(lambda k, p: training.init_state(run.cfg, run.tcfg, k, p), out_shardings=shardings)
        return init(key, start), 0
    init = jax.jit(lambda k: training.init_state(run.cfg, run.tcfg, k), out_shardings=shardings)
    return init(key), 0


def evaluate(run: Run, corpus: Corpus, eval_fn: Callable, params: dict) -> dict:
    """The mean validation loss over the fixed eval batches, with its perplexity and bits per
    byte: {"val_loss", "val_ppl", "val_bpb"}."""
    tcfg, sharding = run.tcfg, training.batch_sharding(run.mesh, accumulated=False)
    total = jnp.zeros((), jnp.float32)
    batches = data.eval_batches(corpus.val.tokens, run.seq_len, run.micro, tcfg.eval_batches, run.pid, run.hosts)
    for b in batches:
        total = total + eval_fn(params, training.global_batch(b, sharding))
    loss = float(total) / (tcfg.eval_batches * run.micro * run.seq_len)
    return {
        "val_loss": loss,
        "val_ppl": math.exp(min(loss, 700.0)),
        "val_bpb": data.bits_per_byte(loss, corpus.val),
    }


def save(run: Run, corpus: Corpus, ckpts: Checkpoints, state: training.TrainState, step: int, val_loss: float) -> None:
    """Checkpoints `state` at `step` (Orbax, with the metadata a resume checks) and rewrites the
    model directory with its params; updates the best-so-far bookkeeping."""
    if val_loss < ckpts.best_val:
        ckpts.best_val, ckpts.best_step = val_loss, step
    meta = {
        "step": step,
        "data_position": step,  # batches are a function of (seed, step)
        "seed": run.tcfg.seed,
        "tokenizer": corpus.tokenizer.fingerprint,
        "val_loss": val_loss,
        "best_val_loss": ckpts.best_val,
        "best_step": ckpts.best_step,
    }
    if run.base is not None:
        meta.update(init_from=run.tcfg.init_from, base=run.base.fingerprint)
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    ckpts.mngr.save(step, args=args, metrics={"val_loss": val_loss}, force=True)
    write_outputs(run, corpus, state.params, step)
    ckpts.last_saved = step


def write_outputs(run: Run, corpus: Corpus, params: dict, step: int) -> None:
    """The model directory from the trained `params`; for a LoRA run, `params` are the adapters:
    the directory gets the base merged with them, and adapters.safetensors/.json the adapters."""
    if run.frozen is None:
        host = host_params(params)
        if run.lead:
            write_model_dir(run.out_dir, host, run.cfg, corpus.tokenizer)
        return
    merged = host_params(_merge(params, run.frozen, run.tcfg))
    adapters = host_params(params)
    if run.lead:  # the adapters first: a crash between the two leaves the merged model the older one
        tcfg = run.tcfg
        info = {
            "rank": tcfg.lora_rank, "alpha": tcfg.lora_scale * tcfg.lora_rank, "scale": tcfg.lora_scale,
            "targets": list(tcfg.lora_target_names), "init_from": tcfg.init_from,
            "base_fingerprint": run.base.fingerprint, "step": step, "model": run.cfg.to_dict(),
        }  # fmt: skip
        lora.save_adapters(run.out_dir, adapters, info)
        write_model_dir(run.out_dir, merged, run.cfg, corpus.tokenizer)


_merge = jax.jit(training.model_params, static_argnums=2)  # (adapters, base, tcfg) -> merged params


def flush(run: Run, meter: Meter, ckpts: Checkpoints, step: int) -> dict:
    """Pulls the pending metrics to the host (the loop's only wait on the device) and returns
    the record for metrics.jsonl; stops the run on a NaN/inf loss, before anything is saved."""
    fetched = jax.device_get(meter.pending)
    meter.pending.clear()
    for s, m in fetched:
        if not math.isfinite(float(m["loss"])) or not math.isfinite(float(m["grad_norm"])):
            where = f"step {ckpts.last_saved} in {run.state_dir}" if ckpts.last_saved is not None else "none saved yet"
            raise TrainingError(
                f"loss became {float(m['loss'])} (grad norm {float(m['grad_norm'])}) at step {s}; "
                f"stopped without saving. Last good checkpoint: {where}. Try a lower --lr or --grad_clip"
            )
        meter.losses[s] = float(m["loss"])
    now = time.monotonic()
    rate = (step - meter.clock_step) * meter.tokens_per_step / max(now - meter.clock_t, 1e-9)
    meter.clock_t, meter.clock_step = now, step
    last = fetched[-1][1]
    return {
        "step": step,
        "loss": float(np.mean([float(m["loss"]) for _, m in fetched])),
        "lr": float(last["lr"]),
        "grad_norm": float(last["grad_norm"]),
        "tokens_per_s": round(rate, 1),
        "elapsed_s": round(now - run.started, 2),
    }


def train_steps(
    run: Run,
    corpus: Corpus,
    ckpts: Checkpoints,
    state: training.TrainState,
    start: int,
    stop_at: int | None,
    progress: bool,
) -> tuple[int, str, dict[int, float], dict[int, dict]]:
    """The step loop from `start`: a step per batch, and at log points a flush, at eval and
    save points an eval and a checkpoint, each record appended to metrics.jsonl.
    -> (last step, stop reason, {step: train loss}, {step: eval metrics})."""
    cfg, tcfg = run.cfg, run.tcfg
    shardings = jax.tree_util.tree_map(lambda a: a.sharding, ckpts.abstract)
    step_fn = training.compile_step(cfg, tcfg, run.mesh, shardings, run.frozen_shardings)
    eval_fn = training.compile_eval(cfg, run.mesh, shardings.params, run.frozen_shardings, tcfg)
    frozen = () if run.frozen is None else (run.frozen,)  # a LoRA run's steps take the base too
    batch_sh = training.batch_sharding(run.mesh)
    metrics_path = run.out_dir / METRICS_FILE
    if run.lead:
        _trim_metrics(metrics_path, start)
    evals: dict[int, dict] = {}
    meter = Meter(tcfg.batch_size * run.seq_len, time.monotonic(), start)
    bar = tqdm(total=tcfg.max_steps, initial=start, unit="step", disable=not (progress and run.lead), dynamic_ncols=True)
    step, reason = start, "max_steps"
    try:
        while step < tcfg.max_steps:
            local = data.train_batch(
                corpus.train_tokens, tcfg.seed, step, run.seq_len, tcfg.batch_size, tcfg.grad_accum, run.pid, run.hosts
            )
            state, m = step_fn(state, training.global_batch(local, batch_sh), *frozen)
            step += 1
            meter.pending.append((step, m))
            bar.update(1)
            at_log = step % tcfg.log_every == 0
            if at_log and tcfg.max_minutes and _agree(time.monotonic() - run.started > tcfg.max_minutes * 60):
                reason = "max_minutes"
            if stop_at is not None and step >= stop_at:
                reason = "stop_at"
            last = step == tcfg.max_steps or reason != "max_steps"
            do_save = last or (tcfg.save_every and step % tcfg.save_every == 0)
            do_eval = do_save or (tcfg.eval_every and step % tcfg.eval_every == 0)
            if not (at_log or do_eval or last):
                continue
            record = flush(run, meter, ckpts, step)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.3g}", refresh=False)
            if do_eval:
                record.update(evaluate(run, corpus, lambda p, b: eval_fn(p, b, *frozen), state.params))
                evals[step] = {k: record[k] for k in ("val_loss", "val_ppl", "val_bpb")}
                run.say(
                    f"step {step}: loss {record['loss']:.4f}, val loss {record['val_loss']:.4f}, "
                    f"val bpb {record['val_bpb']:.4f}"
                )
                meter.clock_t = time.monotonic()  # eval time is not training throughput
            if do_save:
                save(run, corpus, ckpts, state, step, record["val_loss"])
            if run.lead:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            if last:
                break
    finally:
        bar.close()
        ckpts.mngr.wait_until_finished()
    return step, reason, meter.losses, evals


def keep_best(run: Run, corpus: Corpus, ckpts: Checkpoints, step: int) -> None:
    """Leaves the model directory holding the best params by val loss, not the (overfit) last."""
    if ckpts.best_step is None or ckpts.best_step == step:
        return
    best_state, _ = _restore(ckpts.mngr, ckpts.best_step, ckpts.abstract)
    write_outputs(run, corpus, best_state.params, ckpts.best_step)
    run.say(f"the model directory holds step {ckpts.best_step} (best val loss {ckpts.best_val:.4f})")


# ---------------------------------------------------------------------------- the run


def run(
    cfg: ModelConfig | dict | None,
    tcfg: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    stop_at: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> RunResult:
    """Trains `cfg` as `tcfg` says, writing everything under `out_dir` (see the module doc).

    `resume` continues from the latest checkpoint with the same batches an uninterrupted
    run would have seen. `stop_at` ends the run after that step (evaluated and saved) as if
    it had been interrupted, without changing the schedule.

    With `tcfg.init_from` (a fine-tune) the model config is that model's: `cfg` may be None,
    a dict of model fields to change, or a whole ModelConfig, and may differ from it only in
    config.FINETUNE_FIELDS (anything else is refused by name).
    """
    if tcfg.init_from and not resume:  # run.json records where the base is from any working directory
        tcfg = tcfg.replace(init_from=str(Path(tcfg.init_from).resolve()))
    base = load_base(tcfg, cfg) if tcfg.init_from else None
    if base is not None:
        cfg = base.cfg
    elif not isinstance(cfg, ModelConfig):
        raise ConfigError("a model config is needed (a preset's \"model\" section), unless the run starts from init_from")
    r = start_run(cfg, tcfg, out_dir, resume, log, base)
    corpus = prepare_corpus(r)
    start_params = base.params if base is not None and not tcfg.lora_rank else None
    shapes = jax.eval_shape(lambda k, p: training.init_state(cfg, tcfg, k, p), jax.random.key(tcfg.seed), start_params)
    shardings = training.state_shardings(shapes, r.mesh)
    abstract = jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    if base is not None and tcfg.lora_rank:  # the frozen base, on the devices once
        r.frozen_shardings = training.param_shardings(base.params, r.mesh)
        r.frozen = training.place(base.params, r.frozen_shardings)
    ckpts = Checkpoints(_manager(r.state_dir, tcfg.keep), abstract)
    try:
        state, start = init_or_restore(r, corpus, ckpts, resume)
        if base is not None:
            base.params = None  # on the devices now: the host copy can go
        if r.frozen is not None:
            r.say(
                f"model: {training.count_params(r.frozen):,} params from {tcfg.init_from}, frozen; "
                f"LoRA rank {tcfg.lora_rank} on {','.join(tcfg.lora_target_names)}: "
                f"{training.count_params(state.params):,} trained params; training steps {start}..{tcfg.max_steps}"
            )
        else:
            source = f" from {tcfg.init_from}" if base is not None else ""
            r.say(f"model: {training.count_params(state.params):,} params{source}; training steps {start}..{tcfg.max_steps}")
        step, reason, losses, evals = train_steps(r, corpus, ckpts, state, start, stop_at, progress)
        keep_best(r, corpus, ckpts, step)
    finally:
        ckpts.mngr.close()
    if r.lead and write_plot(r.out_dir) is None:
        r.say(f"no {PLOT_FILE}: the loss plot needs matplotlib ({INSTALL_HINT})")
    r.say(f"done at step {step} ({reason}) in {time.monotonic() - r.started:.0f}s; sample with: python sample.py --checkpoint {r.out_dir}")
    return RunResult(step, reason, losses, evals, ckpts.best_step)


def host_params(params: dict) -> dict:
    """Params as numpy arrays on every host (a collective when they span several hosts)."""
    if jax.process_count() == 1:
        return jax.device_get(params)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(params, tiled=True)


def write_model_dir(out_dir: Path, params: dict, cfg: ModelConfig, tokenizer: Tokenizer) -> None:
    """The sample.py-ready directory, params (host numpy) stored in the model's `param_dtype`."""
    dtype = jnp.dtype(cfg.param_dtype)
    save_checkpoint(out_dir, jax.tree_util.tree_map(lambda x: np.asarray(x).astype(dtype), params), cfg, tokenizer)


def _agree(flag: bool) -> bool:
    """The lead host's decision, on every host (so all hosts stop at the same step)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))


"""Fine-tuning an imported model (train.py --init_from) and LoRA adapters (--lora_rank).

The starting model is the suite's peaked random tiny model (conftest `params`), saved as a
jaxllm checkpoint, and a Qwen2-style variant (q/k/v biases, a tokenizer without BOS) written as
a Hugging Face directory. The fine-tune corpus is new text of another kind; held-out loss is
measured on files that are not in it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import CheckpointError, ConfigError, JsonTokenizer, Tokenizer, TrainConfig, data, export_hf, lora, load_checkpoint, train_loop, training
from jaxllm.checkpoint import flatten, save_checkpoint
from jaxllm.model import forward
from conftest import REPO, reference_stack, tiny_config
from reference import np_forward

SEQ, RANK = 32, 4
TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def write_texts(directory, first: int, n: int):
    """n files of "key K holds V apples" lines: a kind of text the starting models never saw."""
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(first, first + n):
        lines = "".join(f"key {j} holds {j * 7 % 23} apples\n" for j in range(i * 30, i * 30 + 30))
        (directory / f"doc{i:02d}.txt").write_text(lines)
    return directory


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("texts")
    return write_texts(root / "train", 0, 12), write_texts(root / "held_out", 40, 3)


def held_out_loss(params, cfg, tokenizer, held_dir) -> float:
    """Mean next-token loss over every SEQ+1 window of the held-out files, framed as training frames them."""
    docs = data.read_documents(sorted(held_dir.iterdir()))
    ids = data.encode_documents(tokenizer, docs).astype(np.int32)
    n = (len(ids) - 1) // SEQ
    windows = np.stack([ids[i * SEQ : i * SEQ + SEQ + 1] for i in range(n)])
    return float(training.loss_fn(params, cfg, jnp.asarray(windows)))


def run_cfg(texts, tmp, **changes) -> TrainConfig:
    values = dict(
        data=str(texts[0]), data_dir=str(tmp / "shards"), val_fraction=0.2, seq_len=SEQ, batch_size=8, max_steps=24,
        lr=1e-2, warmup_steps=3, weight_decay=0.0, eval_every=12, eval_batches=1, log_every=1, save_every=12, keep=2,
    )  # fmt: skip
    return TrainConfig(**{**values, **changes})


@pytest.fixture(scope="module")
def jaxllm_base(cfg, params, tokenizer, tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("base") / "ckpt", params, cfg, tokenizer)


@pytest.fixture(scope="module")
def qwen_like(corpus, tmp_path_factory):
    """(HF directory, params, cfg, tokenizer): q/k/v biases and a Qwen2-style tokenizer.json
    (byte-level BPE, NFC, no BOS, EOS <|im_end|>), as Qwen2 ships."""
    from test_tokenizer_json import build

    root = tmp_path_factory.mktemp("qwen")
    tok = Tokenizer.load(build(root / "tok", corpus, "qwen2"))
    assert isinstance(tok, JsonTokenizer) and tok.bos_id is None and tok.eos_id is not None
    cfg = tiny_config(tok.vocab_size, qkv_bias=True)
    from jaxllm import init_params

    p = jax.tree_util.tree_map(lambda x: x * 5 if x.ndim > 1 else x, init_params(cfg, jax.random.key(3)))
    for name in ("bq", "bk", "bv"):  # biases that are not zero, so that passing them through is checked
        p["layers"][name] = 0.1 * jax.random.normal(jax.random.key(len(name) + ord(name[1])), p["layers"][name].shape)
    hf_dir = export_hf(root / "hf", p, cfg, tok)
    assert (hf_dir / "tokenizer.json").exists() and not (hf_dir / "tokenizer.model").exists()
    return hf_dir, jax.device_get(p), cfg, tok


def quiet(msg):
    pass


# ---------------------------------------------------------------------------- full fine-tunes


def test_a_full_fine_tune_starts_from_the_checkpoint_and_lowers_held_out_loss(jaxllm_base, cfg, params, tokenizer, texts, tmp_path):
    t = run_cfg(texts, tmp_path, init_from=str(jaxllm_base))
    result = train_loop.run(None, t, tmp_path / "out", progress=False, log=quiet)
    # the first step's loss is the starting weights' loss on its batch (the numpy reference's)
    shards = data.load_splits(tmp_path / "shards")
    batch = data.train_batch(shards["train"].tokens, t.seed, 0, SEQ, t.batch_size)[0]
    lsm = lambda z: z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))  # noqa: E731
    want = np.mean([-lsm(np_forward(params, cfg, row[:-1]))[np.arange(SEQ), row[1:]] for row in batch])
    assert result.losses[1] == pytest.approx(want, rel=1e-4)
    tuned, tuned_cfg, tok = load_checkpoint(tmp_path / "out")
    assert tuned_cfg == cfg and tok.fingerprint == tokenizer.fingerprint
    before, after = held_out_loss(params, cfg, tokenizer, texts[1]), held_out_loss(tuned, cfg, tokenizer, texts[1])
    print(f"full fine-tune from a jaxllm checkpoint: held-out loss {before:.3f} -> {after:.3f}")
    assert after < before - 1.0
    assert json.loads((tmp_path / "out" / "run.json").read_text())["train"]["init_from"] == str(jaxllm_base)


def test_a_full_fine_tune_of_an_hf_directory_with_biases_and_no_bos(qwen_like, texts, tmp_path):
    hf_dir, start, cfg, tok = qwen_like
    t = run_cfg(texts, tmp_path, init_from=str(hf_dir), max_steps=12)
    train_loop.run({"compute_dtype": "float32"}, t, tmp_path / "out", progress=False, log=quiet)
    train = np.asarray(data.load_splits(tmp_path / "shards")["train"].tokens)
    meta = json.loads((tmp_path / "shards" / "meta.json").read_text())
    assert (train == tok.eos_id).sum() == meta["train"]["docs"] and train[-1] == tok.eos_id  # documents end in EOS alone
    tuned, tuned_cfg, _ = load_checkpoint(tmp_path / "out")
    assert tuned_cfg == cfg
    assert not np.allclose(tuned["layers"]["bq"], start["layers"]["bq"])  # a full fine-tune trains the biases too
    before, after = held_out_loss(start, cfg, tok, texts[1]), held_out_loss(tuned, cfg, tok, texts[1])
    print(f"full fine-tune from an HF directory: held-out loss {before:.3f} -> {after:.3f}")
    assert after < before - 1.0


# ---------------------------------------------------------------------------- LoRA through train.py


def cli(*args):
    env = {**os.environ, "JAXLLM_CACHE_DIR": str(REPO / ".jax_cache")}
    return subprocess.run([sys.executable, str(REPO / "train.py"), *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


LORA_FLAGS = ("--lora_rank", RANK, "--max_steps", 24, "--seq_len", SEQ, "--batch_size", 8, "--lr", 1e-2, "--warmup_steps", 3,
              "--weight_decay", 0, "--eval_every", 12, "--save_every", 12, "--eval_batches", 1, "--log_every", 4,
              "--val_fraction", 0.2, "--no_progress")  # fmt: skip


@pytest.fixture(scope="module")
def lora_run(qwen_like, texts, tmp_path_factory):
    """A LoRA fine-tune of the Qwen2-style HF directory, from the command line without --config."""
    out = tmp_path_factory.mktemp("lora") / "run"
    proc = cli("--init_from", qwen_like[0], "--data", texts[0], "--out_dir", out, *LORA_FLAGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"LoRA rank {RANK} on {','.join(TARGETS)}" in proc.stdout
    return out


def test_lora_lowers_held_out_loss_and_changes_the_base_only_by_a_low_rank_product(lora_run, qwen_like, texts):
    _, start, cfg, tok = qwen_like
    merged, merged_cfg, _ = load_checkpoint(lora_run)
    assert merged_cfg == cfg
    before, after = held_out_loss(start, cfg, tok, texts[1]), held_out_loss(merged, cfg, tok, texts[1])
    print(f"LoRA rank {RANK}: held-out loss {before:.3f} -> {after:.3f}")
    assert after < before - 0.5
    a, b = flatten(jax.device_get(merged)), flatten(start)
    assert a.keys() == b.keys()
    for name in a:
        diff = np.asarray(a[name], np.float64) - np.asarray(b[name], np.float64)
        if name.split(".")[-1] in TARGETS:
            for layer in diff:  # [I, O] per layer
                s = np.linalg.svd(layer, compute_uv=False)
                assert s[0] > 1e-3 and (s > 1e-4 * s[0]).sum() <= RANK, (name, s[: RANK + 2])
        else:  # embeddings, norms, lm_head and the q/k/v biases pass through untouched
            assert not diff.any(), name


def test_the_checkpoints_hold_only_the_adapters_and_their_optimizer_state(lora_run, qwen_like):
    import orbax.checkpoint as ocp

    adapters, meta = lora.load_adapters(lora_run)
    assert meta["rank"] == RANK and meta["targets"] == list(TARGETS) and meta["scale"] == 2.0
    assert meta["base_fingerprint"] == lora.fingerprint(qwen_like[1])
    shapes = {tuple(v.shape) for v in flatten(adapters).values()}
    L, D, F = 2, 32, 64
    assert shapes == {(L, D, RANK), (L, RANK, D), (L, RANK, 16), (L, RANK, F), (L, F, RANK)}  # kv width 16
    with ocp.StandardCheckpointer() as ckptr:
        saved = ckptr.restore(lora_run / "state" / "24" / "state")
    params, opt = saved["params"], saved["opt_state"]
    assert flatten(params).keys() == flatten(adapters).keys()
    opt_leaves = jax.tree_util.tree_leaves(opt)
    assert opt_leaves and all(np.ndim(x) == 0 or tuple(np.shape(x)) in shapes for x in opt_leaves)
    assert sum(np.size(x) for x in opt_leaves) < 3 * sum(np.size(x) for x in flatten(adapters).values())
    # no base weights on disk: the whole checkpoint (metadata included) is smaller than the base's
    # weights once, where a full fine-tune's would hold them three times (params, Adam's mu and nu)
    state_bytes = sum(f.stat().st_size for f in (lora_run / "state" / "24").rglob("*") if f.is_file())
    base_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(qwen_like[1]))
    assert state_bytes < base_bytes, (state_bytes, base_bytes)


def test_merged_weights_give_the_logits_of_base_plus_adapters_applied_apart(qwen_like):
    _, start, cfg, _ = qwen_like
    start = jax.tree_util.tree_map(jnp.asarray, start)
    adapters = lora.init_adapters(start, TARGETS, RANK, jax.random.key(1))
    for i, ab in enumerate(adapters["layers"].values()):  # B is zero at init: make the adapters matter
        ab["lora_b"] = 0.3 * jax.random.normal(jax.random.key(100 + i), ab["lora_b"].shape)
    scale = 1.5
    merged = jax.jit(lora.merge, static_argnums=2)(start, adapters, scale)
    eager = lora.merge(start, adapters, scale)
    for x, y in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(eager)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)  # pure: the same under jit
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 24)
    got = np.asarray(forward(merged, cfg, jnp.asarray(tokens)[None], jnp.arange(24)[None])[0][0])
    want = np_forward(start, cfg, tokens, adapters=jax.device_get(adapters), scale=scale)
    assert np.abs(want - np_forward(start, cfg, tokens)).max() > 0.1  # the adapters change the logits
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    # gradients with respect to the adapters are the same under jit too
    loss = lambda ad: training.loss_fn(lora.merge(start, ad, scale), cfg, jnp.asarray(tokens)[None])  # noqa: E731
    for x, y in zip(jax.tree_util.tree_leaves(jax.jit(jax.grad(loss))(adapters)), jax.tree_util.tree_leaves(jax.grad(loss)(adapters))):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_the_merged_export_loads_in_transformers_with_equal_logits(lora_run, tmp_path):
    torch, tf = reference_stack()
    from jaxllm import convert

    assert convert.main(["export", "--checkpoint", str(lora_run), "--out", str(tmp_path / "hf")]) == 0
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    params, cfg, _ = load_checkpoint(lora_run)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(2, 40))
    with torch.inference_mode():
        want = model(torch.from_numpy(ids)).logits.numpy()
    got = np.asarray(forward(params, cfg, jnp.asarray(ids), jnp.broadcast_to(jnp.arange(40), (2, 40)))[0])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_sample_py_reads_the_run_and_the_hf_directory_with_their_tokenizer_json(lora_run, qwen_like):
    """Both directories hold tokenizer.json (no tokenizer.model); sample.py's greedy text equals
    `generate` on the same params with the tokenizer loaded from the original directory."""
    from jaxllm import generate

    env = {**os.environ, "JAXLLM_CACHE_DIR": str(REPO / ".jax_cache")}
    assert (lora_run / "tokenizer.json").exists() and not (lora_run / "tokenizer.model").exists()
    tok = qwen_like[3]
    for directory in (qwen_like[0], lora_run):
        params, cfg, saved = load_checkpoint(directory) if directory == lora_run else (qwen_like[1], qwen_like[2], tok)
        assert saved.fingerprint == tok.fingerprint
        proc = subprocess.run([sys.executable, str(REPO / "sample.py"), "--checkpoint", str(directory), "--prompt", "key 3 holds",
                               "--max_new_tokens", "8", "--temperature", "0"], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        want = generate(params, cfg, ["key 3 holds"], tokenizer=tok, max_new_tokens=8, temperature=0.0).texts[0]
        assert proc.stdout == "key 3 holds" + want + "\n"


def test_resume_continues_from_the_adapters_and_refuses_a_changed_base(lora_run, qwen_like, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(lora_run, copy)
    shutil.rmtree(copy / "state" / "24")  # as if the run had stopped after its step-12 checkpoint
    proc = cli("--out_dir", copy, "--resume", "--no_progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step 12" in proc.stdout
    records = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    key = lambda rs: [(r["step"], round(r["loss"], 5), r.get("val_loss") and round(r["val_loss"], 5)) for r in rs]  # noqa: E731
    assert key(records(copy)) == key(records(lora_run))
    a, b = lora.load_adapters(lora_run)[0], lora.load_adapters(copy)[0]
    for k, v in flatten(a).items():
        np.testing.assert_allclose(flatten(b)[k], v, rtol=1e-5, atol=1e-7)
    # another base under the same path: its fingerprint differs, the adapters do not fit it
    other = tmp_path / "other_base"
    shutil.copytree(qwen_like[0], other)
    changed = jax.tree_util.tree_map(np.copy, qwen_like[1])
    changed["layers"]["wq"][0, 0, 0] += 1.0
    export_hf(other, changed, qwen_like[2], qwen_like[3])
    shutil.rmtree(copy / "state" / "24")
    with pytest.raises(CheckpointError, match="is not the base the adapters"):
        cfg, t = train_loop.read_run(copy)
        train_loop.run(cfg, t.replace(init_from=str(other)), copy, resume=True, progress=False, log=quiet)


# ---------------------------------------------------------------------------- bad input


def train_main(argv, capsys, monkeypatch):
    """train.py's main in this process -> (exit code, stderr)."""
    spec = importlib.util.spec_from_file_location("train_script", REPO / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    try:
        code = script.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def odd_dirs(cfg, params, tokenizer, tmp_path_factory):
    from jaxllm import quantize_params

    root = tmp_path_factory.mktemp("odd")
    save_checkpoint(root / "quantized", quantize_params(params, 8, 64), cfg, tokenizer)
    save_checkpoint(root / "no_tokenizer", params, cfg)
    return root


@pytest.mark.parametrize(
    "args,words",
    [
        (["--config", "configs/tiny.json", "--lora_rank", 4], ["lora_rank needs init_from"]),
        (["--lora_rank", 4], ["--config", "--init_from"]),
        (["--init_from", "BASE", "--lora_rank", 0], ["--lora_rank must be >= 1"]),
        (["--init_from", "BASE", "--lora_rank", -2], ["--lora_rank must be >= 1"]),
        (["--init_from", "BASE", "--lora_rank", 4, "--lora_targets", "wq,w_bogus"], ["lora_targets", "w_bogus"]),
        (["--init_from", "BASE", "--tokenizer", "t.model"], ["tokenizer cannot be combined with init_from"]),
        (["--init_from", "BASE", "--d_model", 64], ["d_model=64 (the model has 32)", "may change only"]),
        (["--init_from", "BASE", "--config", "PRESET"], ["fixes the model config: d_ff=128 (the model has 64)"]),
        (["--init_from", "ODD/missing"], ["init_from", "not found", "missing"]),
        (["--init_from", "ODD/quantized"], ["8-bit quantized", "float checkpoint"]),
        (["--init_from", "ODD/no_tokenizer", "--lora_rank", 2], ["has no tokenizer (tokenizer.model or tokenizer.json)"]),
    ],
)
def test_bad_combinations_exit_2_with_one_line(args, words, jaxllm_base, odd_dirs, texts, tmp_path, capsys, monkeypatch):
    preset = tmp_path / "preset.json"  # a model section that contradicts the model in one field
    preset.write_text(json.dumps({"model": {"d_ff": 128, "compute_dtype": "bfloat16"}, "train": {"max_steps": 5}}))
    args = [str(a).replace("BASE", str(jaxllm_base)).replace("ODD", str(odd_dirs)).replace("PRESET", str(preset)) for a in args]
    monkeypatch.chdir(REPO)
    code, err = train_main(["--out_dir", tmp_path / "out", "--data", texts[0], "--no_progress", *args], capsys, monkeypatch)
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    assert not (tmp_path / "out" / "state").exists()


def test_a_resume_that_changes_the_lora_settings_is_refused(lora_run, tmp_path):
    cfg, t = train_loop.read_run(lora_run)
    with pytest.raises(ConfigError, match=r"lora_rank=8 \(run has 4\)"):
        train_loop.run(cfg, t.replace(lora_rank=8), lora_run, resume=True, progress=False, log=quiet)

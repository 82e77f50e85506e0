"""train.py end to end: tiny preset -> metrics, plot, checkpoints -> sample.py; resume; bad input exits 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from jaxllm import generate, load_checkpoint
from jaxllm.checkpoint import flatten
from conftest import REPO

TINY = REPO / "configs" / "tiny.json"


def run(script, *args):
    env = {**os.environ, "JAXLLM_CACHE_DIR": str(REPO / ".jax_cache")}
    return subprocess.run(
        [sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )


def one_line_error(proc, *words):
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w in proc.stderr, proc.stderr


# matplotlib's first two default line colours: the train and the validation curve
TRAIN_RGB, VAL_RGB = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)


def assert_loss_plot(path):
    """A PNG of a sane size that Pillow decodes, with both curves drawn in it."""
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(data) < 1_000_000, len(data)
    with Image.open(path) as img:
        assert img.format == "PNG" and 300 <= img.width <= 3000 and 200 <= img.height <= 2000, img.size
        rgb = np.asarray(img.convert("RGB")).astype(int)
    for color in (TRAIN_RGB, VAL_RGB):
        assert (np.abs(rgb - color).max(axis=-1) <= 8).sum() > 50, color


def metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short tiny run: 12 steps, checkpoints and evals at 6 and 12."""
    root = tmp_path_factory.mktemp("train_cli")
    out = root / "run"
    proc = run(
        "train.py", "--config", TINY, "--out_dir", out, "--no_progress", "--data_dir", root / "shards",
        "--max_steps=12", "--save_every", 6, "--eval_every", 6, "--log_every", 3,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_a_run_writes_metrics_plot_checkpoints_and_a_model_directory(trained):
    records = metrics(trained)
    assert [r["step"] for r in records] == [3, 6, 9, 12]
    for r in records:
        assert {"step", "loss", "lr", "tokens_per_s"} <= r.keys() and r["tokens_per_s"] > 0
    assert [r["step"] for r in records if "val_loss" in r] == [6, 12]
    assert all(r["val_bpb"] > 0 and abs(r["val_ppl"] - np.exp(r["val_loss"])) < 1e-6 * r["val_ppl"] for r in records if "val_loss" in r)
    assert records[-1]["loss"] < records[0]["loss"]
    assert_loss_plot(trained / "loss.png")
    assert sorted(p.name for p in (trained / "state").iterdir()) == ["12", "6"]
    run_json = json.loads((trained / "run.json").read_text())
    assert run_json["train"]["max_steps"] == 12 and run_json["model"]["d_model"] == 32


def test_sample_py_generates_from_the_run_directory(trained):
    proc = run("sample.py", "--checkpoint", trained, "--prompt", "def ", "--max_new_tokens", 8, "--temperature", 0, "--seed", 0)
    assert proc.returncode == 0, proc.stderr
    params, cfg, tok = load_checkpoint(trained)
    want = generate(params, cfg, ["def "], tokenizer=tok, max_new_tokens=8, temperature=0.0).texts[0]
    assert proc.stdout == "def " + want + "\n"


def test_resume_after_a_save_killed_midway_reproduces_the_run(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    # Orbax writes under a temporary name and renames when complete: a kill mid-save leaves this
    (copy / "state" / "12").rename(copy / "state" / "12.orbax-checkpoint-tmp-1700000000")
    proc = run("train.py", "--out_dir", copy, "--resume", "--no_progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step 6" in proc.stdout
    assert sorted(p.name for p in (copy / "state").iterdir()) == ["12", "6"]  # the partial save is gone
    keys = lambda rs: [(r["step"], r["loss"], r.get("val_loss")) for r in rs]  # noqa: E731
    assert keys(metrics(copy)) == keys(metrics(trained))
    a, b = flatten(load_checkpoint(trained)[0]), flatten(load_checkpoint(copy)[0])
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))


def test_resume_from_a_corrupt_checkpoint_exits_2(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    for sub in (copy / "state" / "12" / "state").iterdir():
        if sub.is_dir():
            shutil.rmtree(sub)  # the array data
    one_line_error(run("train.py", "--out_dir", copy, "--resume", "--no_progress"), "state/12", "corrupt")


def test_sample_py_on_a_run_missing_its_params_exits_2(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    (copy / "params.safetensors").unlink()
    one_line_error(run("sample.py", "--checkpoint", copy, "--prompt", "x"), "params.safetensors is missing")


@pytest.mark.parametrize(
    "args,words",
    [
        (["--config", "configs/nope.json"], ["config file not found", "nope.json"]),
        (["--config", TINY, "--bogus_field", "3"], ["unknown config field --bogus_field"]),
        (["--config", TINY, "--lr=-1"], ["lr must be"]),
        (["--config", TINY, "--max_steps", "many"], ["--max_steps expects int", "many"]),
        (["--config", TINY, "--d_model=30"], ["d_model (30)"]),
        (["--config", TINY, "--batch_size"], ["--batch_size needs a value"]),
        (["--resume"], ["run.json is missing"]),
        (["--config", TINY, "--bo\ngus", "3"], ["unknown config field '--bo\\ngus'"]),  # found by fuzzing
        (["--config", TINY, "--seed", str(2**63)], ["seed must be < 2**63"]),  # was an OverflowError, found by fuzzing
        ([], ["--config"]),
    ],
)
def test_bad_input_exits_2_with_one_line(args, words, tmp_path):
    one_line_error(run("train.py", "--out_dir", tmp_path / "out", "--no_progress", *args), *words)


def test_an_existing_run_is_not_overwritten_without_resume(trained):
    one_line_error(run("train.py", "--config", TINY, "--out_dir", trained, "--no_progress"), "already holds a run", "--resume")


def test_every_preset_loads_and_says_what_it_is_for():
    from jaxllm.config import load_preset

    names = sorted(p.stem for p in (REPO / "configs").glob("*.json"))
    assert {"tiny", "default", "small", "tpu_v5e"} <= set(names)
    for name in names:
        cfg, tcfg, description = load_preset(REPO / "configs" / f"{name}.json")
        assert description.startswith(name + ":") and len(description) > 40
        assert (tcfg.seq_len or cfg.max_seq_len) <= cfg.max_seq_len

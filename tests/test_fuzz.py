"""Fuzzing the command lines and the files they read (issue #16, item 9); the outcome rule is in
tests/fuzzing.py. Constraints are fuzzed in tests/test_fuzz_constraints.py.

sample.py and train.py run in this process (`main(argv)`), so a case costs what its generation
or training costs, not a fresh interpreter; flags that fix compiled shapes (batch size, beams,
windows, logprob alternatives) are drawn from small sets, so most cases reuse programs.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import jax
import pytest
from hypothesis import event, given, strategies as st
from safetensors.numpy import load_file, save_file

from jaxllm import JaxllmError, save_checkpoint
from jaxllm.checkpoint import load_any
from jaxllm.hf import export_hf
from jaxllm.stopping import FINISH_REASONS
from conftest import REPO
from fuzzing import LONG_RUN, check_api_error, check_cli_outcome, fuzz_settings, one_in, partial_files, run_cli, time_bound

sys.path.insert(0, str(REPO))
import sample  # noqa: E402  (the CLI scripts live at the repository root)
import train  # noqa: E402

CLI_BOUND_S = 180  # one in-process CLI call, compiles included (a cold cache on a busy 2-core machine)


@pytest.fixture(scope="module")
def files(cfg, params, tokenizer, tmp_path_factory):
    """A model directory, a one-layer draft, an HF export and the small files flags point at."""
    root = tmp_path_factory.mktemp("fuzz")
    save_checkpoint(root / "ckpt", params, cfg, tokenizer)
    save_checkpoint(root / "draft", {**params, "layers": jax.tree_util.tree_map(lambda x: x[:1], params["layers"])},
                    cfg.replace(n_layers=1), tokenizer)
    export_hf(root / "hf", params, cfg, tokenizer)
    (root / "prompt.txt").write_text("def f(x):\n", encoding="utf-8")
    (root / "latin1.txt").write_bytes(b"caf\xe9")
    (root / "schema.json").write_text(json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}))
    (root / "not_json.json").write_text("{'a': 1")
    (root / "few_shot.jsonl").write_text('{"input": "1+1", "output": "2"}\n')
    (root / "bad_shot.jsonl").write_text('{"input": 1}\n[]\n')
    return root


# ---------------------------------------------------------------------------- sample.py flags


# "", whitespace, line breaks, quotes, multi-byte and control characters (any, and a likelier few)
TEXT = st.text(max_size=6) | st.text(alphabet='ab-= \n\r\t\x00"\'\\é日🎉', max_size=6)
HUGE = st.sampled_from([2**31, 2**32 + 1, 2**63, 2**64, -(2**63) - 1])  # past int32, int64
GARBAGE = st.sampled_from(["", "nan", "inf", "-inf", "1e999", "-1", "x", "0x10", "1,2", " 3", "None", "\x00", "--", "-"]) | TEXT


def number(valid):
    return one_in(8, GARBAGE, valid.map(str))


# flag -> values (as argv text); most are valid, so most cases get past validation and generate.
# Flags that fix a compiled shape take few values: each new shape is a compile.
SAMPLE_FLAGS = {
    "--max_new_tokens": number(st.integers(1, 6) | HUGE),
    "--min_new_tokens": number(st.integers(0, 4)),
    "--temperature": number(st.sampled_from([0, 0.7, 1.0]) | st.floats(0, 1e6)),
    "--top_k": number(st.integers(-2, 600) | HUGE),
    "--top_p": number(st.floats(0, 1)),
    "--min_p": number(st.floats(0, 1)),
    "--repetition_penalty": number(st.floats(1e-3, 1e3)),
    "--presence_penalty": number(st.floats(-1e300, 1e300)),
    "--frequency_penalty": number(st.floats(-1e300, 1e300)),
    "--no_repeat_ngram_size": number(st.integers(0, 4)),
    "--bad_words": TEXT,
    "--logit_bias": st.builds(lambda i, b: f"{i}={b}", st.integers(-3, 600) | HUGE, st.floats(allow_nan=True)) | GARBAGE
    | st.dictionaries(st.integers(0, 600).map(str), st.floats(-100, 100), max_size=3).map(json.dumps),
    "--allowed_token_ids": st.lists(st.integers(-3, 600) | HUGE, min_size=1, max_size=4).map(lambda x: ",".join(map(str, x))) | GARBAGE,
    "--stop": TEXT,
    "--include_stop_str_in_output": st.none(),
    "--eos_token_id": number(st.integers(-3, 600) | HUGE),
    "--stop_on_repetition": number(st.sampled_from([0, 1, 2, 3])),
    "--seed": number(st.integers(-1, 2**32) | HUGE),
    "--n": number(st.sampled_from([1, 2])),
    "--logprobs": number(st.sampled_from([0, 2])) | st.none(),
    "--num_beams": number(st.sampled_from([1, 2])),
    "--length_penalty": number(st.floats(-3, 3)),
    "--early_stopping": st.sampled_from(["true", "false", "never", "maybe"]),
    "--json": st.none(),
    "--regex": st.sampled_from([r"[a-c]{1,3}", r"\d+", "(", "x*y"]),
    "--choice": TEXT,
    "--json_schema": st.sampled_from(["schema.json", "not_json.json", "missing.json", "latin1.txt", "."]),
    "--max_json_depth": number(st.integers(1, 3)),
    "--verify_only": st.none(),
    "--retries": number(st.integers(0, 2)),
    "--window": number(st.sampled_from([0, 16])),
    "--sinks": number(st.sampled_from([0, 4])),
    "--prefill_chunk": number(st.sampled_from([512, 8])),
    "--kv_cache_dtype": st.sampled_from(["int8", "int4"]),
    "--kv_cache": st.sampled_from(["int8"]),  # the old name: refused with the new one
    "--attention_impl": st.sampled_from(["auto", "reference", "xla", "cudnn", "flash3"]),
    "--stream": st.none(),
    "--system": TEXT,
    "--few_shot": st.sampled_from(["few_shot.jsonl", "bad_shot.jsonl", "latin1.txt", "missing.jsonl"]),
    "--chat": st.sampled_from(["auto", "jaxllm", "llama2", "plain", "chatml"]) | st.none(),
    "--format": st.sampled_from(["text", "jsonl", "xml"]),
    "--prompt": TEXT | st.just("word " * 300),  # the long one does not fit the context
    "--prompt_file": st.sampled_from(["prompt.txt", "latin1.txt", "missing.txt", "."]),
    "--checkpoint": st.sampled_from(["ckpt", "hf", "missing", "prompt.txt"]),
    "--draft": st.sampled_from(["draft", "hf", "missing"]),
    "--num_speculative_tokens": number(st.sampled_from([1, 3, 17])),
    "--verbose": st.none(),
    "--bogus": st.none(),
    "--": TEXT,  # an unknown flag "--TEXT", or a positional argument
    "--quantize": st.just("int2"),
    "--group_size": number(st.sampled_from([32, 64, 48])),
}
if LONG_RUN:  # slow ones: a CPU kernel build (int8/int4), every prompt bucket (warmup), interpret-mode kernels
    SAMPLE_FLAGS.update({"--quantize": st.sampled_from(["int8", "int4", "int2"]), "--warmup": st.none(),
                         "--attention_impl": st.sampled_from(["auto", "reference", "xla", "cudnn", "pallas", "flash3"])})
PATHS = {"--json_schema", "--few_shot", "--prompt_file", "--checkpoint", "--draft"}


@st.composite
def sample_argv(draw, root: Path) -> list[str]:
    argv = ["--checkpoint", str(root / "ckpt"), "--max_new_tokens", "3", "--no_compile_cache"]
    for flag in draw(st.lists(st.sampled_from(sorted(SAMPLE_FLAGS)), max_size=5)):
        value = draw(SAMPLE_FLAGS[flag])
        if flag == "--":
            argv += [draw(st.sampled_from(["--", ""])) + value]
            continue
        argv += [flag] if value is None else [flag, str(root / value) if flag in PATHS else value]
    return argv


def last(argv: list[str], flag: str) -> str | None:
    """The flag's value as argparse reads it: the last one given."""
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]
    return values[-1] if values else None


def check_sample_output(argv: list[str], out: str) -> None:
    """jsonl rows are records of at most --max_new_tokens tokens with a known finish reason."""
    if last(argv, "--format") != "jsonl":
        return
    limit = int(last(argv, "--max_new_tokens"))
    for line in out.splitlines():
        row = json.loads(line)
        assert row["finish_reason"] in FINISH_REASONS[1:] and len(row["token_ids"]) <= limit, row


@given(data=st.data())
@fuzz_settings(default=25)
def test_sample_py_flags_end_in_success_or_one_line(files, capsys, data):
    argv = data.draw(sample_argv(files), label="argv")
    with time_bound(CLI_BOUND_S, "sample.py"):
        rc, out, err = run_cli(sample.main, argv, capsys)
    event(f"exit {rc}")
    check_cli_outcome("sample.py", rc, err, argv)
    if rc == 0:
        check_sample_output(argv, out)


# ---------------------------------------------------------------------------- train.py flags


def choice(*values):
    return st.sampled_from([str(v) for v in values])


# field -> values; shapes stay tiny (a large d_model is not an error, only slow)
TRAIN_FIELDS = {
    "d_model": choice(32, 16, 30, 0, -8, "x"), "n_layers": choice(1, 2, 0), "n_heads": choice(4, 2, 3),
    "n_kv_heads": choice(2, 1, 3), "d_ff": choice(64, 32, 0), "max_seq_len": choice(32, 16, 64, 0),
    "vocab_size": choice(512, 600, 100), "head_dim": choice("none", 8, 7, 0), "rope_theta": choice(10000, 0, "nan", "inf"),
    "rope_scaling": choice("none", "linear", "ntk", "llama3", "yarn"), "rope_factor": choice(1, 2, 0.5),
    "position_encoding": choice("rope", "alibi", "nope"), "sliding_window": choice(0, 8, -1),
    "attention_impl": choice("auto", "reference", "xla", "cudnn", "flash3"), "norm_eps": choice(1e-5, 0, "nan"),
    "tie_embeddings": choice("true", "false", "maybe"), "param_dtype": choice("float32", "bfloat16", "int8"),
    "compute_dtype": choice("float32", "bfloat16", "float8"),
    "data": choice("{corpus}", "", "{root}/missing.txt", "{root}/*.nothing", "{root}/latin1.txt"),
    "data_limit_mb": choice(0, 0.01, -1), "val_fraction": choice(0.05, 0, 0.5, 1, "nan"),
    "seq_len": choice(0, 16, 1000), "batch_size": choice(4, 2, 3, 0), "grad_accum": choice(1, 2, 3),
    "max_steps": choice(1, 2, 0), "max_minutes": choice(0, 1e-9, -1), "lr": choice(1e-3, 0, 1, 2, "nan", "1e30"),
    "min_lr_ratio": choice(0.1, 0, 2), "warmup_steps": choice(0, 1, 5), "weight_decay": choice(0.1, 0, 11),
    "beta1": choice(0.9, 1.0, 0), "beta2": choice(0.95, 2), "adam_eps": choice(1e-8, 0), "grad_clip": choice(1, 0, "inf"),
    "seed": choice(0, 1, -1, 2**63, 2**64), "eval_every": choice(0, 1), "eval_batches": choice(1, 2, 1000),
    "log_every": choice(1, 2, 0), "save_every": choice(0, 1), "keep": choice(1, 2, 0), "fsdp": choice(1, 2),
    "tokenizer": choice("{tokenizer}", "{root}/missing.model", "{root}/latin1.txt", ""),
}


@pytest.fixture(scope="module")
def train_files(files, tokenizer, corpus):
    """The fuzz files, plus a tokenizer file and token shards prepared once (cases get a copy)."""
    from jaxllm import data

    tokenizer.save(files / "tok.model")
    data.prepare(str(corpus), files / "shards", tokenizer=tokenizer, val_fraction=0.05)
    return files


TRAIN_BASE = {"max_steps": "2", "batch_size": "4", "eval_batches": "1", "log_every": "1", "max_seq_len": "32"}


@pytest.fixture(scope="module")
def finished_run(train_files, corpus):
    """A finished two-step run, for cases that resume it (or refuse to overwrite it)."""
    out = train_files / "run"
    argv = ["--config", str(REPO / "configs" / "tiny.json"), "--out_dir", str(out), "--no_progress", "--no_compile_cache",
            "--data", str(corpus), "--tokenizer", str(train_files / "tok.model"), "--data_dir", str(train_files / "run_shards")]
    assert train.main(argv + [x for k, v in TRAIN_BASE.items() for x in (f"--{k}", v)]) == 0
    return out


@st.composite
def train_argv(draw, root: Path, corpus: Path, out: Path) -> list[str]:
    config = draw(one_in(6, st.sampled_from([root / "schema.json", root / "missing.json"]), st.just(REPO / "configs" / "tiny.json")))
    argv = ["--config", str(config), "--out_dir", str(out), "--no_progress", "--no_compile_cache"]
    argv += draw(one_in(8, st.sampled_from([["-x"], ["--"], ["--lr"], ["--resume"]]), st.just([])))
    base = {"data": str(corpus), "tokenizer": str(root / "tok.model"), "data_dir": str(out.parent / "shards"), **TRAIN_BASE}
    argv += [x for k, v in base.items() for x in (f"--{k}", v)]
    for field in draw(st.lists(st.sampled_from(sorted(TRAIN_FIELDS)), max_size=3)):
        value = draw(TRAIN_FIELDS[field]).format(root=root, corpus=corpus, tokenizer=root / "tok.model")
        argv += draw(st.sampled_from([[f"--{field}={value}"], [f"--{field}", value]]))
    return argv


@given(data=st.data())
@fuzz_settings(default=10)
def test_train_py_flags_end_in_success_or_one_line_and_leave_no_partial_files(train_files, finished_run, corpus, capsys, data):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        shutil.copytree(train_files / "shards", Path(tmp) / "shards")
        argv = data.draw(train_argv(train_files, corpus, out), label="argv")
        if data.draw(one_in(5, st.just(True), st.just(False)), label="a damaged preset"):
            preset = REPO / "configs" / "tiny.json"
            shutil.copy(preset, Path(tmp) / "preset.json")
            apply_damage(Path(tmp) / "preset.json", data.draw(damage("preset.json", preset.read_bytes()), label="damage"))
            argv[1] = str(Path(tmp) / "preset.json")
        if data.draw(one_in(4, st.just(True), st.just(False)), label="over a finished run"):  # resume it, or be refused
            shutil.copytree(finished_run, out)
            argv += data.draw(st.sampled_from([["--resume"], []]), label="resume")
            if data.draw(one_in(3, st.just(True), st.just(False)), label="its run.json damaged"):
                apply_damage(out / "run.json", data.draw(damage("run.json", (out / "run.json").read_bytes()), label="damage"))
        with time_bound(CLI_BOUND_S, "train.py"):
            rc, out_text, err = run_cli(train.main, argv, capsys)
        event(f"exit {rc}")
        check_cli_outcome("train.py", rc, err, argv, also_allowed=(1,))
        assert not partial_files(Path(tmp)), (argv, partial_files(Path(tmp)))
        if rc == 0:  # a finished run is a model directory sample.py can load
            params, cfg, tok, _ = load_any(out)
            assert tok is not None and cfg.vocab_size >= tok.vocab_size
            assert all(math.isfinite(json.loads(line)["loss"]) for line in (out / "metrics.jsonl").read_text().splitlines())


# ---------------------------------------------------------------------------- damaged files

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def near(value):
    """Values a real file might hold instead of `value`: off by a little, a different type, or anything."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return JSON
    return st.sampled_from([0, -1, 1, value + 1, value * 2, 10**12, str(value), float(value), True]) | JSON


@st.composite
def json_damage(draw, text: str):
    """A JSON document with one field changed (or dropped), or replaced whole."""
    doc = json.loads(text)
    how = draw(st.sampled_from(["field", "field", "section field", "section field", "drop", "whole"]))
    if how == "whole" or not isinstance(doc, dict):
        return draw(JSON)
    sections = sorted(k for k, v in doc.items() if isinstance(v, dict))  # "model", "train"
    target = doc[draw(st.sampled_from(sections))] if how == "section field" and sections else doc
    key = draw(st.sampled_from(sorted(target)) | st.text(max_size=6)) if target else "x"
    if how == "drop":
        target.pop(key, None)
    else:
        target[key] = draw(near(target.get(key)))
    return doc


@st.composite
def header_damage(draw, data: bytes):
    """A safetensors JSON header with one tensor's dtype, shape or offsets changed."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    name = draw(st.sampled_from(sorted(header)))
    if name == "__metadata__":
        return name, None, draw(JSON)
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
    value = draw(st.sampled_from(["F16", "BF16", "I64", "BOOL", "U8", "F8_E4M3", "XX"]) if field == "dtype"
                 else st.lists(st.integers(-2, 2**40), max_size=3))
    return name, field, value


@st.composite
def damage(draw, name: str, data: bytes) -> tuple:
    """How to damage a file (small, so a failure report stays readable): ("random", bytes),
    ("cut", n), ("overwrite", [(offset, byte)]), ("delete",), ("json", doc), ("header", ...)."""
    kinds = ["random", "cut", "overwrite", "delete"]
    kinds += ["json"] * 3 if name.endswith(".json") else ["header"] * 3 if name.endswith(".safetensors") else []
    kind = draw(st.sampled_from(kinds))
    if kind == "random":
        return kind, draw(st.binary(max_size=300))
    if kind == "cut":
        return kind, draw(st.integers(0, len(data) - 1))
    if kind == "overwrite":
        return kind, draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), min_size=1, max_size=4))
    if kind == "json":
        return kind, draw(json_damage(data.decode()))
    return (kind, *draw(header_damage(data))) if kind == "header" else (kind,)


def apply_damage(path: Path, how: tuple) -> None:
    data, kind = path.read_bytes(), how[0]
    if kind == "delete":
        path.unlink()
        return
    if kind == "cut":
        data = data[: how[1]]
    elif kind == "overwrite":
        data = bytearray(data)
        for offset, byte in how[1]:
            data[offset] = byte
    elif kind == "json":
        data = json.dumps(how[1]).encode()
    elif kind == "header":
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        _, name, field, value = how
        if field is None:
            header[name] = value
        else:
            header[name][field] = value
        text = json.dumps(header).encode()
        data = len(text).to_bytes(8, "little") + text + data[8 + n :]
    else:
        data = how[1]
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def model_dirs(files):
    """A jaxllm checkpoint, an HF export, and the export split into two shards with an index."""
    sharded = files / "hf_sharded"
    shutil.copytree(files / "hf", sharded)
    tensors = load_file(sharded / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, sharded / shard, metadata={"format": "pt"})
    (sharded / "model.safetensors").unlink()
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return {"jaxllm": files / "ckpt", "hf": files / "hf", "hf_sharded": sharded}


@given(data=st.data())
@fuzz_settings(default=60)
def test_damaged_model_files_load_or_fail_with_one_line(model_dirs, capsys, data):
    kind = data.draw(st.sampled_from(sorted(model_dirs)), label="directory")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / kind
        shutil.copytree(model_dirs[kind], directory)
        name = data.draw(st.sampled_from(sorted(p.name for p in directory.iterdir())), label="file")
        apply_damage(directory / name, data.draw(damage(name, (directory / name).read_bytes()), label="damage"))
        with time_bound(CLI_BOUND_S, f"loading {kind} with a damaged {name}"):
            try:
                load_any(directory)
                event(f"{kind}: loads")
            except JaxllmError as e:
                check_api_error(e)
                event(f"{kind}: refused")
            argv = ["--checkpoint", str(directory), "--prompt", "x", "--max_new_tokens", "2", "--no_compile_cache"]
            rc, out, err = run_cli(sample.main, argv, capsys)
        check_cli_outcome("sample.py", rc, err, argv)

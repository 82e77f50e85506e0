"""sample.py end to end on a checkpoint made here; bad input exits 2 with one line naming the flag."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys

import jax
import pytest

from jaxllm import generate, init_params, save_checkpoint
from jaxllm.chat import build_prompt
from jaxllm.warmup import warmup_lengths
from conftest import REPO, tiny_config
from fuzzing import run_cli


@pytest.fixture(scope="module")
def checkpoint(cfg, params, tokenizer, tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("cli") / "ckpt", params, cfg, tokenizer)


def run(*args, cache_dir=None):
    env = {**os.environ, "JAXLLM_CACHE_DIR": str(cache_dir or REPO / ".jax_cache")}
    return subprocess.run([sys.executable, str(REPO / "sample.py"), *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


def run_here(capsys, *args):
    """sample.py's `main` in this process (no interpreter or JAX start-up: for refusals, which
    happen before anything runs) -> (exit code, stdout, stderr)."""
    sys.path.insert(0, str(REPO))
    import sample

    return run_cli(sample.main, [*map(str, args), "--no_compile_cache"], capsys)


def test_prints_the_same_completion_as_the_library(checkpoint, cfg, params, tokenizer):
    proc = run("--checkpoint", checkpoint, "--prompt", "def f(x):", "--prompt", "for i", "--max_new_tokens", 8, "--temperature", 0, "--seed", 0)
    assert proc.returncode == 0, proc.stderr
    want = generate(params, cfg, ["def f(x):", "for i"], tokenizer=tokenizer, max_new_tokens=8, temperature=0.0).texts
    assert proc.stdout == "def f(x):" + want[0] + "\n\n" + "-" * 40 + "\nfor i" + want[1] + "\n"


def test_jsonl_with_sampling_flags_matches_the_library(checkpoint, cfg, params, tokenizer, tmp_path):
    (tmp_path / "p.txt").write_text("class Foo:\n")
    flags = dict(max_new_tokens=10, temperature=0.9, top_k=20, top_p=0.9, min_p=0.01, repetition_penalty=1.2,
                 presence_penalty=0.1, frequency_penalty=0.1, no_repeat_ngram_size=3, seed=4)
    args = [x for k, v in flags.items() for x in (f"--{k}", v)]
    proc = run("--checkpoint", checkpoint, "--prompt_file", tmp_path / "p.txt", "--format", "jsonl", "--n", 2, "--logprobs", 2, *args)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    want = generate(params, cfg, ["class Foo:\n"], tokenizer=tokenizer, num_return_sequences=2, logprobs=2, **flags)
    assert [r["token_ids"] for r in rows] == want.token_ids and [r["text"] for r in rows] == want.texts
    assert [r["index"] for r in rows] == [0, 1]
    for r in rows:
        assert r["prompt"] == "class Foo:\n" and r["num_generated_tokens"] == len(r["token_ids"]) == len(r["logprobs"])
        assert r["finish_reason"] in ("eos", "length") and set(r["timing"]) == {"compile_s", "prefill_s", "decode_s", "decode_tokens_per_s"}
        assert all(len(alt) == 2 for alt in r["top_logprobs"])


def test_llama_style_output_prints_with_its_space_after_the_prompt(llama_tokenizer, tmp_path):
    tok = llama_tokenizer
    cfg = tiny_config(tok.vocab_size)
    params = jax.tree_util.tree_map(lambda x: x * 5 if x.ndim > 1 else x, init_params(cfg, jax.random.key(1)))
    checkpoint = save_checkpoint(tmp_path / "llama", params, cfg, tok)
    words = [i for i in range(tok.vocab_size) if tok.sp.id_to_piece(i).startswith("\u2581") and len(tok.sp.id_to_piece(i)) > 1]
    prompt = "this is one of"
    ids = generate(params, cfg, [prompt], tokenizer=tok, max_new_tokens=6, temperature=0.0, allowed_token_ids=words).token_ids[0]
    whole = tok.sp.decode(tok.encode(prompt, add_bos=True) + ids)  # SentencePiece's reading of the whole sequence
    assert whole.startswith(prompt + " ")
    for stream in ([], ["--stream"]):
        proc = run("--checkpoint", checkpoint, "--prompt", prompt, "--max_new_tokens", 6, "--temperature", 0,
                   "--allowed_token_ids", ",".join(map(str, words)), *stream)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == whole + "\n", stream


def test_chat_and_stream(checkpoint, cfg, params, tokenizer):
    proc = run("--checkpoint", checkpoint, "--system", "Be brief.", "--prompt", "hi", "--stream", "--max_new_tokens", 12, "--temperature", 0)
    assert proc.returncode == 0, proc.stderr
    ids = build_prompt(tokenizer, "hi", system="Be brief.")
    eos = [tokenizer.eos_id, tokenizer.special_tokens["<|end|>"]]
    want = generate(params, cfg, [ids], tokenizer=tokenizer, max_new_tokens=12, temperature=0.0, eos_token_id=eos).texts[0]
    assert proc.stdout == "hi" + want + "\n"


def test_beam_search_flags(checkpoint, cfg, params, tokenizer):
    from jaxllm.beam import beam_generate

    proc = run("--checkpoint", checkpoint, "--prompt", "def f(x):", "--num_beams", 3, "--num_return_sequences", 2,
               "--length_penalty", 0.5, "--early_stopping", "never", "--max_new_tokens", 8, "--format", "jsonl",
               "--window", 8, "--kv_cache_dtype", "int8")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    want = beam_generate(params, cfg, ["def f(x):"], tokenizer=tokenizer, num_beams=3, num_return_sequences=2,
                         length_penalty=0.5, early_stopping="never", max_new_tokens=8, window=8, kv_cache_dtype="int8")
    assert [r["token_ids"] for r in rows] == want.token_ids
    assert [r["score"] for r in rows] == pytest.approx(want.scores) and rows[0]["score"] >= rows[1]["score"]


@pytest.fixture(scope="module")
def draft_checkpoint(cfg, params, tokenizer, tmp_path_factory):
    draft = jax.tree_util.tree_map(lambda x: x[:1], params["layers"])
    return save_checkpoint(tmp_path_factory.mktemp("cli") / "draft", {**params, "layers": draft}, cfg.replace(n_layers=1), tokenizer)


@pytest.mark.parametrize("stream", [False, True])
def test_speculative_flags(checkpoint, draft_checkpoint, cfg, params, tokenizer, stream):
    proc = run("--checkpoint", checkpoint, "--draft", draft_checkpoint, "--num_speculative_tokens", 3,
               "--prompt", "def f(x):", "--max_new_tokens", 10, "--temperature", 0, *(["--stream"] if stream else []))
    assert proc.returncode == 0, proc.stderr
    want = generate(params, cfg, ["def f(x):"], tokenizer=tokenizer, max_new_tokens=10, temperature=0.0).texts[0]
    assert proc.stdout == "def f(x):" + want + "\n" and ("accepted" in proc.stderr) != stream


def test_speculative_takes_n_logprobs_and_the_cache_flags(checkpoint, draft_checkpoint, cfg, params, tokenizer):
    proc = run("--checkpoint", checkpoint, "--draft", draft_checkpoint, "--num_speculative_tokens", 3,
               "--prompt", "def f(x):", "--max_new_tokens", 10, "--temperature", 0, "--n", 2, "--logprobs", 1,
               "--window", 8, "--sinks", 2, "--kv_cache_dtype", "int8", "--format", "jsonl")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    want = generate(params, cfg, ["def f(x):"], tokenizer=tokenizer, max_new_tokens=10, temperature=0.0,
                    num_return_sequences=2, logprobs=1, window=8, sinks=2, kv_cache_dtype="int8")
    assert [r["token_ids"] for r in rows] == want.token_ids
    assert [r["logprobs"] for r in rows] == [pytest.approx(lp, abs=1e-4) for lp in want.logprobs]


def test_the_draft_gets_quantize_and_attention_impl_too(draft_checkpoint, tokenizer):
    sys.path.insert(0, str(REPO))
    import sample
    from jaxllm.quantize import QuantizedWeight

    for quantize, impl in ((None, None), ("int8", "xla")):
        flags = ["--quantize", quantize] * bool(quantize) + ["--attention_impl", impl] * bool(impl)
        dparams, dcfg, _, _ = sample.load_model(draft_checkpoint, sample.parse_args(["--draft", str(draft_checkpoint), *flags]), "draft")
        quantized = [leaf for leaf in jax.tree_util.tree_leaves(dparams, is_leaf=lambda x: isinstance(x, QuantizedWeight))
                     if isinstance(leaf, QuantizedWeight)]
        assert bool(quantized) == bool(quantize) and all(w.bits == 8 for w in quantized)
        assert dcfg.attention_impl == (impl or "auto")


@pytest.mark.parametrize(
    "args,named",
    [
        (["--temperature", "-1"], "--temperature"),
        (["--temperature", "nan"], "--temperature"),
        (["--max_new_tokens", "0"], "--max_new_tokens"),
        (["--seed", "-3"], "--seed"),
        (["--max_new_tokens", "many"], "--max_new_tokens"),
        (["--top_p", "1.5"], "--top_p"),
        (["--top_p", "0"], "--top_p"),
        (["--min_p", "2"], "--min_p"),
        (["--repetition_penalty", "0"], "--repetition_penalty"),
        (["--no_repeat_ngram_size", "99"], "--no_repeat_ngram_size"),
        (["--logit_bias", "abc"], "--logit_bias"),
        (["--logprobs", "50"], "--logprobs"),
        (["--prompt_file", "/nonexistent/p.txt"], "--prompt_file"),
        (["--stream", "--prompt", "y"], "--stream"),
        (["--chat", "chatml"], "--chat"),
        (["--num_beams", "2", "--temperature", "0.5"], "--temperature"),
        (["--num_beams", "2", "--num_return_sequences", "3"], "--num_return_sequences"),
        (["--num_beams", "0"], "--num_beams"),
        (["--early_stopping", "maybe"], "--early_stopping"),
        (["--num_speculative_tokens", "0"], "--num_speculative_tokens"),
        (["--draft", "d", "--num_beams", "2"], "--draft"),
        (["--draft_checkpoint", "d"], "renamed --draft"),
        (["--bogus"], "--bogus"),
        (["--window", "8", "--sinks", "8"], "--sinks"),
        (["--sinks", "4"], "--sinks"),
        (["--window", "-4"], "--window"),
        (["--prefill_chunk", "-1"], "--prefill_chunk"),
        (["--attention_impl", "flash3"], "--attention_impl"),
        (["--kv_cache_dtype", "int4"], "--kv_cache_dtype"),
        (["--kv_cache", "int8"], "renamed --kv_cache_dtype"),
        (["--quantize", "int9"], "--quantize"),
        (["--quantize", "int4", "--group_size", "48"], "--group_size"),
        (["--warmup", "--num_beams", "2"], "--warmup"),
        (["--bo\ngus"], "--bo\\ngus"),  # a line break the user typed is shown escaped (found by fuzzing)
    ],
)
def test_bad_flags_exit_2_with_one_line(checkpoint, args, named, capsys):
    rc, out, err = run_here(capsys, "--checkpoint", checkpoint, "--prompt", "x", *args)
    assert rc == 2
    assert err.count("\n") == 1 and named in err and "Traceback" not in err
    assert out == ""


@pytest.mark.parametrize("args,named", [(["--temperature", "-1"], "--temperature"), (["--bogus"], "--bogus")])
def test_bad_flags_end_the_process_with_exit_2_and_one_line(checkpoint, args, named):
    """The same refusal as a real process sees it (the cases above run `main` in this process)."""
    proc = run("--checkpoint", checkpoint, "--prompt", "x", *args)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and named in proc.stderr and "Traceback" not in proc.stderr


def test_missing_checkpoint_and_too_long_prompt_exit_2(checkpoint, tmp_path):
    proc = run("--checkpoint", tmp_path / "nowhere", "--prompt", "x")
    assert proc.returncode == 2 and "not found" in proc.stderr and proc.stderr.count("\n") == 1
    proc = run("--checkpoint", checkpoint, "--prompt", "word " * 200, "--max_new_tokens", 8)
    assert proc.returncode == 2 and "context" in proc.stderr and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr


def test_without_a_checkpoint_the_bundled_model_is_used():
    import jaxllm

    bundled = REPO / "jaxllm" / "assets" / "default"
    proc = run("--prompt", "def fibonacci(n):", "--max_new_tokens", 12, "--temperature", 0)
    assert proc.returncode == 0, proc.stderr
    params, cfg, tok = jaxllm.load_checkpoint(bundled)
    want = generate(params, cfg, ["def fibonacci(n):"], tokenizer=tok, max_new_tokens=12, temperature=0.0).texts[0]
    assert proc.stdout == "def fibonacci(n):" + want + "\n" and want.strip()


def test_constrained_output_flags_match_the_library_and_report_validity(checkpoint, cfg, params, tokenizer, tmp_path):
    from jaxllm.structured import constraints as C

    schema = {"type": "object", "properties": {"id": {"type": "integer"}, "tag": {"enum": ["a", "b"]}}, "required": ["id", "tag"]}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    common = ["--checkpoint", checkpoint, "--prompt", "x", "--max_new_tokens", 24, "--temperature", 1.0, "--seed", 3, "--format", "jsonl"]
    cases = [(["--json"], C.Json()), (["--json_schema", tmp_path / "s.json"], C.JsonSchema(schema)),
             (["--choice", "yes", "--choice", "no"], C.Choice(["yes", "no"])), (["--regex", "[0-9]{2}-[a-z]+"], C.Regex("[0-9]{2}-[a-z]+"))]
    for flags, spec in cases:
        proc = run(*common, *flags, "--n", 2)
        assert proc.returncode == 0, proc.stderr
        rows = [json.loads(line) for line in proc.stdout.splitlines()]
        want = generate(params, cfg, ["x"], tokenizer=tokenizer, max_new_tokens=24, temperature=1.0, seed=3,
                        num_return_sequences=2, constraint=spec)
        assert [r["text"] for r in rows] == want.texts and [r["valid"] for r in rows] == [True, True]
        assert all(C.verify(spec, r["text"]) is None for r in rows)


@pytest.mark.parametrize("flags, needle", [
    (["--regex", "a(b"], "--regex"),
    (["--json", "--regex", "x"], "choose one constraint"),
    (["--json_schema", "/no/such/schema.json"], "--json_schema"),
    (["--retries", "2"], "needs a constraint"),
    (["--json", "--max_json_depth", "0"], "--max_json_depth"),
])
def test_bad_constraint_flags_exit_2_with_one_line(checkpoint, flags, needle, capsys):
    rc, _, err = run_here(capsys, "--checkpoint", checkpoint, "--prompt", "x", *flags)
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("text, why", [('{"type": 5}', "invalid JSON Schema"), ("not json", "not valid JSON")])
def test_a_bad_json_schema_file_is_named_in_its_error(checkpoint, tmp_path, text, why, capsys):
    schema = tmp_path / "user.json"
    schema.write_text(text)
    rc, _, err = run_here(capsys, "--checkpoint", checkpoint, "--prompt", "x", "--json_schema", schema)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"sample.py: error: --json_schema {schema}: ") and why in err, err


def test_window_and_sinks_flags_match_the_library_past_the_context(checkpoint, cfg, params, tokenizer):
    n = cfg.max_seq_len + 40  # without the window this prompt + n would not fit
    proc = run("--checkpoint", checkpoint, "--prompt", "def f(x):", "--max_new_tokens", n, "--temperature", 0,
               "--window", 32, "--sinks", 4, "--attention_impl", "xla", "--format", "jsonl", "--eos_token_id", 511)
    assert proc.returncode == 0, proc.stderr
    want = generate(params, cfg.replace(attention_impl="xla"), ["def f(x):"], tokenizer=tokenizer, max_new_tokens=n,
                    temperature=0.0, window=32, sinks=4, eos_token_id=[511])
    assert json.loads(proc.stdout)["token_ids"] == want.token_ids[0]


def test_quantize_flag_matches_the_library(checkpoint, cfg, params, tokenizer):
    from jaxllm.quantize import quantize_params

    proc = run("--checkpoint", checkpoint, "--quantize", "int4", "--group_size", 32, "--prompt", "def f(x):",
               "--max_new_tokens", 8, "--temperature", 0, "--format", "jsonl")
    assert proc.returncode == 0, proc.stderr
    want = generate(quantize_params(params, 4, 32), cfg, ["def f(x):"], tokenizer=tokenizer, max_new_tokens=8, temperature=0.0)
    assert json.loads(proc.stdout)["token_ids"] == want.token_ids[0]


def _verbose_counts(stderr: str) -> tuple[int, int, int]:
    line = [x for x in stderr.splitlines() if "programs compiled or loaded" in x][-1]
    total, hits, new = (int(w) for w in re.findall(r"(\d+) (?:programs|of them|new)", line))
    return total, hits, new


def test_a_second_process_compiles_nothing_new_thanks_to_the_persistent_cache(checkpoint, tmp_path):
    args = ("--checkpoint", checkpoint, "--quantize", "int8", "--prompt", "for i", "--max_new_tokens", 4, "--temperature", 0, "--verbose")
    first = run(*args, cache_dir=tmp_path / "xla")
    assert first.returncode == 0, first.stderr
    total, hits, new = _verbose_counts(first.stderr)
    assert new > 0 and hits == 0 and any((tmp_path / "xla").iterdir())
    assert stat.S_IMODE((tmp_path / "xla").stat().st_mode) == 0o700  # created for this user alone
    from jaxllm import native  # --verbose describes the layout and which matmul runs, and why

    line = [x for x in first.stderr.splitlines() if f"sample.py: decoding on {jax.default_backend()}: " in x]
    assert len(line) == 1, first.stderr
    if jax.default_backend() == "cpu":
        kind = "jaxllm's CPU kernel" if native.available() else f"kernel not used: {native.status()}"
        assert "int8 weights: " in line[0] and kind in line[0], line
    second = run(*args, cache_dir=tmp_path / "xla")
    assert second.returncode == 0 and second.stdout == first.stdout
    assert _verbose_counts(second.stderr) == (total, total, 0)  # every program came from the disk cache


def test_a_compile_cache_directory_others_can_write_is_not_used(checkpoint, cfg, params, tokenizer, tmp_path):
    # XLA loads machine code from its cache: sample.py says why in one line and compiles afresh.
    shared = tmp_path / "xla"
    shared.mkdir()
    shared.chmod(0o777)
    proc = run("--checkpoint", checkpoint, "--prompt", "def f(x):", "--max_new_tokens", 4, "--temperature", 0,
               "--verbose", cache_dir=shared)
    assert proc.returncode == 0, proc.stderr
    warnings = [x for x in proc.stderr.splitlines() if "warning" in x]
    assert len(warnings) == 1 and warnings[0].startswith(f"sample.py: warning: the cache directory {shared} "), proc.stderr
    assert "writable by other users (mode 0o777)" in warnings[0] and "without the persistent compilation cache" in warnings[0]
    total, hits, new = _verbose_counts(proc.stderr)
    assert hits == 0 and new == total > 0 and not any(shared.iterdir())  # nothing read from it or written to it
    want = generate(params, cfg, ["def f(x):"], tokenizer=tokenizer, max_new_tokens=4, temperature=0.0).texts
    assert proc.stdout == "def f(x):" + want[0] + "\n"


def test_warmup_compiles_every_prompt_bucket_ahead(checkpoint, cfg):
    proc = run("--checkpoint", checkpoint, "--warmup", "--verbose", "--prompt", "word " * 12, "--max_new_tokens", 8,
               "--format", "jsonl")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["timing"]["compile_s"] == 0  # the real call found its programs compiled
    warm = [x for x in proc.stderr.splitlines() if "warmup" in x][0]
    assert "sample.py: decoding on " in proc.stderr  # the layout line comes for float models too
    assert f"{len(warmup_lengths(cfg.max_seq_len, 8))} prompt buckets" in warm


def test_the_pallas_kernels_run_from_the_command_line_and_verbose_says_so(checkpoint):
    """On a CPU `--attention_impl pallas` runs the TPU kernels in interpret mode: the same text as the einsum."""
    args = ("--checkpoint", checkpoint, "--prompt", "def f(x):", "--max_new_tokens", 6, "--temperature", 0, "--verbose")
    pallas, einsum = run(*args, "--attention_impl", "pallas"), run(*args, "--attention_impl", "reference")
    assert pallas.returncode == 0 and einsum.returncode == 0, pallas.stderr + einsum.stderr
    assert pallas.stdout == einsum.stdout
    assert "attention (pallas): blocks of queries take the Pallas flash kernels in interpret mode" in pallas.stderr
    assert "attention (reference): blocks of queries take the einsum" in einsum.stderr

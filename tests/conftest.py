"""Shared fixtures: one tiny tokenizer, one tiny model config, compiled once per session.

Compile time dominates the suite on CPU, so every test uses the same few shapes and the
persistent compilation cache keeps programs between runs.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

# The suite compiles hundreds of small programs and runs each for milliseconds, so it asks
# XLA:CPU to compile fast rather than optimize: no LLVM optimization, and the loop emitters
# instead of the fusion emitters. One speculative-decoding test's XLA compilation: 17.4 s with
# the defaults, 4.3 s with these. Set before JAX starts its backend (it reads XLA_FLAGS once);
# JAXLLM_TEST_XLA_FLAGS="" runs the suite with XLA's defaults, as users run.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false"
_ours = os.environ.get("JAXLLM_TEST_XLA_FLAGS", FAST_COMPILE)
if _ours not in os.environ.get("XLA_FLAGS", ""):  # xdist workers inherit the controller's
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), _ours]))

import jax  # after XLA_FLAGS is set
import pytest
import sentencepiece as spm

from jaxllm import ModelConfig, Tokenizer, compilation, init_params
from jaxllm.compilation import enable_persistent_cache

REPO = Path(__file__).resolve().parent.parent
enable_persistent_cache(os.environ.get("JAXLLM_TEST_CACHE", REPO / ".jax_cache"))
os.environ.setdefault("JAXLLM_CONSTRAINT_CACHE", str(REPO / ".jax_cache" / "constraints"))

WORDS = "the of and to in is was for on that with as by at from it an be this which or are".split()
CODE = [
    "def {f}(x, y):\n    return x {op} y\n",
    "for i in range({n}):\n\tprint(i, '{w}')\n",
    "class {F}:\n    def __init__(self):\n        self.{w} = {n}\n",
    "if {w} == {n}:  # check\n    {f}({w})\n",
]
MULTILINGUAL = ["こんにちは世界", "日本語のテキストです。", "Grüße aus Köln", "Привет, мир", "emoji 🎉 ok", "数字 12345"]


def make_corpus(path: Path, seed: int = 0, lines: int = 3000) -> Path:
    """A deterministic mix of prose, code and a little multilingual text."""
    rng = random.Random(seed)
    parts = []
    for _ in range(lines):
        kind = rng.random()
        if kind < 0.5:
            parts.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) + ".\n")
        elif kind < 0.9:
            parts.append(
                rng.choice(CODE).format(
                    f=rng.choice(["add", "mul", "f", "go"]),
                    F=rng.choice(["Foo", "Bar"]),
                    op=rng.choice("+-*/"),
                    n=rng.randint(0, 999),
                    w=rng.choice(WORDS),
                )
            )
        else:
            parts.append(rng.choice(MULTILINGUAL) + "\n")
    path.write_text("".join(parts), encoding="utf-8")
    return path


def memory_mappings() -> int:
    """This process's memory mappings (Linux), 0 where /proc is not there."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def _max_mappings() -> int:
    try:
        return int(Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        return 65530


# An xdist worker runs hundreds of tests, each compiling programs of its own shapes. Every program
# a process holds keeps ~9 mappings, and past vm.max_map_count XLA cannot load the next one (a
# worker crashed in the unwinder). Dropping the programs at half the limit costs a few reloads.
MAPPINGS_BEFORE_CLEAR = _max_mappings() // 2


@pytest.fixture(autouse=True)
def _let_go_of_programs_past_half_the_mapping_limit():
    yield
    if memory_mappings() > MAPPINGS_BEFORE_CLEAR:
        compilation.clear()


REQUIRE_REFERENCE = "JAXLLM_REQUIRE_REFERENCE"


def reference_stack(allow_module_level: bool = False):
    """-> (torch, transformers): the oracle of the parity tests (model, beam search, processors).

    Without them those tests skip, except with JAXLLM_REQUIRE_REFERENCE=1 (set by .ci/run), where
    they fail: a broken install of the reference stack must not leave CI green without its checks.
    """
    try:
        import torch
        import transformers
    except ImportError as e:  # an install that fails half-way can leave either one unimportable
        if os.environ.get(REQUIRE_REFERENCE) == "1":
            pytest.fail(f"{REQUIRE_REFERENCE}=1 but the reference stack does not import: {e}", pytrace=False)
        pytest.skip(f"torch/transformers not installed ({e}): parity with transformers not checked",
                    allow_module_level=allow_module_level)
    return torch, transformers


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


@pytest.fixture(scope="session")
def tokenizer(corpus, tmp_path_factory) -> Tokenizer:
    return Tokenizer.train([corpus], tmp_path_factory.mktemp("tok") / "tok", vocab_size=512, model_type="bpe")


@pytest.fixture(scope="session")
def llama_tokenizer(corpus, tmp_path_factory) -> Tokenizer:
    """A tokenizer with Llama/Mistral's settings: every text starts with a dummy "▁" (a space),
    which decoding drops again at the start of a text."""
    prefix = tmp_path_factory.mktemp("llama_tok") / "llama"
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=400, model_type="bpe", byte_fallback=True,
        add_dummy_prefix=True, normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2,
    )
    return Tokenizer.load(f"{prefix}.model")


def tiny_config(vocab_size: int, **overrides) -> ModelConfig:
    values = dict(vocab_size=vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=128)
    return ModelConfig(**{**values, **overrides})


@pytest.fixture(scope="session")
def cfg(tokenizer) -> ModelConfig:
    return tiny_config(tokenizer.vocab_size)


@pytest.fixture(scope="session")
def params(cfg):
    # A larger init scale than training's 0.02 so logits are far from uniform and
    # greedy choices are not decided by rounding.
    p = init_params(cfg, jax.random.key(0))
    return jax.tree_util.tree_map(lambda x: x * 5 if x.ndim > 1 else x, p)

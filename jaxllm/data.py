"""Corpus -> token shards on disk -> deterministic, resumable batches.

Legend: B batch (sequences), T tokens per training window, N tokens in a split.

    files ──read_documents──▶ documents ──split_documents──▶ train / val documents
          ──Tokenizer (trained on the train documents when none is given)──▶ <s> ids </s> each
            (ids </s> with a tokenizer that has no <s>, such as Qwen2's)
          ──▶ DIR/train.bin, DIR/val.bin  (flat uint16/uint32 memmaps)  +  DIR/meta.json

A batch is a pure function of (seed, step): a resumed run draws exactly the windows an
uninterrupted one would, and in a multi-host run every host computes the same global
batch and keeps only its own rows, so no host ever needs another's data position.

The built-in corpus ("stdlib") is the Python standard library's own source, which every
machine with Python has, so training works offline.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
import sysconfig
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from jaxllm.errors import DataError
from jaxllm.tokenizer import Tokenizer

STDLIB = "stdlib"
META_FILE = "meta.json"
SPLITS = ("train", "val")
FORMAT_VERSION = 1
# Files are cut into documents of at most this many bytes (at line ends) so that a
# held-out split by documents can hit its share of bytes closely even for one big file.
MAX_DOC_BYTES = 32 * 1024
# The val split does not depend on the training seed, so val numbers stay comparable
# across runs with different seeds.
SPLIT_SEED = 1234
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


@dataclasses.dataclass(frozen=True)
class Document:
    name: str  # file path, plus "#k" for the k-th piece of a cut file
    text: str


# ---------------------------------------------------------------------------- corpus


def stdlib_files() -> list[Path]:
    """The standard library's .py files, without its test suites and installed packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]  # not walked at all: site-packages can be huge
        files += [Path(folder) / n for n in names if n.endswith(".py") and not n.startswith("test_")]
    return sorted(files)


def corpus_files(spec: str) -> list[Path]:
    """"stdlib", or comma-separated files, directories (every file below) and globs."""
    if spec == STDLIB:
        return stdlib_files()
    files: list[Path] = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        path = Path(item).expanduser()
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        else:
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not matches:
                raise DataError(f"corpus {item!r}: no such file, directory or glob match")
            files += matches
    if not files:
        raise DataError(f"corpus {spec!r} names no files")
    return files


def _cut(name: str, text: str, max_bytes: int) -> Iterator[Document]:
    """Splits a text at line ends into pieces of at most ~max_bytes (a longer line stays whole)."""
    if len(text.encode("utf-8")) <= max_bytes:
        yield Document(name, text)
        return
    piece: list[str] = []
    size = k = 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode("utf-8"))
        if piece and size + n > max_bytes:
            yield Document(f"{name}#{k}", "".join(piece))
            piece, size, k = [], 0, k + 1
        piece.append(line)
        size += n
    if piece:
        yield Document(f"{name}#{k}", "".join(piece))


def read_documents(
    files: Sequence[Path], limit_bytes: int = 0, max_doc_bytes: int = MAX_DOC_BYTES, seed: int = SPLIT_SEED
) -> list[Document]:
    """Reads UTF-8 files as documents (files that are not UTF-8 are skipped).

    With `limit_bytes`, documents are taken in a seeded random order until the limit, so a
    small sample still spans the whole corpus; the result keeps the files' order.
    """
    docs = []
    for f in files:
        try:
            text = Path(f).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        except OSError as e:
            raise DataError(f"cannot read corpus file {f}: {e}") from None
        if text.strip():
            docs += _cut(str(f), text, max_doc_bytes)
    if not docs:
        raise DataError("the corpus holds no UTF-8 text")
    if limit_bytes:
        keep, total = [], 0
        for i in np.random.default_rng(seed).permutation(len(docs)):
            if total >= limit_bytes:
                break
            keep.append(int(i))
            total += len(docs[i].text.encode("utf-8"))
        docs = [docs[i] for i in sorted(keep)]
    return docs


def split_documents(docs: Sequence[Document], val_fraction: float, seed: int = SPLIT_SEED) -> tuple[list, list]:
    """-> (train, val): whole documents, val drawn in a seeded order until it holds
    `val_fraction` of the bytes. Disjoint by construction; both keep the input order."""
    if len(docs) < 2:
        raise DataError(f"the corpus has {len(docs)} document(s); at least 2 are needed for a train/val split")
    sizes = [len(d.text.encode("utf-8")) for d in docs]
    target = val_fraction * sum(sizes)
    val, held = set(), 0
    for i in np.random.default_rng(seed).permutation(len(docs)):
        if held >= target or len(val) == len(docs) - 1:
            break
        val.add(int(i))
        held += sizes[i]
    return [d for i, d in enumerate(docs) if i not in val], [d for i, d in enumerate(docs) if i in val]


# ---------------------------------------------------------------------------- token shards


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the disk and page-cache footprint whenever the ids fit."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def encode_documents(tokenizer: Tokenizer, docs: Sequence[Document]) -> np.ndarray:
    """Documents -> one flat id stream [N], each document as <s> ids </s>.

    BOS/EOS frame every document because generation prepends BOS to prompts: the model
    must have seen "start of a document" as a token to continue from. A tokenizer without a
    BOS (Qwen2's has none, and its prompts start without one) gives ids </s> per document:
    documents are separated by EOS alone. An EOS is always needed.
    """
    if tokenizer.eos_id is None:
        raise DataError("the tokenizer needs an end-of-text token (</s>) to separate documents")
    ids = tokenizer.encode_batch([d.text for d in docs])
    dtype = token_dtype(tokenizer.vocab_size)
    start = [np.array([tokenizer.bos_id], dtype)] if tokenizer.bos_id is not None else []
    parts = []
    for row in ids:
        parts += [*start, np.asarray(row, dtype), np.array([tokenizer.eos_id], dtype)]
    return np.concatenate(parts)


@dataclasses.dataclass(frozen=True)
class Split:
    """One split on disk: `tokens: [N]` memmap, and the UTF-8 bytes of its documents."""

    tokens: np.ndarray
    n_bytes: int
    n_docs: int

    @property
    def bytes_per_token(self) -> float:
        return self.n_bytes / len(self.tokens)


def corpus_digest(files: Sequence[Path], root: Path | None = None) -> str:
    """A hash of every corpus file's name (relative to `root`, if given) and bytes.

    Token shards are reused only for the same digest, so an edited, added or removed file
    rebuilds them. Content rather than modification times: the hosts of a multi-host run
    see the same digest for the same corpus, however their copies were made.
    """
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.relative_to(root) if root else f}\0".encode())
        try:
            digest.update(hashlib.sha256(f.read_bytes()).digest())
        except OSError as e:
            raise DataError(f"cannot read corpus file {f}: {e}") from None
    return digest.hexdigest()


def _source(spec: str, files: Sequence[Path], limit_mb: float, val_fraction: float, max_doc_bytes: int, tokenizer_id: str) -> dict:
    """What the shards were made from; a directory is reused only for the same source."""
    root = Path(sysconfig.get_paths()["stdlib"]) if spec == STDLIB else None  # the stdlib's place varies by machine
    return {
        "version": FORMAT_VERSION,
        "data": spec,
        "content": corpus_digest(files, root),
        "data_limit_mb": limit_mb,
        "val_fraction": val_fraction,
        "max_doc_bytes": max_doc_bytes,
        "tokenizer": tokenizer_id,
    }


def prepare(
    spec: str,
    out_dir: str | os.PathLike,
    *,
    tokenizer: Tokenizer | None = None,
    vocab_size: int = 0,
    val_fraction: float = 0.02,
    limit_mb: float = 0.0,
    max_doc_bytes: int = MAX_DOC_BYTES,
    log=lambda msg: None,
) -> tuple[Tokenizer, dict[str, Split]]:
    """Tokenizes a corpus once into `out_dir` and returns (tokenizer, {"train", "val"} splits).

    Without a tokenizer, one of `vocab_size` is trained on the train documents and kept as
    `out_dir/tokenizer.model`. A directory already prepared from the same source (the same
    settings and corpus content, see `corpus_digest`) is reused.
    Files are written under temporary names and meta.json last, so an interrupted
    preparation is redone rather than half-read.
    """
    out_dir = Path(out_dir)
    trained_path = out_dir / "tokenizer.model"
    tokenizer_id = tokenizer.fingerprint if tokenizer is not None else f"trained:{vocab_size}"
    files = corpus_files(spec)
    source = _source(spec, files, limit_mb, val_fraction, max_doc_bytes, tokenizer_id)
    meta_path = out_dir / META_FILE
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("source") == source:
            if tokenizer is None:
                tokenizer = Tokenizer.load(trained_path)
            log(f"reusing token shards in {out_dir}")
            return tokenizer, load_splits(out_dir)
        meta_path.unlink()  # another source (or the corpus changed): everything below is rebuilt

    log(f"reading corpus {spec!r}")
    docs = read_documents(files, int(limit_mb * 1e6), max_doc_bytes)
    train_docs, val_docs = split_documents(docs, val_fraction)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        if vocab_size < 260:
            raise DataError(f"vocab_size {vocab_size} is too small to train a byte-fallback tokenizer (>= 260)")
        log(f"training a {vocab_size}-token tokenizer on {len(train_docs)} documents")
        text_path = out_dir / ".tokenizer_corpus.txt"
        text_path.write_text("".join(d.text for d in train_docs), encoding="utf-8")
        try:
            tokenizer = Tokenizer.train([text_path], out_dir / ".tokenizer", vocab_size=vocab_size)
        finally:
            text_path.unlink()
        os.replace(out_dir / ".tokenizer.model", trained_path)
        (out_dir / ".tokenizer.vocab").unlink(missing_ok=True)

    meta = {"source": source, "dtype": token_dtype(tokenizer.vocab_size).name, "vocab_size": tokenizer.vocab_size}
    for name, split_docs in zip(SPLITS, (train_docs, val_docs)):
        log(f"tokenizing {len(split_docs)} {name} documents")
        ids = encode_documents(tokenizer, split_docs)
        tmp = out_dir / f".{name}.bin.tmp"
        ids.tofile(tmp)
        os.replace(tmp, out_dir / f"{name}.bin")
        meta[name] = {
            "tokens": int(len(ids)),
            "bytes": sum(len(d.text.encode("utf-8")) for d in split_docs),
            "docs": len(split_docs),
        }
    tmp = out_dir / f".{META_FILE}.tmp"
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, meta_path)
    return tokenizer, load_splits(out_dir)


def load_splits(directory: str | os.PathLike) -> dict[str, Split]:
    """Opens prepared shards read-only (memory-mapped: nothing is read until a batch needs it)."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / META_FILE).read_text())
        splits = {}
        for name in SPLITS:
            tokens = np.memmap(directory / f"{name}.bin", dtype=meta["dtype"], mode="r")
            if len(tokens) != meta[name]["tokens"]:
                raise DataError(f"{directory / (name + '.bin')} has {len(tokens)} tokens, meta.json says {meta[name]['tokens']}")
            splits[name] = Split(tokens, meta[name]["bytes"], meta[name]["docs"])
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"token shards in {directory} are missing or corrupt ({e})") from None
    return splits


# ---------------------------------------------------------------------------- batches


def _check_length(tokens: np.ndarray, seq_len: int, what: str) -> None:
    if len(tokens) < seq_len + 1:
        raise DataError(f"the {what} split has {len(tokens)} tokens, fewer than one window of seq_len+1 = {seq_len + 1}")


def _host_block(rows: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """This host's contiguous block of the last axis of `rows` (the batch-row axis)."""
    n = rows.shape[-1]
    if n % process_count:
        raise DataError(f"{n} batch rows do not divide over {process_count} hosts")
    per = n // process_count
    return rows[..., process_index * per : (process_index + 1) * per]


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> np.ndarray:
    """starts: [...] -> int32 [..., T+1] (inputs are [..., :-1], targets [..., 1:])."""
    flat = [np.asarray(tokens[s : s + seq_len + 1], dtype=np.int32) for s in starts.reshape(-1)]
    return np.stack(flat).reshape(*starts.shape, seq_len + 1)


def batch_starts(seed: int, step: int, n_tokens: int, seq_len: int, batch_size: int) -> np.ndarray:
    """The global batch's window starts [B] for one step: a function of (seed, step) alone."""
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, n_tokens - seq_len, size=batch_size)  # a window is seq_len + 1 tokens


def train_batch(
    tokens: np.ndarray,
    seed: int,
    step: int,
    seq_len: int,
    batch_size: int,
    accum: int = 1,
    process_index: int = 0,
    process_count: int = 1,
) -> np.ndarray:
    """This host's part of step `step`'s batch: int32 [A, b / process_count, T+1].

    The global batch of B = A * b windows is drawn from (seed, step) alone, cut into A
    micro-batches of b rows, and each host keeps the same block of rows of every micro-batch
    (what `jax.make_array_from_process_local_data` expects for rows split over hosts).
    """
    _check_length(tokens, seq_len, "train")
    starts = batch_starts(seed, step, len(tokens), seq_len, batch_size).reshape(accum, batch_size // accum)
    return _windows(tokens, _host_block(starts, process_index, process_count), seq_len)


def eval_batches(
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    n_batches: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[np.ndarray]:
    """Fixed validation windows spread evenly over the split: int32 [B_local, T+1] each.

    The same windows every eval, so val losses are comparable across steps; when the split
    is shorter than the windows asked for, they overlap and cover all of it.
    """
    _check_length(tokens, seq_len, "val")
    starts = np.linspace(0, len(tokens) - seq_len - 1, batch_size * n_batches).round().astype(np.int64)
    for b in range(n_batches):
        rows = _host_block(starts[b * batch_size : (b + 1) * batch_size], process_index, process_count)
        yield _windows(tokens, rows, seq_len)


def bits_per_byte(loss_nats_per_token: float, split: Split) -> float:
    """Tokenizer-independent loss: nats per token -> bits per UTF-8 byte of the split's text."""
    return loss_nats_per_token / math.log(2) / split.bytes_per_token

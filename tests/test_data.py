"""Data: corpus reading, the train/val split, token shards, and batches from (seed, step)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from jaxllm import DataError, data


def make_docs(directory, n=60):
    """n small files, each with a marker line naming it, so any token window tells its source."""
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        body = "".join(f"def f{i}_{j}(x):\n    return x * {j}  # doc {i}\n" for j in range(1 + i % 7))
        (directory / f"doc{i:03d}.py").write_text(f"# marker-{i:03d}\n" + body, encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("data")
    docs = make_docs(root / "corpus")
    tok, splits = data.prepare(str(docs), root / "shards", tokenizer=tokenizer, val_fraction=0.2)
    return docs, root / "shards", tok, splits


def decode_docs(tok, tokens):
    """A split's flat ids -> the texts between each <s> ... </s>."""
    ids = np.asarray(tokens).tolist()
    texts, cur = [], None
    for i in ids:
        if i == tok.bos_id:
            cur = []
        elif i == tok.eos_id:
            texts.append(tok.decode(cur))
            cur = None
        else:
            cur.append(i)
    assert cur is None, "every document must end with </s>"
    return texts


def test_shards_hold_every_document_exactly_framed_by_bos_and_eos(prepared):
    docs, _, tok, splits = prepared
    assert splits["train"].tokens.dtype == np.uint16
    texts = decode_docs(tok, splits["train"].tokens) + decode_docs(tok, splits["val"].tokens)
    want = sorted(p.read_text() for p in docs.iterdir())
    assert sorted(texts) == want


def test_train_and_val_are_disjoint_and_val_gets_its_share(prepared):
    docs, _, tok, splits = prepared
    train = {t.splitlines()[0] for t in decode_docs(tok, splits["train"].tokens)}
    val = {t.splitlines()[0] for t in decode_docs(tok, splits["val"].tokens)}
    assert train and val and not train & val
    assert len(train | val) == 60
    total = splits["train"].n_bytes + splits["val"].n_bytes
    assert total == sum(p.stat().st_size for p in docs.iterdir())
    assert 0.2 <= splits["val"].n_bytes / total < 0.2 + 0.05  # stops at the first doc past its share


def test_long_files_are_cut_at_line_ends_so_one_file_can_still_be_split(tmp_path):
    text = "".join(f"line {i}\n" for i in range(2000))
    (tmp_path / "one.txt").write_text(text)
    docs = data.read_documents([tmp_path / "one.txt"], max_doc_bytes=1000)
    assert "".join(d.text for d in docs) == text
    assert all(len(d.text) <= 1000 and d.text.endswith("\n") for d in docs)
    train, val = data.split_documents(docs, 0.1)
    assert {d.name for d in train}.isdisjoint(d.name for d in val) and len(train) + len(val) == len(docs)


def test_batches_are_a_function_of_seed_and_step_alone(prepared):
    tokens = prepared[3]["train"].tokens
    a = data.train_batch(tokens, seed=3, step=17, seq_len=16, batch_size=8)
    b = data.train_batch(tokens, seed=3, step=17, seq_len=16, batch_size=8)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (1, 8, 17) and a.dtype == np.int32
    assert not np.array_equal(a, data.train_batch(tokens, seed=3, step=18, seq_len=16, batch_size=8))
    assert not np.array_equal(a, data.train_batch(tokens, seed=4, step=17, seq_len=16, batch_size=8))
    # every row is a contiguous window of the split
    flat = np.asarray(tokens)
    for row in a[0]:
        starts = [s for s in range(len(flat) - 16) if flat[s] == row[0] and np.array_equal(flat[s : s + 17], row)]
        assert starts


def test_hosts_and_micro_batches_partition_the_global_batch(prepared):
    tokens = prepared[3]["train"].tokens
    whole = data.train_batch(tokens, 0, 5, 16, 8)[0]  # [8, 17]
    accum = data.train_batch(tokens, 0, 5, 16, 8, accum=2)  # [2, 4, 17]
    np.testing.assert_array_equal(accum.reshape(8, 17), whole)
    hosts = [data.train_batch(tokens, 0, 5, 16, 8, accum=2, process_index=p, process_count=2) for p in range(2)]
    assert hosts[0].shape == (2, 2, 17)
    np.testing.assert_array_equal(np.concatenate(hosts, axis=1), accum)
    with pytest.raises(DataError, match="do not divide over 3 hosts"):
        data.train_batch(tokens, 0, 5, 16, 8, process_index=0, process_count=3)


def test_eval_windows_are_fixed_and_span_the_split(prepared):
    tokens = prepared[3]["val"].tokens
    first = list(data.eval_batches(tokens, 16, 4, 3))
    again = list(data.eval_batches(tokens, 16, 4, 3))
    for x, y in zip(first, again):
        np.testing.assert_array_equal(x, y)
    flat = np.asarray(tokens, dtype=np.int32)
    np.testing.assert_array_equal(first[0][0], flat[:17])
    np.testing.assert_array_equal(first[-1][-1], flat[-17:])


def test_prepare_reuses_the_same_source_and_rebuilds_for_another(prepared, tokenizer):
    docs, shards, _, _ = prepared
    before = (shards / "train.bin").stat().st_mtime_ns
    data.prepare(str(docs), shards, tokenizer=tokenizer, val_fraction=0.2)
    assert (shards / "train.bin").stat().st_mtime_ns == before
    _, other = data.prepare(str(docs), shards.parent / "other", tokenizer=tokenizer, val_fraction=0.5)
    assert other["val"].n_bytes > prepared[3]["val"].n_bytes


def test_prepare_rebuilds_when_the_corpus_content_changes(tmp_path, tokenizer):
    docs = make_docs(tmp_path / "corpus", n=20)
    shards = tmp_path / "shards"
    texts = lambda splits: decode_docs(tokenizer, splits["train"].tokens) + decode_docs(tokenizer, splits["val"].tokens)
    _, splits = data.prepare(str(docs), shards, tokenizer=tokenizer, val_fraction=0.2)
    assert sum("# marker-005" in t for t in texts(splits)) == 1
    # an edit that keeps the file's name, size and modification time: only the bytes say it changed
    f = docs / "doc005.py"
    stat = f.stat()
    f.write_text(f.read_text().replace("marker-005", "MARKER-005"))
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (f.stat().st_size, f.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    _, splits = data.prepare(str(docs), shards, tokenizer=tokenizer, val_fraction=0.2)
    assert sum("# MARKER-005" in t for t in texts(splits)) == 1 and not any("marker-005" in t for t in texts(splits))
    (docs / "doc999.py").write_text("# marker-999\nx = 1\n")  # a file added to a directory
    _, splits = data.prepare(str(docs), shards, tokenizer=tokenizer, val_fraction=0.2)
    assert sum("# marker-999" in t for t in texts(splits)) == 1


def test_prepare_trains_a_tokenizer_when_none_is_given(tmp_path):
    docs = make_docs(tmp_path / "corpus", n=30)
    tok, splits = data.prepare(str(docs), tmp_path / "shards", vocab_size=300, val_fraction=0.1)
    assert tok.vocab_size == 300 and (tmp_path / "shards" / "tokenizer.model").exists()
    assert sorted(decode_docs(tok, splits["train"].tokens) + decode_docs(tok, splits["val"].tokens)) == sorted(
        p.read_text() for p in docs.iterdir()
    )


def test_bits_per_byte_converts_nats_per_token():
    split = data.Split(tokens=np.zeros(100, np.uint16), n_bytes=300, n_docs=1)  # 3 bytes per token
    assert data.bits_per_byte(3 * math.log(2), split) == pytest.approx(1.0)


def test_stdlib_corpus_is_the_library_without_its_tests():
    files = data.stdlib_files()
    names = {f.as_posix() for f in files}
    assert any(n.endswith("/json/decoder.py") for n in names)
    assert not any("/test/" in n or "/tests/" in n or "site-packages" in n for n in names)
    assert not any(f.name.startswith("test_") for f in files)
    assert len(files) > 300


@pytest.mark.parametrize(
    "spec,message",
    [("/nonexistent/dir", "no such file"), ("", "names no files")],
)
def test_bad_corpus_specs_fail_clearly(spec, message):
    with pytest.raises(DataError, match=message):
        data.corpus_files(spec)


def test_a_split_shorter_than_one_window_is_refused(prepared):
    with pytest.raises(DataError, match="fewer than one window"):
        data.train_batch(prepared[3]["val"].tokens, 0, 0, seq_len=10**6, batch_size=2)


def tokenizer_without(tmp_path, docs, **ids):
    """A small SentencePiece model trained on `docs` with some special ids switched off (-1)."""
    import sentencepiece as spm

    from jaxllm import Tokenizer

    text = tmp_path / "text.txt"
    text.write_text("".join(p.read_text() for p in sorted(docs.iterdir())))
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(tmp_path / "tok"), vocab_size=300, model_type="bpe", byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2, **ids,
    )  # fmt: skip
    return Tokenizer.load(tmp_path / "tok.model")


def test_a_tokenizer_without_bos_separates_documents_by_eos_alone(tmp_path, prepared):
    docs = make_docs(tmp_path / "corpus", n=20)
    tok = tokenizer_without(tmp_path, docs, bos_id=-1)
    assert tok.bos_id is None and tok.eos_id is not None
    _, splits = data.prepare(str(docs), tmp_path / "shards", tokenizer=tok, val_fraction=0.2)
    texts = []
    for split in splits.values():
        ids = np.asarray(split.tokens).tolist()
        assert ids[-1] == tok.eos_id  # every document, the last included, ends with </s>
        ends = [i for i, t in enumerate(ids) if t == tok.eos_id]
        texts += [tok.decode(ids[a + 1 : b]) for a, b in zip([-1] + ends[:-1], ends)]
    assert sorted(texts) == sorted(p.read_text() for p in docs.iterdir())
    # a tokenizer with a BOS keeps framing every document with it (the shared fixture's shards)
    with_bos = np.asarray(prepared[3]["train"].tokens)
    assert with_bos[0] == prepared[2].bos_id and (with_bos == prepared[2].bos_id).sum() == (with_bos == prepared[2].eos_id).sum()


def test_a_tokenizer_without_eos_is_refused_by_name(tmp_path):
    docs = make_docs(tmp_path / "corpus", n=10)
    tok = tokenizer_without(tmp_path, docs, eos_id=-1)
    with pytest.raises(DataError, match=r"end-of-text token \(</s>\)"):
        data.prepare(str(docs), tmp_path / "shards", tokenizer=tok, val_fraction=0.2)

"""Corpus reading, the deterministic split, packing with cu_seqlens, and the resumable batch stream."""

from __future__ import annotations

import json
import os

import pytest
import torch

from kimi_linear.train.data import (
    BOS_ID,
    EOS_ID,
    IGNORE_INDEX,
    PackedBatches,
    build_corpus,
    eval_batches,
    load_documents,
    pack_windows,
    split_documents,
    stdlib_documents,
    tokenize_documents,
    unigram_loss,
)


def random_docs(n: int, seed: int) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    words = ["def", "return", "x", "self", "import", "(", ")", ":", "\n", "    ", "é", "λ"]
    return ["".join(words[int(i)] for i in torch.randint(0, len(words), (int(length),), generator=gen))
            for length in torch.randint(5, 80, (n,), generator=gen)]


def test_split_is_deterministic_deduplicated_and_disjoint():
    docs = random_docs(300, seed=0)
    train, val = split_documents(docs + docs[:50], 0.1)
    again_train, again_val = split_documents(list(reversed(docs)), 0.1)
    assert set(train) == set(again_train) and set(val) == set(again_val)
    assert not set(train) & set(val)
    assert len(train) + len(val) == len(set(docs))
    assert 10 <= len(val) <= 60


def test_split_of_a_single_document_cuts_it():
    (doc,) = random_docs(1, seed=1)
    doc = doc * 10
    train, val = split_documents([doc], 0.1)
    assert train[0] + val[0] == doc and len(val[0]) == len(doc) - int(len(doc) * 0.9)


def test_tokenize_wraps_documents_in_bos_eos():
    stream = tokenize_documents(["ab", "é"], BOS_ID, EOS_ID)
    assert stream.tolist() == [BOS_ID, 97, 98, EOS_ID, BOS_ID, 0xC3, 0xA9, EOS_ID]


def test_pack_windows_marks_documents_and_masks_cross_document_labels():
    stream = tokenize_documents(random_docs(40, seed=2), BOS_ID, EOS_ID)
    T = 33
    windows = [stream[i * T: (i + 1) * T + 1] for i in (0, 5, 2)]
    batch = pack_windows(windows, BOS_ID)
    ids, labels, cu = batch["input_ids"][0], batch["labels"][0], batch["cu_seqlens"]
    assert ids.shape == labels.shape == (3 * T,) and cu.dtype == torch.int32
    expected_edges = {0, T, 2 * T, 3 * T} | set((ids == BOS_ID).nonzero().flatten().tolist())
    assert set(cu.tolist()) == expected_edges and cu.tolist() == sorted(cu.tolist())
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        # Inside a segment every label is the next input token; a segment's last label never names a BOS.
        assert torch.equal(labels[a:b - 1], ids[a + 1:b])
        assert labels[b - 1] != BOS_ID
    assert (labels == IGNORE_INDEX).sum() == sum(int((w[1:] == BOS_ID).sum()) for w in windows)


def test_packed_batches_resume_and_partition():
    stream = tokenize_documents(random_docs(30, seed=3), BOS_ID, EOS_ID)
    full = PackedBatches(stream, 16, 8, seed=5)
    reference = [full.next_step()[0]["input_ids"] for _ in range(60)]  # several epochs
    assert full.epoch >= 1
    resumed = PackedBatches(stream, 16, 8, seed=5)
    for _ in range(37):
        resumed.next_step()
    state = json.loads(json.dumps(resumed.state_dict()))
    fresh = PackedBatches(stream, 16, 8, seed=5)
    fresh.load_state_dict(state)
    for ref in reference[37:]:
        assert torch.equal(fresh.next_step()[0]["input_ids"], ref)
    # Two processes x two accumulation steps see exactly the global batch of one process.
    parts = []
    for rank in range(2):
        pb = PackedBatches(stream, 16, 8, seed=5, rank=rank, world_size=2, grad_accum=2)
        parts += [m["input_ids"] for m in pb.next_step()]
    assert torch.equal(torch.cat(parts, dim=1), reference[0])


def test_batch_source_rejects_bad_sizes():
    stream = tokenize_documents(random_docs(5, seed=4), BOS_ID, EOS_ID)
    with pytest.raises(ValueError, match="fewer than the batch size"):
        PackedBatches(stream, 512, 8)
    with pytest.raises(ValueError, match="multiple of processes"):
        PackedBatches(stream, 4, 6, world_size=4)


def test_unigram_baseline_is_the_entropy_of_byte_frequencies():
    stream = tokenize_documents(random_docs(200, seed=6), BOS_ID, EOS_ID)
    batches = eval_batches(stream, 32, 10, 4)
    total, n = unigram_loss(stream, batches, 259)
    counts = torch.bincount(stream.long(), minlength=259).double() + 1
    p = counts / counts.sum()
    labels = torch.cat([b["labels"][b["labels"] != IGNORE_INDEX] for b in batches])
    assert n == labels.numel() > 0
    assert total / n == pytest.approx(-p.log()[labels].mean().item(), rel=1e-12)


def test_load_documents_formats(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.py").write_text("print('second')")
    jsonl = json.dumps({"text": "third"}) + "\n\n" + json.dumps("fourth") + "\n"
    (tmp_path / "sub" / "c.jsonl").write_text(jsonl)
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden")
    expected = ["first document", "print('second')", "third", "fourth"]
    assert sorted(load_documents(tmp_path)) == sorted(expected)
    assert load_documents(tmp_path / "sub" / "c.jsonl") == ["third", "fourth"]


@pytest.mark.parametrize("case", ["missing", "empty_dir", "only_binary", "bad_jsonl", "jsonl_without_text",
                                  "unreadable"])
def test_load_documents_bad_input(tmp_path, case):
    target = tmp_path / "data"
    error, match = ValueError, "no text"
    if case == "missing":
        error, match = FileNotFoundError, "does not exist"
    elif case == "empty_dir":
        target.mkdir()
    elif case == "only_binary":
        target.mkdir()
        (target / "x.bin").write_bytes(b"\xff\xfe\x00")
    elif case == "bad_jsonl":
        target = tmp_path / "d.jsonl"
        target.write_text('{"text": "ok"}\n{not json\n')
        match = r"d.jsonl:2: not valid JSON"
    elif case == "jsonl_without_text":
        target = tmp_path / "d.jsonl"
        target.write_text('{"content": "x"}\n')
        match = "text"
    elif case == "unreadable":
        if os.geteuid() == 0:
            pytest.skip("root reads files whatever their mode")
        target.write_text("secret")
        target.chmod(0)
        match = "cannot read"
    with pytest.raises(error, match=match):
        load_documents(target)


def test_stdlib_corpus_is_there_and_split():
    docs = stdlib_documents()
    assert len(docs) > 100 and any("def " in d for d in docs)
    corpus = build_corpus(None)
    assert corpus.val.numel() > 10_000 and corpus.train.numel() > 50 * corpus.val.numel()
    assert int(corpus.train[0]) == BOS_ID and int(corpus.train.max()) <= EOS_ID

"""Pretraining data: corpus sources, the memory-mapped token files, packing, document masking, bad input."""

import json

import numpy as np
import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.checkpoint.tokenizer import train_tokenizer
from nanoseek.train.data import (
    IGNORE_INDEX,
    Batch,
    DataError,
    PackedBatches,
    TaskCorpus,
    TextCorpus,
    build_dataset,
    load_dataset,
)

from helpers import MICRO

PARAGRAPHS = [f"Paragraph {i} talks about topic {i % 7}.\nIt has a second line, number {i * 13}." for i in range(200)]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("corpus") / "book.txt"
    p.write_text("\n\n\n".join(PARAGRAPHS) + "\n", encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(PARAGRAPHS, vocab_size=300)


@pytest.fixture(scope="module")
def dataset(text_file, tokenizer, tmp_path_factory):
    return build_dataset(
        tmp_path_factory.mktemp("ds"), TextCorpus([text_file]), tokenizer=tokenizer, heldout_percent=10
    )


def test_txt_paragraphs_are_documents_and_jsonl_text_fields(tmp_path, text_file):
    assert list(TextCorpus([text_file])) == PARAGRAPHS
    assert list(TextCorpus([text_file], txt_split="file")) == ["\n\n\n".join(PARAGRAPHS)]
    jl = tmp_path / "docs.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(PARAGRAPHS[:5])) + "\n\n")
    assert list(TextCorpus([jl])) == PARAGRAPHS[:5]


def test_token_files_hold_every_document_bos_to_eos_and_split_by_hash(dataset, tokenizer):
    tr, ho = dataset.train, dataset.heldout
    assert tr.tokens.dtype == np.uint16 and isinstance(tr.tokens, np.memmap)
    assert tr.n_docs + ho.n_docs == len(PARAGRAPHS) and 5 <= ho.n_docs <= 40  # ~10% held out
    decoded = set()
    for split in (tr, ho):
        ends = list(split.doc_starts[1:]) + [split.n_tokens]
        for s, e in zip(split.doc_starts, ends):
            ids = split.tokens[s:e].tolist()
            assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
            decoded.add(tokenizer.decode(ids[1:-1]))
    assert decoded == set(PARAGRAPHS)
    meta = json.loads((dataset.root / "meta.json").read_text())
    assert meta["splits"]["train"]["n_tokens"] == tr.n_tokens and meta["dtype"] == "uint16"
    # The held-out documents are a property of the text, not of a seed: a rebuild holds out the same ones.
    again = build_dataset(dataset.root.parent / "again", PARAGRAPHS[::-1], tokenizer=tokenizer, heldout_percent=10)
    assert again.heldout.n_tokens == ho.n_tokens and again.heldout.n_docs == ho.n_docs


def test_dataset_refuses_a_changed_tokenizer(dataset, tmp_path):
    import shutil

    copy = tmp_path / "ds"
    shutil.copytree(dataset.root, copy)
    other = train_tokenizer(PARAGRAPHS[:50], vocab_size=280)
    other.save_pretrained(copy)
    with pytest.raises(DataError, match="hash mismatch"):
        load_dataset(copy)
    with pytest.raises(DataError, match="not a dataset directory"):
        load_dataset(tmp_path)


def test_batches_are_seeded_resumable_and_cover_each_epoch(dataset):
    a = PackedBatches(dataset.train, seq_len=32, seed=1)
    starts = [a.window_start(k) for k in range(a.n_windows)]
    assert sorted(starts) == [i * 32 for i in range(a.n_windows)]  # an epoch visits each window once
    assert starts != sorted(starts)  # shuffled
    assert [a.window_start(a.n_windows + k) for k in range(5)] != starts[:5]  # a new order per epoch
    b = PackedBatches(dataset.train, seq_len=32, seed=1)
    c = PackedBatches(dataset.train, seq_len=32, seed=2)
    whole = a.get(3, 6)
    assert torch.equal(b.get(3, 6).tokens, whole.tokens)  # same seed, same position: same batch
    assert torch.equal(torch.cat([b.get(3, 2).tokens, b.get(5, 4).tokens]), whole.tokens)  # resumable
    assert not torch.equal(c.get(3, 6).tokens, whole.tokens)
    assert whole.tokens.shape == (6, 33) and whole.tokens.dtype == torch.int64


def test_targets_never_cross_a_document_boundary():
    tokens = torch.tensor([[0, 5, 6, 1, 0, 7, 8, 9, 1]])
    docs = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1]])
    b = Batch(tokens, docs)
    assert b.targets(0).tolist() == [[5, 6, 1, IGNORE_INDEX, 7, 8, 9, 1]]
    assert b.targets(1).tolist() == [[6, 1, IGNORE_INDEX, IGNORE_INDEX, 8, 9, 1]]
    mask = b.attention_mask()[0, 0]
    assert mask[5, 4] and not mask[4, 3] and not mask[3, 4] and mask[3, 0]
    assert Batch(tokens[:, :4], docs[:, :4]).attention_mask() is None  # one document: plain causal


def test_packed_document_sees_exactly_what_it_sees_alone():
    """Document masking + relative RoPE: a document's logits (and MTP logits) inside a packed window equal
    its logits as a batch of its own, wherever it sits in the window."""
    cfg = ModelConfig(**MICRO)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    a, b = torch.randint(2, 64, (1, 7)), torch.randint(2, 64, (1, 9))
    packed = torch.cat([a, b], dim=1)
    batch = Batch(torch.cat([packed, packed[:, :1]], dim=1), torch.tensor([[0] * 7 + [1] * 10]))
    mask = batch.attention_mask()
    with torch.no_grad():
        h = model.hidden_states(batch.inputs, mask=mask)
        alone = model.hidden_states(b)
        torch.testing.assert_close(model.lm_head(h)[:, 7:], model.lm_head(alone), atol=1e-5, rtol=1e-4)
        mtp_packed = model.mtp_logits(h, batch.inputs, mask)[0]  # position i predicts token i+2
        mtp_alone = model.mtp_logits(alone, b)[0]
        torch.testing.assert_close(mtp_packed[:, 7:], mtp_alone, atol=1e-5, rtol=1e-4)
        unmasked = model.lm_head(model.hidden_states(batch.inputs))[:, 7:]
        assert (unmasked - model.lm_head(alone)).abs().max() > 1e-3  # without the mask, A leaks into B


def test_task_corpus_keeps_heldout_problems_apart(tmp_path, tokenizer):
    train = TaskCorpus("arithmetic", n=30, seed=0, split="train", max_digits=2)
    held = TaskCorpus("arithmetic", n=10, seed=0, split="heldout", max_digits=2)
    assert list(train) == list(train)  # re-iterable, deterministic
    ds = build_dataset(tmp_path, train, held, vocab_size=400, chat_template="r1_zero")
    assert ds.train.n_docs == 30 and ds.heldout.n_docs == 10
    first = ds.tokenizer.decode(ds.train.tokens[: ds.train.doc_starts[1]].tolist())
    assert "<think>" in first and "</answer>" in first and first.startswith("<｜begin▁of▁sentence｜>")
    assert not {d.split("User:")[1] for d in train} & {d.split("User:")[1] for d in held}


# ---- bad input -----------------------------------------------------------------------------------
def test_empty_corpus_file(tmp_path):
    p = tmp_path / "empty.txt"
    p.write_bytes(b"")
    with pytest.raises(DataError, match="empty.txt is empty"):
        TextCorpus([p])
    p.write_text("\n\n   \n")
    with pytest.raises(DataError, match="holds no text"):
        list(TextCorpus([p]))


def test_corpus_not_utf8(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("first line\ncaf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt is not UTF-8 text: line 2, byte 3 is b'\\xe9'"):
        list(TextCorpus([p]))


def test_bad_jsonl_lines_are_named(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2 has no string field 'text'"):
        list(TextCorpus([p]))
    p.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(DataError, match=r"d.jsonl:2 is not valid JSON"):
        list(TextCorpus([p]))


def test_corpus_shorter_than_one_sequence(tmp_path, tokenizer):
    ds = build_dataset(tmp_path, ["a short text"], tokenizer=tokenizer, heldout_percent=0)
    with pytest.raises(DataError, match=r"train split has \d+ tokens, fewer than one sequence of seq_len \+ 1 = 65"):
        PackedBatches(ds.train, seq_len=64)

"""Pretraining data: text documents -> memory-mapped token files -> packed, seeded, resumable batches.

    ds = build_dataset("data/", TextCorpus(["book.txt"]), vocab_size=8192)     # trains a tokenizer too
    ds = build_dataset("data/", TaskCorpus("arithmetic", n=20000, split="train"),
                       TaskCorpus("arithmetic", n=500, split="heldout"), tokenizer=tok)
    ds = load_dataset("data/")
    batches = PackedBatches(ds.train, seq_len=256, seed=0)
    batch = batches.get(position=0, n=8)      # windows 0..7 of the seeded order: Batch of (8, 257) tokens

Corpus sources (re-iterable, so a tokenizer can be trained on the same pass order):
- `TextCorpus`: .txt files, one document per blank-line-separated paragraph (or per file), and .jsonl
  files, one document per line's "text" field. Strict UTF-8; an empty file is an error.
- `TaskCorpus`: the synthetic verifiable tasks (`nanoseek.tasks.pretraining_documents`): R1-Zero prompt,
  "<think>…</think> <answer>…</answer>", EOS.

A dataset directory:
    meta.json                   dtype, vocab size, BOS/EOS ids, sha256 of tokenizer.json, per-split sizes
    train.bin, heldout.bin      every document's tokens back to back (uint16 if the vocab fits, else uint32)
    train.docs, heldout.docs    int64 start offset of each document in the .bin (both np.memmap-able)
    tokenizer.json, tokenizer_config.json
Every document is stored as BOS … EOS (added when the text lacks them). The held-out split is decided per
document by a hash of its text (`tasks.split_of`), or is a separate held-out source; either way RL and eval
never train on it, and no seed changes it. meta.json is written last: a build killed midway is no dataset.

Packing and document boundaries: the split's token stream is cut into windows of seq_len+1 tokens at a
stride of seq_len (window i starts at token i·seq_len), visited in a permutation drawn from (seed, epoch).
A window spans several documents. Attention does not cross a document boundary (`Batch.attention_mask`,
block-diagonal causal), and a target that belongs to another document than its input position is ignored
(-100), so packing changes nothing a token can see. RoPE is relative, so positions need no reset: with
the mask, q·k depends only on the distance inside a document. The position in the data is a single
integer, the number of windows handed out, which is what a checkpoint stores to resume.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanoseek.checkpoint.tokenizer import Tokenizer, train_tokenizer
from nanoseek.errors import NanoseekError
from nanoseek.fileio import atomic_write, atomic_write_json
from nanoseek.tasks import get_task, pretraining_documents, split_of

IGNORE_INDEX = -100
SPLITS = ("train", "heldout")
META = "meta.json"


class DataError(NanoseekError):
    """A corpus or dataset that cannot be trained on; the message names the file and what is wrong."""


# ---- corpus sources ------------------------------------------------------------------------------
class TextCorpus:
    """Documents from user files: .txt (per blank-line paragraph, or per file) and .jsonl ("text" field).

    Iterating again reads the files again (nothing is held in memory)."""

    def __init__(self, paths: Iterable[str | os.PathLike], txt_split: str = "paragraph", field: str = "text"):
        self.paths = [Path(p) for p in paths]
        if txt_split not in ("paragraph", "file"):
            raise DataError(f"txt_split must be 'paragraph' or 'file', got {txt_split!r}")
        self.txt_split, self.field = txt_split, field
        if not self.paths:
            raise DataError("no corpus files given")
        for p in self.paths:
            if not p.is_file():
                raise DataError(f"corpus file {p} does not exist")
            if p.stat().st_size == 0:
                raise DataError(f"corpus file {p} is empty")

    def __iter__(self) -> Iterator[str]:
        for p in self.paths:
            n = 0
            reader = self._jsonl(p) if p.suffix == ".jsonl" else self._txt(p)
            for doc in reader:
                n += 1
                yield doc
            if n == 0:
                raise DataError(f"corpus file {p} holds no text (only whitespace)")

    def _lines(self, path: Path) -> Iterator[tuple[int, str]]:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    yield lineno, raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(
                        f"corpus file {path} is not UTF-8 text: line {lineno}, byte {e.start} "
                        f"is {raw[e.start : e.start + 1]!r}"
                    ) from None

    def _txt(self, path: Path) -> Iterator[str]:
        para: list[str] = []
        for _, line in self._lines(path):
            if line.strip() or self.txt_split == "file":
                para.append(line)
            elif para:
                yield "".join(para).strip()
                para = []
        text = "".join(para).strip()
        if text:
            yield text

    def _jsonl(self, path: Path) -> Iterator[str]:
        for lineno, line in self._lines(path):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno} is not valid JSON ({e.msg})") from None
            text = obj.get(self.field) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno} has no string field {self.field!r}")
            if text.strip():
                yield text


class TaskCorpus:
    """n documents of a synthetic task (`nanoseek.tasks.pretraining_documents`), the same every pass."""

    def __init__(
        self, task: str, n: int, seed: int = 0, split: str = "train", reasoning_fraction: float = 1.0, **knobs: Any
    ):
        self.task = get_task(task, **knobs)
        self.n, self.seed, self.split, self.reasoning_fraction = n, seed, split, reasoning_fraction
        if n <= 0:
            raise DataError(f"a task corpus needs n > 0 documents, got {n}")

    def __iter__(self) -> Iterator[str]:
        return pretraining_documents(self.task, self.n, self.seed, self.reasoning_fraction, split=self.split)


# ---- token files ---------------------------------------------------------------------------------
@dataclass
class TokenFile:
    """One split: `tokens` (N,) memory-mapped ids, `doc_starts` (D,) int64 offsets of each document."""

    tokens: np.ndarray
    doc_starts: np.ndarray

    @classmethod
    def open(cls, root: Path, split: str, dtype: str) -> "TokenFile":
        bin_path, docs_path = root / f"{split}.bin", root / f"{split}.docs"
        if not bin_path.exists() or not docs_path.exists():
            raise DataError(f"dataset {root} lacks {bin_path.name} or {docs_path.name}")
        tokens = np.memmap(bin_path, dtype=dtype, mode="r") if bin_path.stat().st_size else np.zeros(0, dtype)
        docs = np.fromfile(docs_path, dtype=np.int64)
        return cls(tokens, docs)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def n_docs(self) -> int:
        return len(self.doc_starts)

    def window(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [start, start+length) as int64, and the document index of each (increasing)."""
        ids = np.asarray(self.tokens[start : start + length], dtype=np.int64)
        docs = np.searchsorted(self.doc_starts, np.arange(start, start + length), side="right") - 1
        return ids, docs


@dataclass
class Dataset:
    root: Path
    train: TokenFile
    heldout: TokenFile
    tokenizer: Tokenizer
    meta: dict[str, Any]


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.tk.to_str().encode()).hexdigest()


def build_dataset(
    out_dir: str | os.PathLike,
    train_docs: Iterable[str],
    heldout_docs: Iterable[str] | None = None,
    *,
    tokenizer: Tokenizer | None = None,
    vocab_size: int | None = None,
    heldout_percent: float = 5.0,
    chat_template: str = "deepseek",
    batch_docs: int = 1024,
) -> Dataset:
    """Tokenize documents once into `out_dir` (see the module docstring for the layout).

    heldout_docs None: a `heldout_percent` of train_docs, by hash of the text, is held out instead.
    tokenizer None: a byte-level BPE of `vocab_size` is trained on the training documents first
    (train_docs must then be re-iterable: a corpus object or a list).
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / META).unlink(missing_ok=True)  # the dataset exists again only once complete

    def route(docs: Iterable[str]) -> Iterator[tuple[str, str]]:
        for d in docs:
            yield (d, "train") if heldout_docs is not None else (d, split_of(d, heldout_percent))

    if tokenizer is None:
        if vocab_size is None:
            raise DataError("build_dataset needs a tokenizer or a vocab_size to train one")
        if isinstance(train_docs, Iterator):
            train_docs = list(train_docs)
        tokenizer = train_tokenizer(
            (d for d, s in route(train_docs) if s == "train"), vocab_size=vocab_size, chat_template=chat_template
        )
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    sources = [route(train_docs)] + ([((d, "heldout") for d in heldout_docs)] if heldout_docs is not None else [])
    sizes: dict[str, dict[str, int]] = {}

    def tokenize(tmps: list[Path]) -> None:
        """Every document into the temporary train.bin, train.docs, heldout.bin, heldout.docs."""
        writers = {s: _SplitWriter(tmps[2 * i], tmps[2 * i + 1], dtype) for i, s in enumerate(SPLITS)}
        pending: list[tuple[str, str]] = []

        def flush() -> None:
            for (_, split), ids in zip(pending, tokenizer.encode_batch([d for d, _ in pending])):
                if ids and ids[0] != tokenizer.bos_id:
                    ids = [tokenizer.bos_id] + ids
                if ids[-1] != tokenizer.eos_id:
                    ids = ids + [tokenizer.eos_id]
                writers[split].add(ids)
            pending.clear()

        for source in sources:
            for item in source:
                pending.append(item)
                if len(pending) >= batch_docs:
                    flush()
        flush()
        if writers["train"].n_docs == 0:
            raise DataError("the corpus has no training documents")
        sizes.update({s: w.close() for s, w in writers.items()})

    _atomic_writes([root / f"{s}.{ext}" for s in SPLITS for ext in ("bin", "docs")], tokenize)
    tokenizer.save_pretrained(root)
    meta = {
        "format_version": 1,
        "dtype": np.dtype(dtype).name,
        "vocab_size": tokenizer.vocab_size,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "tokenizer_sha256": tokenizer_hash(tokenizer),
        "heldout": "separate source" if heldout_docs is not None else f"{heldout_percent}% of documents by hash",
        "splits": sizes,
    }
    atomic_write_json(root / META, meta)
    return load_dataset(root)


def _atomic_writes(paths: list[Path], fill: Callable[[list[Path]], None]) -> None:
    """`fill(tmps)` writes a temporary file for each of `paths` at once; each then appears under its final
    name through `nanoseek.fileio.atomic_write` (fsynced, renamed), or, if `fill` fails, none does."""
    if not paths:
        fill([])
        return
    atomic_write(paths[0], lambda tmp: _atomic_writes(paths[1:], lambda rest: fill([tmp, *rest])))


class _SplitWriter:
    """Appends one split's documents to its token file and records where each starts."""

    def __init__(self, bin_path: Path, docs_path: Path, dtype):
        self.f = open(bin_path, "wb")
        self.docs_path = docs_path
        self.dtype = dtype
        self.starts: list[int] = []
        self.n_tokens = 0

    @property
    def n_docs(self) -> int:
        return len(self.starts)

    def add(self, ids: list[int]) -> None:
        self.starts.append(self.n_tokens)
        self.f.write(np.asarray(ids, dtype=self.dtype).tobytes())
        self.n_tokens += len(ids)

    def close(self) -> dict[str, int]:
        self.f.close()
        np.asarray(self.starts, dtype=np.int64).tofile(self.docs_path)
        return {"n_tokens": self.n_tokens, "n_docs": self.n_docs}


def load_dataset(path: str | os.PathLike) -> Dataset:
    root = Path(path)
    if not (root / META).exists():
        raise DataError(f"{root} is not a dataset directory (no {META}; build one with --corpus or --task)")
    try:
        meta = json.loads((root / META).read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{root / META} is not valid JSON: {e}") from None
    tokenizer = Tokenizer.from_pretrained(root)
    if tokenizer_hash(tokenizer) != meta["tokenizer_sha256"]:
        raise DataError(f"{root}/tokenizer.json changed after the tokens were written (hash mismatch)")
    splits = {s: TokenFile.open(root, s, meta["dtype"]) for s in SPLITS}
    for s, f in splits.items():
        if f.n_tokens != meta["splits"][s]["n_tokens"]:
            raise DataError(f"{root}/{s}.bin holds {f.n_tokens} tokens, meta.json says {meta['splits'][s]['n_tokens']}")
    return Dataset(root, splits["train"], splits["heldout"], tokenizer, meta)


# ---- batches -------------------------------------------------------------------------------------
@dataclass
class Batch:
    tokens: torch.Tensor  # (B, T+1) int64: inputs are [:, :-1], next-token targets [:, 1:]
    doc_ids: torch.Tensor  # (B, T+1) int64: document index of each token (increasing along a row)

    @property
    def inputs(self) -> torch.Tensor:
        return self.tokens[:, :-1]

    def targets(self, depth: int = 0) -> torch.Tensor:
        """(B, T-depth): the token depth+1 ahead of each input position (depth 0: the next token; depth k:
        what MTP module k predicts), IGNORE_INDEX where it lies in another document."""
        T = self.tokens.shape[1] - 1
        tgt = self.tokens[:, 1 + depth :]
        same = self.doc_ids[:, 1 + depth :] == self.doc_ids[:, : T - depth]
        return tgt.masked_fill(~same, IGNORE_INDEX)

    def attention_mask(self) -> torch.Tensor | None:
        """(B, 1, T, T) bool keep-mask: causal and within one document; None when no row crosses a boundary
        (plain causal attention then, the fast path)."""
        d = self.doc_ids[:, :-1]
        if bool((d[:, :1] == d[:, -1:]).all()):
            return None
        T = d.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=d.device).tril()
        return ((d[:, :, None] == d[:, None, :]) & causal)[:, None]

    def to(self, device: str | torch.device) -> "Batch":
        return Batch(self.tokens.to(device, non_blocking=True), self.doc_ids.to(device, non_blocking=True))


class PackedBatches:
    """Windows of seq_len+1 tokens at a stride of seq_len, in a seeded permutation per epoch.

    `get(position, n)` returns windows position..position+n-1 of the endless sequence epoch 0, epoch 1, ...
    Stateless: the same (split, seq_len, seed, position) always gives the same batch, so a checkpoint
    resumes the data by storing one integer and data-parallel ranks slice the same global order.
    shuffle=False visits windows in file order (evaluation).
    """

    def __init__(self, split: TokenFile, seq_len: int, seed: int = 0, shuffle: bool = True, name: str = "train"):
        if seq_len < 1:
            raise DataError(f"seq_len must be positive, got {seq_len}")
        if split.n_tokens < seq_len + 1:
            raise DataError(
                f"the {name} split has {split.n_tokens} tokens, fewer than one sequence of "
                f"seq_len + 1 = {seq_len + 1}; use a shorter --seq-len or more text"
            )
        self.split, self.seq_len, self.seed, self.shuffle = split, seq_len, seed, shuffle
        self.n_windows = (split.n_tokens - 1) // seq_len
        self._perm: tuple[int, np.ndarray] | None = None

    def window_start(self, position: int) -> int:
        epoch, i = divmod(position, self.n_windows)
        if not self.shuffle:
            return i * self.seq_len
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_windows))
        return int(self._perm[1][i]) * self.seq_len

    def epoch(self, position: int) -> float:
        return position / self.n_windows

    def get(self, position: int, n: int) -> Batch:
        """Windows position, ..., position+n-1: a (n, seq_len+1) batch."""
        return self.take(range(position, position + n))

    def take(self, positions) -> Batch:
        toks, docs = zip(*(self.split.window(self.window_start(p), self.seq_len + 1) for p in positions))
        return Batch(torch.from_numpy(np.stack(toks)), torch.from_numpy(np.stack(docs)))

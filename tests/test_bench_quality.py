"""`bench.quality`: per weight format, held-out loss, top-1 agreement and KL against fp32 under teacher forcing,
and pass@1 through the engine with the zero run's evaluation protocol, on a tiny checkpoint and data."""

from __future__ import annotations

import json

import pytest

from nanoseek.bench.quality import QualityBenchConfig, run, zero_run_of
from nanoseek.checkpoint.tokenizer import Tokenizer
from nanoseek.errors import NanoseekError
from nanoseek.rl.zero_config import preset
from nanoseek.tasks import get_task, pretraining_documents
from nanoseek.train.data import build_dataset

from helpers import arithmetic_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


@pytest.fixture(scope="module")
def zero_like(tmp_path_factory):
    """A fake zero run directory: the smoke preset's config.json and a tiny random model in RUN/model, plus
    held-out data tokenized with the model's tokenizer."""
    root = tmp_path_factory.mktemp("quality")
    run_dir = root / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(preset("smoke").to_dict()))
    model = arithmetic_checkpoint(run_dir / "model")
    tok = Tokenizer.from_pretrained(model)
    task = get_task("arithmetic")
    train = list(pretraining_documents(task, n=20, seed=0))
    heldout = list(pretraining_documents(task, n=20, seed=0, split="heldout"))
    build_dataset(root / "data", train, heldout, tokenizer=tok)
    return model, root / "data"


def test_formats_against_fp32(zero_like):
    model, data = zero_like
    lines = []
    r = run(
        QualityBenchConfig(str(model), str(data), weights=["fp32", "int8"], sequences=3, seq_len=64, eval_problems=2),
        log=lambda *a, **k: lines.append(" ".join(map(str, a))),
    )
    assert r["zero_run"] and r["task"] == "arithmetic(1-1 digits, +)"  # the smoke run's demo task
    assert r["eval"]["n_problems"] == 2 and r["eval"]["samples"] == 4 and r["eval"]["max_tokens"] == 48
    assert r["sequences"] == 3 and r["seq_len"] == 64 and r["scored_tokens"] > 0
    fp32, int8 = r["formats"]["fp32"], r["formats"]["int8"]
    for row in (fp32, int8):
        for key in ("loss", "delta_loss_pct", "top1_agreement", "kl", "pass_at_1", "pass_at_1_se", "weight_bytes"):
            assert key in row, key
        assert {"quantize", "loss", "eval", "total"} <= set(row["seconds"])
        assert 0 <= row["pass_at_1"] <= 1 and row["loss"] > 0
    assert fp32["top1_agreement"] == 1.0 and fp32["delta_loss_pct"] == 0 and fp32["kl"] == 0
    assert fp32["delta_pass_at_1"] == 0
    assert 0 <= int8["top1_agreement"] <= 1 and int8["kl"] >= 0 and "delta_pass_at_1" in int8
    assert int8["weight_bytes"] < fp32["weight_bytes"]
    table = "\n".join(lines)
    assert "| format | held-out loss | Δ loss vs fp32 | top-1 agreement |" in table and "| int8 |" in table


def test_loss_rows_only_and_errors(zero_like, tmp_path):
    model, data = zero_like
    r = run(
        QualityBenchConfig(str(model), str(data), weights=["int4"], sequences=2, eval_problems=0), log=lambda *a, **k: 0
    )
    row = r["formats"]["int4"]
    assert "pass_at_1" not in row and 0 <= row["top1_agreement"] <= 1 and "task" not in r
    assert r["seq_len"] == 256  # the smoke run's pretraining seq_len
    with pytest.raises(NanoseekError, match="nothing to measure"):
        run(QualityBenchConfig(str(model), None, eval_problems=0))
    with pytest.raises(NanoseekError, match="--weights"):
        run(QualityBenchConfig(str(model), str(data), weights=["fp8"]))
    assert zero_run_of(tmp_path / "model") is None  # no run around it: no context

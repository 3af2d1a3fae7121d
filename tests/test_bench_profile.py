"""`bench.profile`: per (weights format, batch) row of an eager engine's decode step, on a tiny checkpoint:
the rows exist, operators are counted, the sampled tokens' `tolist` shows as a host sync, shares are shares."""

from __future__ import annotations

import pytest

from nanoseek.bench.profile import ProfileConfig, run
from nanoseek.checkpoint.hf import save_pretrained

from helpers import CONFIGS, random_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("profile")
    save_pretrained(random_model(CONFIGS["v3"], seed=1), path)
    return path


def test_eager_rows(tiny_checkpoint):
    lines = []
    cfg = ProfileConfig(model=str(tiny_checkpoint), weights=["fp32", "int8"], batch=[1, 2], steps=3, prompt_len=8)
    rows = run(cfg, log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert [(r["weights"], r["batch"], r["compiled"]) for r in rows] == [
        ("fp32", 1, False),
        ("fp32", 2, False),
        ("int8", 1, False),
        ("int8", 2, False),
    ]
    for r in rows:
        assert r["ms_per_step"] > 0 and r["tokens_per_s"] > 0
        assert r["ops_per_step"] > 0 and r["op_ms_per_step"] > 0 and r["regions_per_step"] == 0
        assert r["torch_calls_per_step"] >= r["syncs_per_step"] >= 1  # the sampled tokens leave through tolist
        assert r["syncs_by_name"].get("tolist", 0) >= 1
        assert 0 <= r["outside_share"] <= 1
        assert 0 < len(r["top_ops"]) <= 8 and all(op["calls_per_step"] > 0 for op in r["top_ops"])
    text = "\n".join(lines)
    assert "| weights | batch | compiled | ms/step | tok/s | aten ops/step |" in text
    assert "| int8 | 2 | no |" in text and "top 8 by self time" in text

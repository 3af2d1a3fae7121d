"""The `nanoseek` command line: info on published shapes, init writing a loadable checkpoint."""

import argparse
import json
import subprocess
import sys

import pytest
import torch

import nanoseek
from nanoseek.cli import main, rl
from nanoseek.model.stats import model_stats

# DeepSeek's published figures (V2 paper Table / V3 report): total, activated per token, in billions.
PUBLISHED = {
    "deepseek-v2-lite": (15.7, 2.4),
    "deepseek-v2": (236.0, 21.0),
    "deepseek-v3": (671.0, 37.0),
    "deepseek-v3.2": (671.0, 37.0),  # V3.2-Exp: V3 plus the indexers (685B with the MTP module, as V3)
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_info_matches_published_parameter_counts(name):
    total, active = PUBLISHED[name]
    s = model_stats(nanoseek.get_preset(name))
    assert abs(s.total / 1e9 - total) / total < 0.01, s.total
    # The published active counts carry two significant digits ("2.4B" covers 2.35-2.45),
    # so they are held to that rounding plus 1%.
    assert abs(s.active / 1e9 - active) / active < 0.025, s.active


def test_info_v3_mtp_and_cache_figures():
    s = model_stats(nanoseek.get_preset("deepseek-v3"))
    assert abs(s.mtp_stored / 1e9 - 14) < 1.0  # "the MTP module adds about 14B" (685B checkpoint)
    assert s.latent_cache_bytes == 576 * 61 * 2 == 70_272  # (c_kv 512 + k_pe 64) values x 61 layers x 2 bytes
    assert s.naive_cache_bytes == 128 * (192 + 128) * 61 * 2
    assert round(s.naive_cache_bytes / s.latent_cache_bytes) == 71


def test_info_v32_cache_holds_the_latent_and_the_indexer_key(capsys):
    s = model_stats(nanoseek.get_preset("deepseek-v3.2"))
    assert s.latent_cache_bytes == 70_272 and s.index_cache_bytes == 128 * 61 * 2 == 15_616
    assert model_stats(nanoseek.get_preset("deepseek-v3")).index_cache_bytes == 0
    assert main(["info", "deepseek-v3.2"]) == 0
    out = capsys.readouterr().out
    assert "85,888 B" in out and "top 2,048 tokens" in out and "3,997,696 B" in out  # V3.2 total, MHA


def test_info_cli_prints_counts(capsys):
    assert main(["info", "deepseek-v2-lite"]) == 0
    out = capsys.readouterr().out
    assert "15.71B" in out and "2.45B" in out and "31,104 B" in out


def test_info_unknown_name_is_a_clear_error(capsys):
    assert main(["info", "gpt-5"]) == 2
    assert "neither a checkpoint directory nor a preset" in capsys.readouterr().err


def test_init_writes_a_loadable_checkpoint_with_tokenizer(tmp_path):
    out = tmp_path / "tiny"
    # through the installed console script, as a user runs it
    proc = subprocess.run(
        [sys.executable, "-m", "nanoseek.cli", "init", "--preset", "tiny", "--out", str(out), "--seed", "7"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / f).exists(), f
    model = nanoseek.from_pretrained(out)
    from nanoseek.checkpoint.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["eos_token_id"] == tok.eos_id and tok.vocab_size <= cfg["vocab_size"]
    ids = tok.encode("What is 12 + 30?")
    logits = model(torch.tensor([ids]))
    assert logits.shape == (1, len(ids), cfg["vocab_size"]) and torch.isfinite(logits).all()
    # the same seed gives the same weights
    assert main(["init", "--preset", "tiny", "--out", str(tmp_path / "again"), "--seed", "7"]) == 0
    again = nanoseek.from_pretrained(tmp_path / "again")
    assert torch.equal(again.layers[1].mlp.experts.gate_proj, model.layers[1].mlp.experts.gate_proj)


def test_init_refuses_a_shape_that_cannot_fit(tmp_path, capsys):
    assert main(["init", "--preset", "deepseek-v3", "--out", str(tmp_path / "v3")]) == 2
    assert "GiB" in capsys.readouterr().err
    assert not (tmp_path / "v3").exists()


def test_unisolated_code_is_an_explicit_flag_for_the_program_task_only(capsys):
    assert main(["eval", "--model", "nowhere", "--task", "arithmetic", "--allow-unisolated-code"]) == 2
    assert "applies to tasks that run model code (program)" in capsys.readouterr().err
    args = argparse.Namespace(command="eval", task="program", task_arg=None, allow_unisolated_code=True)
    task = rl._task(args)
    assert task.allow_unisolated and task.sandbox.allow_unisolated
    assert "DANGEROUS" in capsys.readouterr().err
    assert not rl._task(argparse.Namespace(**{**vars(args), "allow_unisolated_code": False})).allow_unisolated

"""`nanoseek generate` streams what the engine generates; `nanoseek bench decode` runs end to end."""

import pytest
import torch
import transformers  # noqa: F401  (a dev dependency: `bench decode` runs it as the reference)

from nanoseek import ModelConfig, Transformer
from nanoseek.checkpoint.hf import save_pretrained
from nanoseek.checkpoint.tokenizer import train_tokenizer
from nanoseek.cli import main
from nanoseek.engine.engine import Engine
from nanoseek.engine.sampling import SamplingParams

from helpers import MICRO

TEXTS = [
    "What is 12 + 30? <think> 12 + 30 = 42 </think> <answer>42</answer>",
    "The quick brown fox jumps over the lazy dog.",
] * 20


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen")
    tok = train_tokenizer(TEXTS, vocab_size=320)
    cfg = ModelConfig(
        **{**MICRO, "vocab_size": 320, "q_lora_rank": 0, "first_k_dense_replace": 1},
        max_position_embeddings=128,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
    )
    torch.manual_seed(0)
    save_pretrained(Transformer(cfg), out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("extra", [[], ["--mtp"], ["--chat"]])
def test_generate_streams_the_engines_text(checkpoint, capsys, extra):
    args = [
        "generate",
        "--model",
        str(checkpoint),
        "--prompt",
        "What is 12",
        "--max-tokens",
        "12",
        "--temperature",
        "0",
    ]
    assert main(args + extra) == 0
    out = capsys.readouterr().out
    engine = Engine(str(checkpoint))
    prompt = "What is 12"
    if "--chat" in extra:
        prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    ref = engine.generate([engine.tokenizer.encode(prompt)], SamplingParams(max_tokens=12, temperature=0))[0]
    assert out == ref.outputs[0].text + "\n"


def test_generate_n_samples_seeded(checkpoint, capsys):
    args = [
        "generate",
        "--model",
        str(checkpoint),
        "--prompt",
        "The quick",
        "--max-tokens",
        "8",
        "--n",
        "3",
        "--seed",
        "4",
        "--top-k",
        "20",
        "--top-p",
        "0.9",
    ]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and first.count("--- sample") == 3


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "/nonexistent", "--prompt", "x"], "not a checkpoint directory"),
        (["--prompt", "x", "--temperature", "-1"], "temperature"),
        (
            [
                "--prompt",
                "",
            ],
            "empty",
        ),
    ],
)
def test_generate_bad_input_is_one_line_and_exit_2(checkpoint, capsys, args, message):
    if "--model" not in args:
        args = ["--model", str(checkpoint)] + args
    assert main(["generate"] + args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_bench_decode_runs_and_reports(checkpoint, capsys):
    assert (
        main(
            [
                "bench",
                "decode",
                "--model",
                str(checkpoint),
                "--rounds",
                "1",
                "--tokens",
                "4",
                "--prefill-len",
                "16",
                "--batch",
                "1",
                "2",
                "--bandwidth-mb",
                "16",
                "--prompt",
                "What is 12",
                "The quick brown fox",
            ]
        )
        == 0
    )  # prompts of two lengths
    out = capsys.readouterr().out
    for label in (
        "prefill tok/s",
        "decode tok/s, batch 1",
        "decode tok/s, batch 2",
        "memory-bandwidth limit",
        "MLA latent",
        "MTP self-speculative decoding",
    ):
        assert label in out, label

"""`--weights` and `--compile/--no-compile` reach `Engine(...)` from every command that builds one; a bad
format exits 2 naming the allowed ones; `bench decode --weights fp32 int8` measures each format."""

import logging

import pytest

from nanoseek.bench.decode import DecodeBenchConfig, run
from nanoseek.cli import main
from nanoseek.errors import NanoseekError
from nanoseek.model.quant import WEIGHT_FORMATS

pytestmark = pytest.mark.usefixtures("one_thread")


class EngineCalled(NanoseekError):
    """Raised by the stand-in Engine once it has its arguments: the command stops there, exit status 2."""


@pytest.fixture
def engine_kwargs(monkeypatch):
    """Every module that builds the engine for a command gets a stand-in that records its keyword arguments."""
    seen: dict = {}

    def fake_engine(*args, **kwargs):
        seen.update(kwargs)
        raise EngineCalled("engine arguments recorded")

    for module in ("nanoseek.cli.generate", "nanoseek.cli.chat", "nanoseek.cli.rl", "nanoseek.server.app"):
        monkeypatch.setattr(f"{module}.Engine", fake_engine)
    monkeypatch.setattr("nanoseek.cli.rl._load", lambda args: (None, None))  # eval loads before the engine
    # `serve` sets up the server's logger before it builds the app: restore it after the test.
    server_log = logging.getLogger("nanoseek.server")
    for attribute in ("handlers", "level", "propagate"):
        monkeypatch.setattr(server_log, attribute, getattr(server_log, attribute))
    monkeypatch.setattr(server_log, "handlers", [])
    return seen


@pytest.fixture
def model_dir(tmp_path):
    """Just enough of a checkpoint directory for the commands' own checks (the engine is a stand-in)."""
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    return str(tmp_path)


COMMANDS = {
    "generate": ["generate", "--prompt", "x"],
    "eval": ["eval", "--task", "arithmetic"],
    "serve": ["serve"],
    "chat": ["chat"],
}


# The server lets the engine decide whether to compile (None); one-shot commands default to eager.
DEFAULT_COMPILE = {"generate": False, "eval": False, "serve": None, "chat": False}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize(
    "flags,weights,compile",
    [
        ([], "fp32", "default"),
        (["--weights", "int8"], "int8", "default"),
        (["--weights", "int4", "--no-compile"], "int4", False),
    ],
)
def test_weights_and_compile_reach_the_engine(engine_kwargs, model_dir, capsys, command, flags, weights, compile):
    assert main(COMMANDS[command] + ["--model", model_dir] + flags) == 2
    assert "engine arguments recorded" in capsys.readouterr().err
    want = DEFAULT_COMPILE[command] if compile == "default" else compile
    assert engine_kwargs["weights"] == weights and engine_kwargs["compile"] is want


def test_compile_forced_on(engine_kwargs, model_dir):
    assert main(["generate", "--model", model_dir, "--prompt", "x", "--compile", "--weights", "bf16"]) == 2
    assert engine_kwargs["weights"] == "bf16" and engine_kwargs["compile"] is True


@pytest.mark.parametrize("command", sorted(COMMANDS) + ["bench decode"])
def test_bad_weights_exits_2_naming_the_formats(model_dir, capsys, command):
    argv = ["bench", "decode"] if command == "bench decode" else COMMANDS[command]
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--model", model_dir, "--weights", "int3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--weights" in err and "int3" in err and all(fmt in err for fmt in WEIGHT_FORMATS)


def test_bench_decode_passes_formats_and_compile(monkeypatch):
    seen = []
    monkeypatch.setattr("nanoseek.cli.generate.run", seen.append)
    assert main(["bench", "decode", "--preset", "tiny", "--weights", "fp32", "int8", "--compile"]) == 0
    assert main(["bench", "decode", "--preset", "tiny"]) == 0
    assert (seen[0].weights, seen[0].compile) == (["fp32", "int8"], True)
    assert (seen[1].weights, seen[1].compile) == (["fp32"], None)


def test_bench_decode_measures_each_format(capsys):
    cfg = DecodeBenchConfig(
        preset="tiny",
        no_reference=True,
        tokens=4,
        rounds=1,
        prefill_len=16,
        batch=[1, 2],
        bandwidth_mb=16,
        weights=["fp32", "int8"],
        compile=False,
    )
    med = run(cfg, log=print)
    for fmt in ("fp32", "int8"):
        for key in ("prefill/nanoseek", "decode1/nanoseek", "decode2/nanoseek", "active_bytes", "bandwidth_fraction"):
            assert med[f"{key}/{fmt}"] > 0, (key, fmt)
    # int8 stores its quantized matrices in a quarter of fp32's bytes (plus scales): far fewer bytes per token
    assert med["active_bytes/int8"] < 0.5 * med["active_bytes/fp32"]
    # the fp32 figures keep their keys from before the formats
    assert med["decode1/nanoseek"] == med["decode1/nanoseek/fp32"] and "bandwidth_fraction" in med
    assert "mtp/speedup" in med  # the tiny preset has an MTP module
    out = capsys.readouterr().out
    assert "fp32 weights" in out and "int8 weights" in out and out.count("decode tok/s, batch 2") == 2

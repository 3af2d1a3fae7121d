"""Shared fixtures: each parity configuration by name, one torch thread for tiny models, one `nanoseek zero
--preset smoke` run for the zero and distill tests, and the server tests' model and `nanoseek serve` processes
(here so that tests/test_server*.py share one set per session: a session fixture imported into two modules runs
twice). Shared helper functions live in helpers.py."""

import pytest
import torch

from nanoseek.checkpoint.tokenizer import Tokenizer
from nanoseek.engine.engine import Engine

from helpers import CONFIGS, random_model, think_checkpoint, variant


@pytest.fixture(params=sorted(CONFIGS))
def config_name(request):
    return request.param


@pytest.fixture(scope="module", params=["v3", "v3_mtp", "v32_sparse"])
def model_and_mtp(request):
    """(a random model, whether the engine speculates with its MTP module): V3, V3 with MTP, sparse V3.2."""
    name = request.param
    cfg = CONFIGS[name.removesuffix("_mtp")]
    if name.endswith("_mtp"):
        cfg = cfg.replace(num_nextn_predict_layers=1)
    return random_model(cfg).eval(), name.endswith("_mtp")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run as fast on one thread as on two, and far faster when other work shares the cores
    (a two-thread OpenMP step waits whenever another process holds a core). Modules of tiny-model tests
    use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def zero_smoke_run(tmp_path_factory):
    """One `nanoseek zero --preset smoke` run shared by the zero and distill tests (the run is the slowest
    fixture of the suite). No test changes it: a test that changes or resumes a run copies it to its own
    tmp_path first (shutil.copytree)."""
    from nanoseek.cli import main

    before = torch.get_num_threads()
    out = tmp_path_factory.mktemp("zero") / "run"
    try:
        assert main(["zero", "--preset", "smoke", "--out", str(out), "--threads", "1", "--no-progress"]) == 0
    finally:
        torch.set_num_threads(before)
    return out


# ---- the server tests' model that reasons and their `nanoseek serve` processes (tests/test_server*.py) --------
@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    base = think_checkpoint(tmp_path_factory.getbasetemp())
    return {
        "think": base,
        "zero": variant(base, "zero", template="r1_zero"),
        "small": variant(base, "small", context=48),
    }


@pytest.fixture(scope="session")
def servers(checkpoints, tmp_path_factory):
    """Three servers, started together: the deepseek-template model, the same weights with the R1-Zero
    template, and a locked one (API key, 48-token context, n <= 2) for auth and schemathesis."""
    from test_server import KEY, Server  # the server tests' own helpers (and openai, 1 s): only when they run

    logs = tmp_path_factory.mktemp("server-logs")
    started = {
        "think": Server(checkpoints["think"], "--served-model-name", "think", log=logs / "think.log"),
        "zero": Server(checkpoints["zero"], "--served-model-name", "zero", log=logs / "zero.log"),
        "locked": Server(
            checkpoints["small"],
            "--served-model-name",
            "small",
            "--api-key",
            KEY,
            "--max-n",
            "2",
            log=logs / "locked.log",
        ),
    }
    try:
        yield {k: s.wait_ready() for k, s in started.items()}
    finally:
        for s in started.values():
            s.stop()


@pytest.fixture(scope="session")
def server(servers):
    return servers["think"]


@pytest.fixture(scope="session")
def offline(checkpoints):
    """The same checkpoint in-process: what a request gives when run alone, straight on the engine."""
    return Engine(str(checkpoints["think"]))


@pytest.fixture(scope="session")
def tok(checkpoints):
    return Tokenizer.from_pretrained(checkpoints["think"])

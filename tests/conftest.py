"""Shared fixtures: each parity configuration by name, one torch thread for tiny models, and one `nanoseek zero
--preset smoke` run for the zero and distill tests. Shared helper functions live in helpers.py."""

import pytest
import torch

from helpers import CONFIGS


@pytest.fixture(params=sorted(CONFIGS))
def config_name(request):
    return request.param


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

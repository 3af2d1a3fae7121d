"""One stage of `nanoseek zero --nproc N`, run by each of N processes under torchrun (zero.py launches it):

    python -m torch.distributed.run --standalone --nproc-per-node N -m nanoseek.rl.zero_worker pretrain RUN_DIR \
        [--no-progress]

- pretrain: DDP over the ranks, each with batch_size / N sequences, so a step sees the run's batch.
- grpo: each rank rolls out prompts_per_step / N whole groups through its own engine; the update runs under
  DDP and equals one process's (distributed.py).

Every rank reads the run's config.json; rank 0 publishes the stage's model and writes its summary to
RUN_DIR/<stage>.result.json for the launching process.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

from nanoseek.fileio import atomic_write_json
from nanoseek.rl.zero import result_file, stage_grpo, stage_pretrain
from nanoseek.rl.zero_config import load_run_config
from nanoseek.train import parallel


def main(argv: list[str]) -> None:
    stage, run = argv[0], Path(argv[1])
    rank, world = parallel.init_distributed("cpu")
    progress = rank == 0 and "--no-progress" not in argv
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = load_run_config(run)
    if stage == "pretrain":
        cfg.train = replace(cfg.train, batch_size=cfg.train.batch_size // world)
        info = stage_pretrain(cfg, run, progress=progress, log=print if rank == 0 else lambda *a, **k: None)
    elif stage == "grpo":
        info = stage_grpo(cfg, run, progress=progress)
    else:
        raise SystemExit(f"zero_worker: unknown stage {stage!r} (pretrain or grpo)")
    if rank == 0:
        atomic_write_json(run / result_file(stage), info)
    parallel.shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])

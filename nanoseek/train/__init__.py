"""Pretraining: corpora to packed token batches (`data.py`), the trainer (`trainer.py`) with its settings and
schedule (`config.py`), its objective, held-out loss and FLOPs (`objective.py`), its run-directory and resume
checks (`resume.py`), atomic checkpoints and resume (`state.py`), the optimizer (`optim.py`),
`torch.distributed` (`parallel.py`: DDP, FSDP2, expert parallelism) and per-step metrics with their curves
(`metrics.py`).

Imports: `nanoseek.model`, `nanoseek.checkpoint`, `nanoseek.tasks`, `nanoseek.errors`, `nanoseek.fileio`.
"""

"""What `nanoseek zero` and `nanoseek distill` share: a resumable, timed runner of named stages that records
them in DIR/stages.json, and publishing a checkpoint's model and tokenizer as a clean HF directory.

    stages = Stages(run_dir, STAGES, fresh=not resume)
    stages.run("pretrain", lambda: {...}, log)           # skipped when stages.json says it is done
    publish_model(checkpoint_dir, run_dir / "model")     # replaced atomically
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from nanoseek.fileio import atomic_directory, atomic_write_json

STAGES_FILE = "stages.json"
# The files of a checkpoint that make up a servable model: config, weights (sharded or not), tokenizer.
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


class Stages:
    """DIR/stages.json: which stages are done, their wall time and small results; rewritten atomically.
    `order` names the stages in the order they run (the order of `seconds()`)."""

    def __init__(self, run_dir: Path, order: Sequence[str], fresh: bool):
        self.path = Path(run_dir) / STAGES_FILE
        self.order = tuple(order)
        self.data: dict[str, Any] = {} if fresh or not self.path.exists() else json.loads(self.path.read_text())

    def done(self, name: str) -> bool:
        return bool(self.data.get(name, {}).get("done"))

    def seconds(self) -> dict[str, float]:
        return {s: self.data[s]["seconds"] for s in self.order if s in self.data}

    def finish(self, name: str, seconds: float, **info: Any) -> None:
        prev = self.data.get(name, {}).get("seconds", 0.0)  # a resumed stage adds to its earlier time
        self.data[name] = {"done": True, "seconds": prev + seconds, **info}
        self._write()

    def interrupted(self, name: str, seconds: float) -> None:
        prev = self.data.get(name, {}).get("seconds", 0.0)
        self.data[name] = {"done": False, "seconds": prev + seconds}
        self._write()

    def run(
        self, name: str, fn: Callable[[], dict[str, Any] | None], log: Callable[[str], None], job: str = "zero"
    ) -> None:
        """Run stage `name` unless it is done: timed, its result recorded; a stage that raises (or is
        interrupted) keeps its time so far and stays not done, for --resume."""
        if self.done(name):
            log(f"{job}: {name}: done earlier ({self.data[name]['seconds']:.0f}s), skipped")
            return
        log(f"{job}: {name} ...")
        t0 = time.perf_counter()
        try:
            info = fn() or {}
        except BaseException:
            self.interrupted(name, time.perf_counter() - t0)
            raise
        self.finish(name, time.perf_counter() - t0, **info)
        log(f"{job}: {name}: {self.data[name]['seconds']:.1f}s")

    def _write(self) -> None:
        atomic_write_json(self.path, self.data)


def publish_model(src: Path, dst: Path) -> None:
    """Copy the model and tokenizer files of a checkpoint to a clean HF directory, atomically."""
    with atomic_directory(dst) as tmp:
        for name in MODEL_FILES:
            if (src / name).exists():
                shutil.copy2(src / name, tmp / name)
        for f in src.glob("model*.safetensors*"):  # the weights, and the index of sharded ones
            shutil.copy2(f, tmp / f.name)

"""The Ray actor of a run: a ShardRunner that reports a refused model through a task."""

from __future__ import annotations

from workers.model.source import ModelInputError
from workers.shard import ShardRunner


class Runner(ShardRunner):
    """ShardRunner as a Ray actor. A model its actor refuses (ModelInputError: a checkpoint or a scorer that
    fails the load-time check) is raised by ``ready``, a task, so that the driver gets the error itself: an
    actor constructor's error reaches it only as text."""

    def __init__(self, *args):
        self.refusal = None
        try:
            super().__init__(*args)
        except ModelInputError as exc:
            self.refusal = exc

    def ready(self) -> dict:
        if self.refusal is not None:
            raise self.refusal
        return super().ready()

"""The reference's one error type for bad checkpoints: it names the file and the key at fault."""
from __future__ import annotations


class CheckpointError(ValueError):
    def __init__(self, where: str, key: str | None, problem: str):
        self.where, self.key, self.problem = str(where), key, problem
        at = f" [{key}]" if key else ""
        super().__init__(f"{where}{at}: {problem}")

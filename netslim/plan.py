"""The Plan: the one JSON document that methods hand to surgery.

It names the base architecture and, per layer, the output channels to keep, the layers or blocks to
drop and the layers to factorize. It holds no weights, so it can be read, diffed, edited by hand and
replayed on a freshly built base model (that is how checkpoints reload).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from netslim.errors import NetslimError
from netslim.io import atomic_write_text

VERSION = 1


@dataclass
class Plan:
    arch: str
    num_classes: int
    input_size: tuple[int, int, int] = (3, 32, 32)
    keep: dict[str, list[int]] = field(default_factory=dict)
    drop: list[str] = field(default_factory=list)
    factorize: dict[str, dict[str, Any]] = field(default_factory=dict)
    classes: list[int] | None = None
    method: str = "identity"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def out_classes(self) -> int:
        return len(self.classes) if self.classes is not None else self.num_classes

    def widths(self) -> dict[str, int]:
        return {name: len(idx) for name, idx in self.keep.items()}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        return {"version": VERSION, **d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        d = dict(d)
        if d.pop("version", VERSION) > VERSION:
            raise NetslimError("plan was written by a newer netslim; upgrade to read it")
        try:
            plan = cls(**d)
        except TypeError as e:
            raise NetslimError(f"plan is malformed: {e}") from None
        plan.input_size = tuple(plan.input_size)  # type: ignore[assignment]
        plan.keep = {k: sorted(int(i) for i in v) for k, v in plan.keep.items()}
        return plan

    def save(self, path: Path) -> None:
        atomic_write_text(Path(path), self.to_json())

    @classmethod
    def load(cls, path: Path) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise NetslimError(f"plan file {path} does not exist")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise NetslimError(f"plan file {path} is not valid JSON: {e}") from None

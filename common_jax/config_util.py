"""Architecture configs as frozen dataclasses that round-trip through `model_config.json` (both systems)."""
from __future__ import annotations

import dataclasses
import json


class JsonConfig:
  """Mixin for a frozen dataclass: `from_dict` (unknown keys are an error naming them), `to_dict`, `to_json`."""

  @classmethod
  def from_dict(cls, d: dict, where: str = 'model config'):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f'{where}: unknown model config keys {unknown}; known keys are {sorted(names)}')
    return cls(**d)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

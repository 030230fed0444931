"""Per-(layer, KV head) cache budgets: the plan file ``CompressedCache`` and the commands accept.

    {"name": "my-plan", "model": "default", "num_layers": 30, "num_kv_heads": 3,
     "sinks": 4, "recent": null,
     "budgets": [[128, 96, 160], ...],     # one list of num_kv_heads ints per layer
     "merge": [[true, false, true], ...]}  # optional: per head, WeightedKV merges (true) or evicts

``recent: null`` gives every head the default split of its own budget (``budget // 2 - sinks``), so
a uniform plan is exactly the uniform cache. Memory is counted in slots: ``total_slots`` is the sum
of the budgets (what a ragged store would hold).

On a model with sliding-window layers (Gemma 2/3), ``"sliding_layers"`` lists them: ``CompressedCache``
leaves them to the model's own sliding cache, so their rows (the window, for information) are not
budgets and are left out of ``total_slots``, ``max_budget`` and ``min_budget``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from analysis.errors import UserError
from analysis.models.loading import builtin_name
from analysis.models.loading import sliding_layers as model_sliding_layers


@dataclass
class Plan:
    budgets: list[list[int]]
    sinks: int = 4
    recent: int | None = None
    merge: list[list[bool]] | None = None
    name: str = "plan"
    model: str | None = None
    sliding_layers: list[int] = field(default_factory=list)  # not compressed: their rows are no budgets
    # the model shape this plan was last checked against: each cache built on it asks again, the check runs once
    _checked: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        shape = {len(row) for row in self.budgets}
        if not self.budgets or len(shape) != 1 or 0 in shape:
            raise UserError("a plan needs one non-empty list of per-head budgets per layer, all of one length")
        if self.merge is not None and [len(r) for r in self.merge] != [len(r) for r in self.budgets]:
            raise UserError("the plan's 'merge' must have the same layers x heads shape as its 'budgets'")
        for layer, row in enumerate(self.budgets):
            for head, budget in enumerate(row):
                if not isinstance(budget, int) or budget <= self.head_recent(budget) + self.sinks:
                    raise UserError(f"plan budget {budget!r} at layer {layer}, KV head {head} must be an integer "
                                    f"above sinks + recent ({self.sinks} + "
                                    f"{self.head_recent(budget) if isinstance(budget, int) else '?'}): "
                                    f"the floor is {self.floor()}")

    # --- shape and totals ------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.budgets)

    @property
    def num_kv_heads(self) -> int:
        return len(self.budgets[0])

    @property
    def compressed_budgets(self) -> list[list[int]]:
        """The rows of the layers ``CompressedCache`` compresses (all but ``sliding_layers``)."""
        return [row for i, row in enumerate(self.budgets) if i not in self.sliding_layers]

    @property
    def total_slots(self) -> int:
        return sum(map(sum, self.compressed_budgets))

    @property
    def max_budget(self) -> int:
        return max(map(max, self.compressed_budgets))

    @property
    def min_budget(self) -> int:
        return min(map(min, self.compressed_budgets))

    def head_recent(self, budget: int) -> int:
        return self.recent if self.recent is not None else max(budget // 2 - self.sinks, 0)

    def floor(self) -> int:
        """The smallest budget a head can have: sinks + recent + 1."""
        return self.sinks + (self.recent if self.recent is not None else 0) + 1

    def recent_row(self, layer: int) -> list[int]:
        return [self.head_recent(b) for b in self.budgets[layer]]

    def merge_row(self, layer: int) -> list[bool] | None:
        return self.merge[layer] if self.merge is not None else None

    # --- checks against a model and a method ----------------------------------------------
    def check(self, config) -> None:
        """One-line error unless the plan is shaped layers x KV heads of ``config``."""
        layers = config.num_hidden_layers
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        sliding = sorted(model_sliding_layers(config))
        if self._checked == (layers, heads, sliding, self.num_layers, self.num_kv_heads, self.sliding_layers):
            return
        if (self.num_layers, self.num_kv_heads) != (layers, heads):
            made = f" (made for {self.model})" if self.model else ""
            raise UserError(f"plan {self.name!r}{made} is {self.num_layers} layers x {self.num_kv_heads} KV heads, "
                            f"but the model has {layers} x {heads}: it was made for another model")
        if sorted(self.sliding_layers) != sliding:
            raise UserError(f"plan {self.name!r} has sliding-window layers {sorted(self.sliding_layers)}, the model "
                            f"{sliding}: it was made for another model")
        self._checked = (layers, heads, sliding, self.num_layers, self.num_kv_heads, list(self.sliding_layers))

    def check_model(self, model_id: str) -> None:
        """One-line error when the plan records another built-in model than ``model_id`` (checked before the
        model loads; any other model is checked by shape in ``check``)."""
        ours, theirs = builtin_name(model_id), builtin_name(self.model or "")
        if ours and theirs and ours != theirs:
            raise UserError(f"plan {self.name!r} was made for model {self.model!r}, not {model_id!r}: "
                            "make a plan for this model (heads profile, then heads plan)")

    def check_policy(self, policy) -> None:
        if policy.per_layer and any(len(set(row)) > 1 for row in self.budgets):
            raise UserError(f"{policy.name} makes one decision per layer: a plan for it must give every KV head "
                            "of a layer the same budget")
        if not policy.compresses:
            raise UserError("method 'full' keeps everything: a plan has no effect on it")

    def check_total(self, total: int | None) -> None:
        if total is not None and self.total_slots > total:
            raise UserError(f"plan {self.name!r} holds {self.total_slots} slots, more than --total-budget {total}")

    # --- construction and files -----------------------------------------------------------
    @classmethod
    def uniform(cls, num_layers: int, num_kv_heads: int, budget: int, sinks: int = 4,
                recent: int | None = None, name: str | None = None, model: str | None = None) -> "Plan":
        return cls([[budget] * num_kv_heads for _ in range(num_layers)], sinks, recent,
                   name=name or f"uniform-{budget}", model=model)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        try:
            return cls.from_text(path.read_text(), str(path))
        except FileNotFoundError:
            raise UserError(f"plan file {path} does not exist") from None
        except UnicodeDecodeError as err:
            raise UserError(f"plan file {path} is not valid JSON ({err})") from None

    @classmethod
    def from_text(cls, text: str, where: str = "the plan") -> "Plan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"plan file {where} is not valid JSON ({err})") from None
        if not isinstance(data, dict) or "budgets" not in data:
            raise UserError(f"plan file {where} has no 'budgets' (a list of per-head budgets per layer)")
        known = {"budgets", "sinks", "recent", "merge", "name", "model", "sliding_layers"}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json(self) -> dict:
        data = asdict(self)
        del data["_checked"]  # bookkeeping, not the plan
        if not self.sliding_layers:  # files of models without sliding layers stay as they were
            del data["sliding_layers"]
        return data | {"num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads,
                       "total_slots": self.total_slots}

    def save(self, path: str | Path) -> Path:
        """Write atomically (a temp file renamed into place)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_json(), f, indent=1)
        os.replace(tmp, path)
        return path

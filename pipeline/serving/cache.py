"""A least-recently-used map with a budget: what a serving replica keeps of its subjects.

Each entry has a cost (1 for a count budget, bytes for a memory budget). Putting an entry over
the budget evicts the least recently used ones first, calling `on_evict(key, value)` for each,
so the owner can free what the value holds (a LoRA slot in the UNet, a tensor on the GPU).
An entry that alone costs more than the budget is refused with ValueError. No torch, no Ray.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any


class LruBudget:
    def __init__(self, budget: float, on_evict: Callable[[Hashable, Any], None] | None = None) -> None:
        self.budget = budget
        self.on_evict = on_evict
        self._entries: OrderedDict[Hashable, tuple[Any, float]] = OrderedDict()
        self.used = 0.0

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[Hashable]:
        """Least recently used first."""
        return list(self._entries)

    def get(self, key: Hashable) -> Any:
        """The value of `key` (now the most recently used), or None."""
        if key not in self._entries:
            return None
        self._entries.move_to_end(key)
        return self._entries[key][0]

    def put(self, key: Hashable, value: Any, cost: float = 1.0) -> None:
        """Add or replace `key`, evicting the least recently used others to stay in budget."""
        if cost > self.budget:
            raise ValueError(f"{key} costs {cost:g}, more than the whole budget {self.budget:g}")
        if key in self._entries:
            self.used -= self._entries.pop(key)[1]
        self.make_room(cost)
        self._entries[key] = (value, cost)
        self.used += cost

    def make_room(self, cost: float = 1.0) -> None:
        """Evict the least recently used entries until `cost` more fits the budget (before the
        owner takes what an entry of that cost needs, such as a free LoRA slot)."""
        while self._entries and self.used + cost > self.budget:
            old_key, (old_value, old_cost) = self._entries.popitem(last=False)
            self.used -= old_cost
            if self.on_evict is not None:
                self.on_evict(old_key, old_value)

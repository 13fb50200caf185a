"""A worker's capacity for something that requests hold while they run (images in flight, bytes
of downloaded files): taken all at once or refused at once, never queued for."""

from __future__ import annotations


class Capacity:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0

    @property
    def full(self) -> bool:
        return self.used >= self.capacity

    def try_take(self, count: int) -> bool:
        if self.used + count > self.capacity:
            return False
        self.used += count
        return True

    def give_back(self, count: int) -> None:
        self.used -= count

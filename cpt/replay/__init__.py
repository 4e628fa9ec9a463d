"""Experience replay: the disk-backed buffer (what is stored, which rows are drawn) and the
background prefetcher that reads drawn rows ahead of the training step."""

from cpt.replay.buffer import POLICIES, ReplayBuffer, capacity_rows_from
from cpt.replay.prefetch import ReplayPrefetcher

__all__ = ["POLICIES", "ReplayBuffer", "ReplayPrefetcher", "capacity_rows_from"]

"""Work split across data-parallel ranks (torchrun) and gathered back in order, with progress.

Batches are formed once, the same way on every world size (units sorted by length, longest
first, then cut into batches), and dealt to ranks round-robin; so every unit is computed in the
same batch as in a single process and the gathered results equal the single-process ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch.distributed as dist
from tqdm import tqdm


class Executor:
    def __init__(self, batch_size: int | None = None, progress: bool = True):
        self.batch_size = batch_size  # None: each task's micro-batch-size
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        self.progress = progress and self.rank == 0

    def map(
        self,
        units: Sequence,
        run_batch: Callable[[list], list],
        batch_size: int,
        length: Callable = len,
        desc: str = "",
    ) -> list:
        """run_batch(units of one batch) -> one result per unit; returns the results of all units in
        their order, on every rank."""
        size = self.batch_size or batch_size
        order = sorted(range(len(units)), key=lambda i: -length(units[i]))
        batches = [order[s : s + size] for s in range(0, len(order), size)]
        mine = batches[self.rank :: self.world]
        results: dict[int, object] = {}
        with tqdm(
            total=sum(map(len, mine)) * self.world,
            desc=desc,
            unit="item",
            disable=not self.progress,
            leave=False,
            dynamic_ncols=True,
        ) as bar:
            for batch in mine:
                for i, result in zip(batch, run_batch([units[i] for i in batch])):
                    results[i] = result
                bar.update(len(batch) * self.world)  # the other ranks move at about the same pace
        if self.world > 1:
            gathered: list[dict] = [{} for _ in range(self.world)]
            dist.all_gather_object(gathered, results)
            results = {i: r for part in gathered for i, r in part.items()}
        return [results[i] for i in range(len(units))]

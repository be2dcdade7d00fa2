"""The order in which a training run reads its shard files (no Ray needed)."""

from __future__ import annotations

from upath import UPath

from components.train.data import pass_order


def test_each_pass_reads_every_file_once_in_its_own_order():
    paths = [UPath(f"shards/{i:05d}.tar") for i in range(6)]
    order = pass_order(paths, passes=8, seed=3)
    passes = [order[i:i + len(paths)] for i in range(0, len(order), len(paths))]
    assert len(passes) == 8 and all(sorted(p, key=str) == paths for p in passes)
    assert len({tuple(map(str, p)) for p in passes}) > 1  # not one order repeated
    assert pass_order(paths, passes=8, seed=3) == order  # a seed gives its order back
    assert pass_order(paths, passes=8, seed=4) != order
    assert sorted(pass_order(paths, passes=1, seed=0), key=str) == paths

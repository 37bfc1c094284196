"""gather_meter across real gloo processes: uneven shards and a repeated image give the single-process metrics."""

from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mlgcn_dist.metrics import AveragePrecisionMeter, gather_meter

NUM_IMAGES, NUM_CLASSES = 23, 5
# Rows each rank evaluates, per world size: uneven, and in the 3-rank case one rank has nothing at all.
SHARDS = {2: [(0, 9), (9, 23)], 3: [(0, 0), (0, 15), (15, 23)]}


def evaluation_set() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores, 1/0/-1 targets and sparse, unordered image ids (as COCO's), the same in every process."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(NUM_IMAGES, NUM_CLASSES, generator=generator)
    targets = torch.randint(-1, 2, (NUM_IMAGES, NUM_CLASSES), generator=generator)
    targets[0] = 1  # every class has a positive
    image_ids = torch.randperm(1000, generator=generator)[:NUM_IMAGES]
    return scores, targets, image_ids


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def evaluate_on_ranks(rank: int, port: int, out_dir: str) -> None:
    """One process of a 3-rank gloo group; also gathers within the 2-rank subgroup {0, 1}."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=3, timeout=datetime.timedelta(seconds=60))
    try:
        scores, targets, image_ids = evaluation_set()
        pair = dist.new_group([0, 1])  # every rank must take part in creating a group
        for world_size, group in ((3, None), (2, pair)):
            if rank >= world_size:
                continue
            start, stop = SHARDS[world_size][rank]
            meter = AveragePrecisionMeter()
            meter.add(scores[start:stop], targets[start:stop], image_ids[start:stop])
            if rank == world_size - 1:  # a repeated sample, as a distributed sampler pads the last rank
                meter.add(scores[:1], targets[:1], image_ids[:1])
            merged, duplicates = gather_meter(meter, group)
            result = {
                "metrics": merged.compute(),
                "top3": merged.compute(top_k=3),
                "duplicates": duplicates,
                "image_ids": merged.state()["image_ids"].tolist(),
            }
            Path(out_dir, f"world{world_size}_rank{rank}.json").write_text(json.dumps(result))
        Path(out_dir, f"counter_ids_rank{rank}.txt").write_text(gather_error_when_rank_1_has_no_ids(rank))
    finally:
        dist.destroy_process_group()


def gather_error_when_rank_1_has_no_ids(rank: int) -> str:
    """Counter ids are not unique across ranks: every rank, not only rank 1, must refuse (none left waiting)."""
    meter = AveragePrecisionMeter()
    if rank == 1:
        meter.add(torch.zeros(2, NUM_CLASSES), torch.zeros(2, NUM_CLASSES))
    try:
        gather_meter(meter)
    except ValueError as err:
        return str(err)
    return "no error"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_gather_on_two_and_three_ranks_counts_each_image_once_and_matches_one_process(tmp_path):
    """Also: a rank without image ids makes every rank raise instead of hanging."""
    mp.spawn(evaluate_on_ranks, args=(free_port(), str(tmp_path)), nprocs=3, join=True)
    scores, targets, image_ids = evaluation_set()
    single = AveragePrecisionMeter()
    single.add(scores, targets, image_ids)
    expected = json.loads(json.dumps({"metrics": single.compute(), "top3": single.compute(top_k=3)}))
    for world_size in (2, 3):
        for rank in range(world_size):
            result = json.loads((tmp_path / f"world{world_size}_rank{rank}.json").read_text())
            assert result["duplicates"] == 1
            assert result["image_ids"] == sorted(image_ids.tolist())
            assert result["metrics"] == expected["metrics"]
            assert result["top3"] == expected["top3"]
            assert result["metrics"]["num_images"] == NUM_IMAGES
    for rank in range(3):
        assert "without image ids" in (tmp_path / f"counter_ids_rank{rank}.txt").read_text()

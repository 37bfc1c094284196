"""Training entry point for `accelerate launch`, `torchrun` and plain `python`.

    accelerate launch [--config_file configs/accelerate/multi_gpu.yaml] launch/train.py \
        --config configs/coco_gcn.yaml [section.key=value ...]

Exit status: 0 done, 2 configuration error, 75 preempted and checkpointed (requeue me).
"""

import sys

from mlgcn_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))

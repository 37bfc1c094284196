"""Data: dataset readers (COCO, VOC), the synthetic toy set, shard packing, loaders and transforms."""

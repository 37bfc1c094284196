"""mlgcn-dist: distributed training of ML-GCN multi-label image recognition."""

__version__ = "0.1.0"

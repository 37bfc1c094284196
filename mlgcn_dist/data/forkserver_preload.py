"""Imported once by the forkserver that starts the loader's workers (``data.worker_start=forkserver``), before it
forks the first one.

Each worker is then forked with torch and the loader already imported (a worker started bare spends seconds
importing them, at every loader start), and with the trainer's stop signals ignored and blocked until its
worker_init_fn: a SIGTERM from SLURM before then would otherwise end it, and the trainer would fail on the lost
worker instead of saving. The forkserver itself runs no thread of the trainer's, so forking it cannot deadlock the
way forking the trainer can (CPython gh-112275). The stop signals cannot end it either; it ends with the trainer
(its pipe closes).
"""

import mlgcn_dist.data.loader  # noqa: F401  (what its workers run, imported once here)
from mlgcn_dist.data.workers import serve_workers_with_stop_signals_held

serve_workers_with_stop_signals_held()

"""Imported once by the forkserver that starts the loader's workers (``data.worker_start=forkserver``), before it
forks the first one.

Each worker is then forked with torch and the loader already imported (a worker started bare spends seconds
importing them, at every loader start), and ignores the trainer's stop signals from its first instruction: a
SIGTERM from SLURM in those seconds would otherwise end it, and the trainer would fail on the lost worker instead
of saving. The forkserver itself runs no thread of the trainer's, so forking it cannot deadlock the way forking
the trainer can (CPython gh-112275). It ignores the stop signals too; it ends with the trainer (its pipe closes).
"""

from mlgcn_dist.data.loader import _leave_stop_signals_to_the_trainer

_leave_stop_signals_to_the_trainer()

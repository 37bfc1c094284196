"""The GPU data path's decode and augment in a process of its own (``data.augment_process``).

Why a process: on an H100 the training process's launching thread slowed while the prefetch helper thread decoded
and augmented beside it (run H: 26.5 us between two of its CUDA calls while the helper issued its own, 18.3 while
it did not), but not while fifteen loader worker processes decoded JPEGs on the host's other cores (15.5 us, the
ceiling's): threads of one process share its GIL and its CUDA context, processes share neither. Here the helper
thread only copies the JPEG bytes into shared memory and waits without the GIL; a spawned process decodes them
(nvJPEG on CUDA) and augments them with :class:`~mlgcn_dist.data.transforms.GpuAugment`, as the helper would.

Why one shared output buffer and not a tensor sent per batch: a CUDA tensor received through torch.multiprocessing
synchronises the receiver's current stream when it is freed (the IPC deleter in torch/csrc/StorageSharing.cpp),
a host sync each step. So the trainer allocates the output buffer once and shares it (again only when a batch
outgrows it; outside expandable segments, which a child cannot receive everywhere: :func:`ipc_shareable_allocations`),
and two interprocess CUDA events order its use:

* the child's stream waits for ``free`` before writing a batch into the buffer, and records ``ready`` after;
* the trainer's stream (the prefetch stream) waits for ``ready``, copies the batch out (a device copy: 0.15 GB for
  64 images at 448 px in float32, a fraction of a millisecond) and records ``free``.

Each request is sent after the trainer recorded ``free`` and each reply after the child recorded ``ready``, so
each wait is for the record just before it. On CPU (the tests, CPU runs) the buffers are shared memory and the copy
is synchronous: the same protocol without events. One batch is in the child at a time: the prefetch helper calls
in order, and the child's 2,400 img/s (the data path alone on an H100, run H) leave it idle most of a step.

The child leaves the stop signals to the trainer, as the loader's workers do (a preemption must find it alive
while the trainer saves), and ends when the trainer does: its end of the pipe then reads end-of-file. A child that
dies, or fails on a batch, is an :class:`AugmentProcessError` in the trainer naming it, never a hang.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import threading
import time
import traceback
import weakref
from collections.abc import Iterator
from multiprocessing.connection import Connection

import torch
import torch.multiprocessing as mp

from mlgcn_dist.data.folder import PackedJpegs
from mlgcn_dist.data.transforms import GpuAugment, empty_batch
from mlgcn_dist.data.workers import (
    end_workers_at_exit,
    leave_stop_signals_to_the_trainer,
    start_resource_tracker,
    stop_signals_blocked,
)

# Devices whose memory another process can map: CUDA (IPC handles) and the host's (shared memory).
DEVICES = ("cuda", "cpu")
# How long a wait for the child goes without looking whether it is alive.
_LOOKED_AT_EVERY_S = 1.0
# How long ``close`` gives the child to stop after asking it to, and a failing call to end after it is killed.
_STOP_GRACE_S = 10.0
# The allocator setting that ``ipc_shareable_allocations`` turns off while it allocates (PyTorch spells it so).
_EXPANDABLE_ON = re.compile(r"expandable_segments\s*:\s*True")


class AugmentProcessError(RuntimeError):
    """The augment process died, did not answer in time, or failed on a batch; the message says which and why."""


class AugmentProcess:
    """A spawned process that decodes and augments batches of JPEGs for one ``device``, as :class:`GpuAugment`
    would in this process; :meth:`augment` gives the callable that ``to_device`` takes as its ``augment``.

    Started on the first batch (or by :meth:`start`, to overlap its start-up with other work), stopped by
    :meth:`close` (or at exit). ``timeout_s``: how long a batch (the first one with the child's start-up) may take
    before the run fails (0: no limit), as ``data.worker_timeout_s`` bounds a loader worker.
    """

    def __init__(self, device: torch.device | str, size: int, channels_last: bool, timeout_s: float = 600.0) -> None:
        device = _indexed(device)
        if device.type not in DEVICES:
            raise ValueError(f"the augment process shares its batches through memory another process can map: "
                             f"a device of type {', '.join(DEVICES)}, not {device}")
        if device.type == "cuda" and (backend := torch.cuda.memory.get_allocator_backend()) != "native":
            # PyTorch's cudaMallocAsync backend shares no memory through CUDA IPC ("does not yet support
            # shareIpcHandle"): without this, the first batch would fail in the trainer's send or the child's receive.
            raise ValueError(f"the augment process shares its output buffer with the trainer through CUDA IPC, which "
                             f"PyTorch's {backend} allocator cannot (PYTORCH_CUDA_ALLOC_CONF=backend:{backend}); "
                             "use the native allocator (the default) or data.augment_process=false")
        self.device, self.size, self.channels_last, self.timeout_s = device, size, channels_last, timeout_s
        self._lock = threading.Lock()  # one batch in the child at a time, whichever thread asks
        self._process: mp.Process | None = None
        self._conn: Connection | None = None
        self._broken: str | None = None  # why the child can take no more batches
        self._sent = 0  # batches sent: each reply names the one it answers
        self._started = False  # whether the child said it is ready
        self._inbox: torch.Tensor | None = None  # shared uint8 bytes of the batch's JPEGs
        self._outbox: torch.Tensor | None = None  # shared float [capacity, 3, size, size]: the augmented batch
        self._ready = self._free = None
        if device.type == "cuda":
            # Made now, on the buffer's device: a CUDA event is made when first used, on the current device of the
            # thread using it (recording it on another device's stream is an error), and its first use would
            # otherwise be its handle sent to the child, from whichever thread starts it. A platform without CUDA
            # IPC (Jetson's, pytorch/pytorch#60401) refuses the handle: said here, as the trainer is built.
            with torch.cuda.device(device):
                self._ready = torch.cuda.Event(interprocess=True)
                self._free = torch.cuda.Event(interprocess=True)
                try:
                    for event in (self._ready, self._free):
                        event.ipc_handle()
                except RuntimeError as err:
                    raise ValueError(f"the augment process shares CUDA events and memory with the trainer through "
                                     f"CUDA IPC, which this platform refused: {err}") from err
        self._finalizer: weakref.finalize | None = None
        # The child's host seconds of the last call's decode and augment launches (what GpuAugment's ``decode``
        # and ``apply`` took there; none for a batch with no JPEG): `mlgcn bench train` reports them beside the
        # helper's wait.
        self.last_batch_s: dict[str, float] = {}

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def augment(self, train: bool) -> RemoteAugment:
        """A callable with :class:`GpuAugment`'s signature, whose batches the child augments for training
        (random crop + flip) or evaluation (the whole frame)."""
        return RemoteAugment(self, train)

    def start(self) -> None:
        """Spawn the child (if not yet) without waiting for it: the first batch waits for its start-up."""
        if self._process is not None:
            return
        if self._broken is not None:
            raise AugmentProcessError(f"the augment process cannot start again: {self._broken}")
        context = mp.get_context("spawn")  # a CUDA context cannot be forked
        ours, theirs = context.Pipe(duplex=True)
        process = context.Process(
            target=_serve, args=(theirs, str(self.device), self.size, self.channels_last, self._ready, self._free),
            name="mlgcn-augment", daemon=True,
        )
        start_resource_tracker()
        end_workers_at_exit()  # at exit it is SIGKILLed: multiprocessing's hook would SIGTERM it, which it ignores
        with stop_signals_blocked():  # the child starts with them blocked, and ignores them before it unblocks
            process.start()
        theirs.close()  # the child holds its end: the trainer's end reads end-of-file once the child is gone
        self._process, self._conn = process, ours
        self._finalizer = weakref.finalize(self, _stop, process, ours)

    def close(self) -> None:
        """Stop the child (asked, then killed) and free the shared buffers; idempotent."""
        if self._finalizer is not None:
            self._finalizer()
        self._process = self._conn = self._finalizer = None
        self._inbox = self._outbox = None
        self._broken = "it was closed"

    def __enter__(self) -> AugmentProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(
        self, jpegs: PackedJpegs, train: bool, rng: random.Random, device: torch.device | str, channels_last: bool,
    ) -> tuple[torch.Tensor, list[int]]:
        """``GpuAugment(size, train)(jpegs, device, rng, channels_last)``, computed by the child; ``rng`` advances
        as it would have here."""
        self.last_batch_s = {}
        device = _indexed(device)
        if device != self.device or channels_last != self.channels_last:
            raise ValueError(f"the augment process writes batches on {self.device} "
                             f"(channels_last={self.channels_last}); asked for {device} (channels_last={channels_last})")
        if not jpegs:  # a batch whose samples all failed in the workers: nothing to send
            return empty_batch(self.size, device, channels_last), []
        with self._lock:
            if self._broken is not None:
                raise AugmentProcessError(f"the augment process can take no more batches: {self._broken}")
            self.start()
            if not self._started:
                self._await("started", 0)
                self._started = True
            nbytes = jpegs.data.numel()
            grown = self._make_room(nbytes, len(jpegs))
            self._inbox[:nbytes].copy_(jpegs.data)  # packed by the loader's worker: one copy, no tensor a file
            self._sent += 1
            self._send(("batch", self._sent, jpegs.lengths, rng, train, grown))
            kept, state, self.last_batch_s = self._await("done", self._sent)
            rng.setstate(state)
            images = self._outbox[: len(kept)]
            if self._ready is None:
                return images.clone(), kept
            stream = torch.cuda.current_stream(device)
            stream.wait_event(self._ready)
            images = images.clone()  # the layout kept: channels_last stays channels_last
            self._free.record(stream)
            # The buffer came from this stream's or an earlier helper's pool (a prefetch makes a stream each
            # epoch): its memory is not handed out again, once replaced or closed, before this copy has read it.
            self._outbox.record_stream(stream)
            return images, kept

    def _make_room(self, nbytes: int, count: int) -> dict[str, torch.Tensor]:
        """Shared buffers large enough for this batch, replaced (and sent to the child) when it outgrows them."""
        grown = {}
        if self._inbox is None or self._inbox.numel() < nbytes:
            self._inbox = grown["inbox"] = torch.empty(nbytes * 3 // 2, dtype=torch.uint8).share_memory_()
        if self._outbox is None or self._outbox.shape[0] < count:
            memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
            with ipc_shareable_allocations():
                outbox = torch.empty(count, 3, self.size, self.size, device=self.device, memory_format=memory_format)
            self._outbox = grown["outbox"] = outbox.share_memory_() if self.device.type == "cpu" else outbox
        return grown

    def _send(self, message: tuple) -> None:
        try:
            self._conn.send(message)
        except OSError as err:  # the child is gone: say how it ended
            self._fail(f"could not be sent batch {self._sent} ({err})")

    def _await(self, kind: str, seq: int) -> tuple:
        """The child's reply to batch ``seq`` (0: its start-up); its failure, death or silence raised."""
        waited_from = time.monotonic()
        while not self._conn.poll(_LOOKED_AT_EVERY_S):
            if not self._process.is_alive():
                break
            if self.timeout_s and time.monotonic() - waited_from > self.timeout_s:
                self._fail(f"gave no answer in {self.timeout_s:g} s (data.worker_timeout_s)", seq, kill=True)
        try:
            reply = self._conn.recv()
        except (EOFError, OSError):
            self._fail("ended", seq)
        if reply[0] == "error":
            if seq == 0:
                self._broken = "it failed to start"
            # The GPU recipes turn the process on: where it cannot start (a GPU in Exclusive_Process compute mode
            # admits one process), the way on is the thread in the trainer.
            how = "to start (data.augment_process=false decodes in the trainer)" if seq == 0 else f"on batch {seq}"
            raise AugmentProcessError(f"the augment process (pid {self.pid}) failed {how}:\n{reply[2]}")
        if reply[:2] != (kind, seq):
            self._fail(f"answered {reply[:2]} where ({kind!r}, {seq}) was due", seq, kill=True)
        return reply[2:]

    def _fail(self, what: str, seq: int | None = None, kill: bool = False) -> None:
        """Raise that the child ``what``, with its exit code once it has ended; no batch is sent to it after."""
        process = self._process
        if kill:
            process.kill()
        process.join(_STOP_GRACE_S)
        code = process.exitcode
        ended = "" if code is None else f": exit code {code}" + (f" (signal {-code})" if code < 0 else "")
        during = "" if seq is None else (" while starting" if seq == 0 else f" while augmenting batch {seq}")
        self._broken = f"the augment process (pid {process.pid}) {what}{during}{ended}"
        raise AugmentProcessError(self._broken)


class RemoteAugment:
    """:class:`AugmentProcess` behind :class:`GpuAugment`'s call signature, for one of training or evaluation."""

    def __init__(self, process: AugmentProcess, train: bool) -> None:
        self.process, self.train = process, train

    def __call__(
        self, jpegs: PackedJpegs, device: torch.device | str, rng: random.Random, channels_last: bool = False
    ) -> tuple[torch.Tensor, list[int]]:
        return self.process.run(jpegs, self.train, rng, device, channels_last)


@contextlib.contextmanager
def ipc_shareable_allocations() -> Iterator[None]:
    """CUDA memory allocated in this block can be mapped by another process on any host: it is allocated outside
    the caching allocator's expandable segments (``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``) while they
    are on, and the allocator's settings are as they were after it.

    Why: expandable segments are mapped with CUDA's virtual memory API, and the process receiving one takes the
    sender's file descriptor for it with ``pidfd_getfd``, which the kernel allows only to a process that may
    ptrace the sender: under Yama's ``ptrace_scope=1`` (Ubuntu's default: only an ancestor may) not the trainer's
    own child, unless it holds ``CAP_SYS_PTRACE``, which containers drop by default (pytorch/pytorch#165685:
    "pidfd_getfd: Operation not permitted"). Memory from ``cudaMalloc`` is shared through a CUDA IPC handle, with
    no such check. The allocator honours expandable segments turned off for a while, for this purpose (its
    ``get_free_block`` then hands out no expandable block).
    The setting is process-wide: the training thread's allocations meanwhile (the buffer is allocated once, or
    when a batch outgrows it) come from ``cudaMalloc`` too, which costs them nothing but fragmentation.
    """
    get = getattr(torch._C, "_accelerator_getAllocatorSettings", None)  # an older torch has neither: left as it is
    put = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    settings = get() if get is not None and put is not None else ""
    turned_off = _EXPANDABLE_ON.sub("expandable_segments:False", settings)
    if turned_off == settings:
        yield
        return
    # The other settings named again: setting them resets max_split_size_mb, garbage_collection_threshold and
    # roundup_power2_divisions where they are not named (AcceleratorAllocatorConfig::parseArgs).
    put(turned_off)
    try:
        yield
    finally:
        put(settings)


def _indexed(device: torch.device | str) -> torch.device:
    """``device`` with its index: a CUDA device without one is the current device (what the child must open, and
    what a call's device is compared with)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _stop(process: mp.Process, conn: Connection) -> None:
    """Ask the child to stop, and kill it if it has not within a grace period (it ignores SIGTERM); close the
    pipe."""
    try:
        conn.send(("stop",))
    except OSError:
        pass  # already gone
    process.join(_STOP_GRACE_S)
    if process.is_alive():
        process.kill()
        process.join()
    conn.close()


def _serve(
    conn: Connection, device_name: str, size: int, channels_last: bool,
    ready: torch.cuda.Event | None, free: torch.cuda.Event | None,
) -> None:
    """The child: augment each batch sent, into the shared output buffer, until told to stop or the trainer is
    gone. A failure on one batch is sent back (the trainer raises it); the child goes on with the next."""
    leave_stop_signals_to_the_trainer()
    logging.basicConfig(format="[augment process] %(levelname)s %(name)s: %(message)s")
    try:
        torch.set_num_threads(1)  # its CPU work is the decoders' and the crop draw, one batch at a time
        device = torch.device(device_name)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        augments = {True: GpuAugment(size, train=True), False: GpuAugment(size, train=False)}
        conn.send(("started", 0))
    except Exception:  # noqa: BLE001 - sent to the trainer, which raises it
        conn.send(("error", 0, traceback.format_exc()))
        return
    inbox = outbox = None
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the trainer is gone
            return
        if message[0] == "stop":
            return
        _, seq, lengths, rng, train, grown = message
        inbox, outbox = grown.get("inbox", inbox), grown.get("outbox", outbox)
        try:
            jpegs = PackedJpegs(inbox[: sum(lengths)], lengths)  # the batch as the trainer was given it
            if free is not None:
                torch.cuda.current_stream(device).wait_event(free)  # the trainer has copied the last batch out
            augment = augments[train]  # GpuAugment's call, in its parts, each timed
            started = time.perf_counter()
            images, kept = augment.decode(jpegs.files(), device)
            decoded = time.perf_counter()
            images = augment.apply(images, augment.crops(images, rng), device, channels_last)
            augmented = time.perf_counter()
            outbox[: len(kept)].copy_(images)
            if ready is not None:
                ready.record(torch.cuda.current_stream(device))
            reply = ("done", seq, kept, rng.getstate(), {"decode": decoded - started, "augment": augmented - decoded})
        except Exception:  # noqa: BLE001 - sent to the trainer, which raises it
            reply = ("error", seq, traceback.format_exc())
        try:
            conn.send(reply)
        except OSError:  # the trainer is gone
            return

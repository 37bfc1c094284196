"""Throughput benchmarks (``mlgcn bench train`` and ``mlgcn bench loader``): where training time goes.

``bench train`` times training steps (forward, loss, backward, clipping, SGD with the backbone/head parameter
groups) on one device, in one process, in these phases:

* ceiling: synthetic tensors already on the device, with the run's settings (precision, channels_last,
  compile, batch size): the fastest this model can train here;
* end to end: the same settings fed by the real training loader from shards, decoding JPEGs in the CPU
  workers (PIL), then on the device (nvJPEG; without CUDA, torchvision's CPU decoder), both with the device
  conversion running ``data.device_prefetch`` batches ahead as in the engine; and once more decoding on the
  device inline (``e2e_decode_gpu_inline``), which shows what running ahead gains, and with only the decode
  ahead on the helper, the augment launched by the training loop (``e2e_decode_gpu_augment_in_loop``, which
  the engine does not do: an experiment, see :func:`~mlgcn_dist.bench.phases.augment_in_loop_conversion`); the batches the loader's
  workers queued during the warm-up are dropped and the timed steps are whole rounds of the workers
  (:class:`~mlgcn_dist.bench.window.LoaderQueue`), so a loader slower than the model is timed at its steady rate;
* with ``--ceiling-each``, the ceiling before each end-to-end phase after the first
  (``ceiling_before_<phase>``), and each phase's ratio to the one measured just before it
  (``<phase>/ceiling_before``): where the host's pace drifts over the run (run I, README Performance);
* with ``--pinned-ceiling``, the ceiling right after the first with the loop thread and the backward's each held
  on one core (``ceiling_pinned``, and ``ceiling_pinned/ceiling``): whether its launching threads' moves between
  cores cost the host its pace;
* the ceiling again (``ceiling_repeat``): its difference from the first is the drift of the device (or of its
  host) over the run, the spread to read the ratios against;
* reference: the original ML-GCN setting (fp32 without TF32, NCHW, eager, CPU decode) on the same data;

and, without training, the GPU data path alone (``data_gpu``: loader, decode, augment, run ahead as in training).
Every phase of one model starts from the same initial weights (``TrainStep.restart``). An end-to-end phase that
fails is reported (``failed_phases``: name -> its error) and the phases after it still run.

End to end / ceiling is what the input pipeline costs; end to end / reference is what the settings gain over
the original code. The data-wait fraction ("wait") is the share of the timed window the host spent blocked
waiting for the next batch (loader and device-side decode together); on a GPU the device may meanwhile still run
the steps already queued, so what throughput loses is the data-stall fraction ("stall", CUDA only): the share of
the window the training stream sat idle while the loop waited for its batch.
MFU is the achieved training FLOP rate (3x the forward's, per image) over the device's dense peak for the
phase's numerics. Each end-to-end phase also reports the host time of the device conversion per batch
(``convert_ms``; on the GPU path split into ``decode_ms`` and ``augment_ms``, with ``data.augment_process``
the child's) and its share of the step
(``convert_busy``): near 1.0 the prefetch helper, not the model, sets the pace. A diverging model is reported
(``first_nonfinite_step``, ``max_grad_norm``) without a per-step sync. With a ``StepProfiler``
(``--profile-dir``) every training phase ends with a few steps under torch.profiler, untimed: the device's busy
and idle time per step (``profile``) says whether a slower phase lost time to slower kernels or to a device left
idle within its steps (:mod:`mlgcn_dist.bench.profiling`).
Every training phase also says what the host's CPUs did over its timed steps (``host``, read from /proc at the
window's two ends): the loop thread's and the backward thread's time on a core and waiting for one, their sleeps,
preemptions and moves between cores, the host's busy share and its cores' clocks (:mod:`mlgcn_dist.bench.host`):
whether a phase whose device idled lost the time to its launching threads' cores.

Modules, in the order a measurement flows: :mod:`~mlgcn_dist.bench.step` (a training step under a setting, FLOPs,
peak TFLOP/s), :mod:`~mlgcn_dist.bench.window` (a timed window of steps), :mod:`~mlgcn_dist.bench.phases` (what
feeds each phase), :mod:`~mlgcn_dist.bench.train` (every phase of ``bench train``, ratios, MFU),
:mod:`~mlgcn_dist.bench.report` (the table), :mod:`~mlgcn_dist.bench.profiling` (the profiled steps' device
timeline), :mod:`~mlgcn_dist.bench.host` (the host's CPUs over a window), :mod:`~mlgcn_dist.bench.decode`
(``bench decode``), :mod:`~mlgcn_dist.bench.contention` (``bench contention``) and :mod:`~mlgcn_dist.bench.cli`
(the commands).
"""

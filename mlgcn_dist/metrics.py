"""The multi-label metrics of ML-GCN (mAP; overall and per-class precision, recall, F1) and their gather across ranks.

Semantics follow ML-GCN's AveragePrecisionMeter and its engine's overall/overall_topk, in this project's target
encoding (1 = positive, 0 = negative, -1 = difficult), with these choices made explicit:

- AP of a class is the mean, over its positives, of the precision at the positive's rank (non-interpolated), ranks
  taken in descending score order. Ties are broken by ascending image id (a stable sort of rows ordered by id), so
  the result depends neither on the order images were added in nor on how many ranks evaluated them; the original
  used an unstable torch.sort.
- With ``difficult_examples`` (the default, as ML-GCN), a difficult target is neither positive nor negative in AP:
  it is skipped there. Without it, difficult targets count as negatives in AP too. In the counts below a difficult
  target is a negative either way, as in ML-GCN's ``evaluation``: a positive prediction on it is a false positive
  (so OP and CP compare with published ML-GCN VOC figures).
- A prediction is positive when its score (logit) is >= 0, i.e. probability >= 0.5. With ``top_k`` only each image's
  k highest scores can be positive (ties: lower class index first).
- OP/OR/OF1 come from the counts summed over classes; CP/CR are per-class ratios averaged, CF1 = 2 CP CR / (CP + CR).
  A class never predicted has precision 0 (the original sets its prediction count to 1). Every 0/0 ratio is 0.
- A class without any positive among the evaluated images has no AP (NaN in ``ap``); it is listed in
  ``absent_classes`` and left out of mAP and of the CP/CR averages (the original divided by zero there).

All reported values are percentages, per-class AP included (so mAP is the mean of the listed APs).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

_VOC07_RECALL_POINTS = 11


class AveragePrecisionMeter:
    """Accumulates logits, targets and image ids over an evaluation; :meth:`compute` returns the metrics."""

    def __init__(self, difficult_examples: bool = True) -> None:
        self.difficult_examples = difficult_examples
        self.reset()

    def reset(self) -> None:
        self._scores: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []
        self._ids: list[torch.Tensor] = []
        self._next_id = 0
        self.uses_counter_ids = False  # ids made up by add(): unique here, but not across ranks

    def add(self, scores: torch.Tensor, targets: torch.Tensor, image_ids: torch.Tensor | None = None) -> None:
        """Add a batch: logits [B, C], targets [B, C] in 1/0/-1, image ids [B] (None: a running counter)."""
        scores = scores.detach().float().cpu()
        targets = targets.detach().cpu()
        num_classes = self._scores[0].shape[1] if self._scores else scores.shape[-1]
        if scores.ndim != 2 or targets.shape != scores.shape or scores.shape[1] != num_classes:
            raise ValueError(
                f"AveragePrecisionMeter.add: expected scores and targets of shape [B, {num_classes}], "
                f"got {tuple(scores.shape)} and {tuple(targets.shape)}"
            )
        if ((targets != 1) & (targets != 0) & (targets != -1)).any():
            raise ValueError("AveragePrecisionMeter.add: targets must be 1 (positive), 0 (negative) or -1 (difficult)")
        batch = scores.shape[0]
        if image_ids is None:
            image_ids = torch.arange(self._next_id, self._next_id + batch)
            self.uses_counter_ids = True
        image_ids = image_ids.detach().cpu().long().reshape(-1)
        if image_ids.numel() != batch:
            raise ValueError(f"AveragePrecisionMeter.add: {image_ids.numel()} image ids for a batch of {batch}")
        self._scores.append(scores)
        self._targets.append(targets.to(torch.int8))
        self._ids.append(image_ids)
        self._next_id += batch

    def state(self) -> dict[str, torch.Tensor]:
        """Everything added so far: scores float32 [N, C], targets int8 [N, C], image_ids int64 [N]."""
        if not self._scores:
            return {
                "scores": torch.zeros(0, 0),
                "targets": torch.zeros(0, 0, dtype=torch.int8),
                "image_ids": torch.zeros(0, dtype=torch.long),
            }
        # Concatenate once and keep the result, so repeated calls do not copy again.
        self._scores, self._targets, self._ids = (
            [torch.cat(chunks)] for chunks in (self._scores, self._targets, self._ids)
        )
        return {"scores": self._scores[0], "targets": self._targets[0], "image_ids": self._ids[0]}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the contents with a :meth:`state` dict (ids are kept: the counter continues after the largest)."""
        missing = {"scores", "targets", "image_ids"} - state.keys()
        if missing:
            raise ValueError(f"AveragePrecisionMeter.load_state: missing keys {sorted(missing)}")
        self.reset()
        if state["image_ids"].numel():
            self.add(state["scores"], state["targets"], state["image_ids"])
            self._next_id = int(state["image_ids"].max()) + 1

    def compute(self, top_k: int | None = None, interpolated: bool = False) -> dict:
        """mAP, OP, OR, OF1, CP, CR, CF1 (percent), per-class ``ap``, ``absent_classes`` and ``num_images``.

        ``top_k`` restricts the positive predictions of the overall/per-class counts to each image's k best
        scores (ML-GCN reports k = 3). ``interpolated`` gives VOC2007 11-point AP instead (for papers that use it).
        """
        state = self.state()
        order = torch.argsort(state["image_ids"], stable=True)
        scores, targets = state["scores"][order], state["targets"][order]
        counted = targets != -1 if self.difficult_examples else torch.ones_like(targets, dtype=torch.bool)
        positive = targets == 1
        ap = _average_precision(scores, positive, counted, interpolated)
        present = positive.sum(0) > 0
        return {
            "mAP": _mean_percent(ap[present]),
            **_overall_and_per_class(_predictions(scores, top_k), positive, present),
            "ap": [100.0 * v if p else math.nan for v, p in zip(ap.tolist(), present.tolist())],
            "absent_classes": torch.nonzero(~present).flatten().tolist(),
            "num_images": int(scores.shape[0]),
        }


def _average_precision(
    scores: torch.Tensor, positive: torch.Tensor, counted: torch.Tensor, interpolated: bool
) -> torch.Tensor:
    """AP per class [C] (fraction; 0 where a class has no positive), all classes sorted in one call."""
    ranking = torch.sort(scores, dim=0, descending=True, stable=True).indices
    pos = positive.gather(0, ranking).double()
    seen = counted.gather(0, ranking).double().cumsum(0)
    true_pos = pos.cumsum(0)
    num_pos = pos.sum(0)
    precision = true_pos / seen.clamp(min=1)
    if not interpolated:
        return (precision * pos).sum(0) / num_pos.clamp(min=1)
    # VOC2007: mean over recall levels r = 0, 0.1, ..., 1 of the best precision at a recall >= r. The comparison
    # is done on counts (10 tp >= k npos) so a recall of exactly 0.3 meets the 0.3 level despite float rounding.
    # Only counted ranks are points of the curve: a skipped difficult image adds no point.
    reached = torch.where(counted.gather(0, ranking), 10 * true_pos, -1)
    levels = [torch.where(reached >= k * num_pos, precision, 0).amax(0) for k in range(_VOC07_RECALL_POINTS)]
    return torch.stack(levels).mean(0)


def _predictions(scores: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """Positive predictions [N, C]: logit >= 0, and among the image's k highest scores when top_k is given."""
    predicted = scores >= 0
    if top_k is None:
        return predicted
    best = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :top_k]
    return predicted & torch.zeros_like(predicted).scatter_(1, best, True)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return num.double() / den.double().clamp(min=1)


def _f1(precision: float, recall: float) -> float:
    if math.isnan(precision) or math.isnan(recall):
        return math.nan  # no class with a positive: CP and CR are undefined, so is CF1
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _mean_percent(values: torch.Tensor) -> float:
    return 100.0 * float(values.mean()) if values.numel() else math.nan


def _overall_and_per_class(predicted: torch.Tensor, positive: torch.Tensor, present: torch.Tensor) -> dict[str, float]:
    n_correct = (predicted & positive).sum(0)
    n_predicted = predicted.sum(0)  # a difficult target predicted positive is a false positive (ML-GCN)
    n_ground_truth = positive.sum(0)
    op = 100.0 * float(_ratio(n_correct.sum(), n_predicted.sum()))
    o_r = 100.0 * float(_ratio(n_correct.sum(), n_ground_truth.sum()))
    cp = _mean_percent(_ratio(n_correct, n_predicted)[present])
    cr = _mean_percent(_ratio(n_correct, n_ground_truth)[present])
    return {"OP": op, "OR": o_r, "OF1": _f1(op, o_r), "CP": cp, "CR": cr, "CF1": _f1(cp, cr)}


def _gather_device(group: dist.ProcessGroup | None) -> torch.device:
    # NCCL only moves CUDA tensors; gloo (and a mixed "cpu:gloo,cuda:nccl" group) takes CPU tensors.
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather_padded(tensor: torch.Tensor, rows: int, group: dist.ProcessGroup | None) -> list[torch.Tensor]:
    """all_gather of tensors whose first dimension differs per rank: pad to ``rows``; callers trim."""
    padded = torch.zeros((rows, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    out = [torch.empty_like(padded) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, padded, group=group)
    return out


def _all_gather_state(meter: AveragePrecisionMeter, group: dist.ProcessGroup | None) -> dict[str, torch.Tensor]:
    """Every rank's raw state, concatenated in rank order (identical on every rank)."""
    device = _gather_device(group)
    state = {k: v.to(device) for k, v in meter.state().items()}
    rows, num_classes = state["scores"].shape
    header = torch.tensor([rows, num_classes, int(meter.uses_counter_ids and rows > 0)], device=device)
    headers = torch.stack(_all_gather_padded(header[None], 1, group)).reshape(-1, 3).cpu()
    # Every rank sees the same headers, so every rank raises together instead of leaving others in a collective.
    class_counts = set(headers[headers[:, 0] > 0, 1].tolist())
    if len(class_counts) > 1:
        raise ValueError(f"gather_meter: ranks hold scores for different numbers of classes {sorted(class_counts)}")
    if headers[:, 2].any():
        raise ValueError(
            "gather_meter: a rank added batches without image ids; ids are needed to count each image once "
            "across ranks (pass image_ids to AveragePrecisionMeter.add)"
        )
    num_classes = class_counts.pop() if class_counts else 0
    max_rows = int(headers[:, 0].max())
    if rows == 0:  # an empty rank has no class dimension yet
        state["scores"] = torch.zeros(0, num_classes, device=device)
        state["targets"] = torch.zeros(0, num_classes, dtype=torch.int8, device=device)
    gathered = {}
    for key, tensor in state.items():
        parts = _all_gather_padded(tensor, max_rows, group)
        gathered[key] = torch.cat([part[:n] for part, n in zip(parts, headers[:, 0].tolist())]).cpu()
    return gathered


def gather_meter(
    meter: AveragePrecisionMeter, group: dist.ProcessGroup | None = None
) -> tuple[AveragePrecisionMeter, int]:
    """All ranks' images in one meter (the same on every rank), each image id once; returns it and the number of
    duplicates dropped (e.g. samples a distributed sampler repeated to even out ranks).

    Without an initialised process group (or with one rank) nothing is communicated; duplicates are still dropped.
    Of several entries with one id the first in rank order is kept. The merged meter is ordered by image id.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        state = _all_gather_state(meter, group)
    else:
        state = meter.state()
    ids, order = torch.sort(state["image_ids"], stable=True)
    first = torch.ones_like(ids, dtype=torch.bool)
    first[1:] = ids[1:] != ids[:-1]
    keep = order[first]
    merged = AveragePrecisionMeter(meter.difficult_examples)
    merged.load_state({key: tensor[keep] for key, tensor in state.items()})
    return merged, int(ids.numel() - keep.numel())

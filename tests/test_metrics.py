"""The AP meter: ML-GCN's mAP and overall / per-class precision, recall and F1, on cases computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mlgcn_dist.metrics import AveragePrecisionMeter, gather_meter


def meter_of(scores, targets, image_ids=None, difficult_examples: bool = True) -> AveragePrecisionMeter:
    """A meter holding one batch; 1-D inputs are one class."""
    scores, targets = torch.tensor(scores, dtype=torch.float32), torch.tensor(targets)
    if scores.ndim == 1:
        scores, targets = scores[:, None], targets[:, None]
    meter = AveragePrecisionMeter(difficult_examples)
    meter.add(scores, targets, None if image_ids is None else torch.tensor(image_ids))
    return meter


def ap_by_looping_over_ranks(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """ML-GCN's per-class AP written as its loop over ranks (difficult skipped), as an independent reference."""
    positives = seen = 0
    total = 0.0
    for i in torch.argsort(scores, descending=True).tolist():
        if targets[i] == -1:
            continue
        seen += 1
        if targets[i] == 1:
            positives += 1
            total += positives / seen
    return 100.0 * total / positives


def test_ap_is_the_mean_precision_at_each_positive_rank():
    result = meter_of([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]).compute()
    assert result["ap"] == pytest.approx([100 * (1 + 2 / 3) / 2])
    assert result["mAP"] == pytest.approx(100 * 5 / 6)


def test_difficult_target_is_skipped_in_ap():
    assert meter_of([0.9, 0.8, 0.7], [1, -1, 1]).compute()["mAP"] == pytest.approx(100.0)


def test_difficult_target_counts_as_negative_without_difficult_examples():
    result = meter_of([0.9, 0.8, 0.7], [1, -1, 1], difficult_examples=False).compute()
    assert result["mAP"] == pytest.approx(100 * (1 + 2 / 3) / 2)


def test_tied_scores_rank_the_smaller_image_id_first_whatever_the_order_added():
    assert meter_of([0.5, 0.5], [1, 0], image_ids=[0, 1]).compute()["mAP"] == pytest.approx(100.0)
    assert meter_of([0.5, 0.5], [1, 0], image_ids=[1, 0]).compute()["mAP"] == pytest.approx(50.0)
    assert meter_of([0.5, 0.5], [0, 1], image_ids=[1, 0]).compute()["mAP"] == pytest.approx(100.0)


def test_ties_among_more_images_than_a_small_sort_keeps_in_order_still_rank_by_image_id():
    # torch's unstable CPU sort reorders ties once a column holds more than 16 values.
    targets = [0] * 19 + [1]  # the positive is added last
    positive_first_by_id = meter_of([0.5] * 20, targets, image_ids=list(range(19, -1, -1)))
    assert positive_first_by_id.compute()["mAP"] == pytest.approx(100.0)
    assert meter_of([0.5] * 20, targets).compute()["mAP"] == pytest.approx(100 / 20)


def test_all_scores_equal_rank_images_by_id():
    result = meter_of([0.3, 0.3, 0.3, 0.3], [0, 1, 1, 0]).compute()
    assert result["mAP"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)


def test_class_without_positive_is_reported_absent_and_left_out_of_map():
    result = meter_of([[0.9, 0.1], [-0.2, 0.8], [0.7, 0.3]], [[1, 0], [0, -1], [1, 0]]).compute()
    assert result["absent_classes"] == [1]
    assert math.isnan(result["ap"][1])
    assert result["mAP"] == pytest.approx(100.0) and result["ap"][0] == pytest.approx(100.0)
    # Class 1 is predicted everywhere, yet CP and CR average over the classes of mAP only.
    assert (result["CP"], result["CR"]) == pytest.approx((100.0, 100.0))


def test_ap_matches_a_loop_over_ranks_on_random_scores():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(200, 6, generator=generator)
    targets = torch.randint(-1, 2, (200, 6), generator=generator)
    result = meter_of(scores.tolist(), targets.tolist()).compute()
    expected = [ap_by_looping_over_ranks(scores[:, k], targets[:, k]) for k in range(6)]
    assert result["ap"] == pytest.approx(expected)
    assert result["mAP"] == pytest.approx(sum(expected) / 6)


# Three images, three classes. Logit 0.0 counts as a positive prediction. Per class (correct, predicted, truth):
# class 0: (2, 2, 3) - image 1 is missed; class 1: (2, 2, 2); class 2: (1, 2, 1) - image 1 is a false alarm.
COUNT_SCORES = [[2.0, -1.0, 0.5], [-0.5, 1.0, 3.0], [1.0, 0.0, -2.0]]
COUNT_TARGETS = [[1, 0, 1], [1, 1, 0], [1, 1, 0]]


def test_overall_and_per_class_precision_recall_f1_of_a_hand_example():
    result = meter_of(COUNT_SCORES, COUNT_TARGETS).compute()
    cp, cr = (1 + 1 + 1 / 2) / 3, (2 / 3 + 1 + 1) / 3
    assert result["OP"] == pytest.approx(100 * 5 / 6)
    assert result["OR"] == pytest.approx(100 * 5 / 6)
    assert result["OF1"] == pytest.approx(100 * 5 / 6)
    assert result["CP"] == pytest.approx(100 * cp)
    assert result["CR"] == pytest.approx(100 * cr)
    assert result["CF1"] == pytest.approx(100 * 2 * cp * cr / (cp + cr))
    assert result["num_images"] == 3 and result["absent_classes"] == []


def test_a_positive_prediction_on_a_difficult_target_is_a_false_positive_as_in_ml_gcn():
    for difficult_examples in (True, False):
        result = meter_of([1.0, 1.0], [1, -1], difficult_examples=difficult_examples).compute()
        assert result["CP"] == pytest.approx(50.0) and result["OP"] == pytest.approx(50.0)


def mlgcn_evaluation(scores: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """ML-GCN's ``AveragePrecisionMeter.evaluation`` (its VOC encoding: 1 positive, 0 difficult, -1 negative),
    as an independent reference for the counts."""
    targets = np.where(targets == -1, 0, targets)  # the original maps negatives to 0: difficult ones are too
    n_correct = (targets * (scores >= 0)).sum(0)
    n_predicted = np.maximum((scores >= 0).sum(0), 1)
    n_truth = (targets == 1).sum(0)
    return {"OP": 100 * n_correct.sum() / n_predicted.sum(), "OR": 100 * n_correct.sum() / n_truth.sum(),
            "CP": 100 * np.mean(n_correct / n_predicted), "CR": 100 * np.mean(n_correct / n_truth)}


def test_overall_and_per_class_precision_and_recall_equal_ml_gcns_with_difficult_targets():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(50, 6))
    targets = rng.choice([1, 0, -1], size=(50, 6), p=[0.3, 0.5, 0.2])  # this project: -1 difficult, 0 negative
    targets[0], scores[1] = 1, 1.0  # every class has a positive and a positive prediction
    original = mlgcn_evaluation(scores, np.select([targets == -1, targets == 0], [0, -1], targets))
    result = meter_of(scores.tolist(), targets.tolist()).compute()
    for key, value in original.items():
        assert result[key] == pytest.approx(value)


def test_f1_is_zero_not_nan_when_no_positive_prediction_is_correct():
    result = meter_of([[1.0, -1.0], [-1.0, 1.0]], [[0, 1], [1, 0]]).compute()
    assert [result[key] for key in ("OP", "OR", "OF1", "CP", "CR", "CF1")] == [0.0] * 6


def test_class_never_predicted_has_precision_zero():
    result = meter_of([[1.0, -1.0], [1.0, -2.0]], [[1, 1], [0, 1]]).compute()
    assert result["CP"] == pytest.approx(100 * (1 / 2 + 0) / 2)
    assert result["OP"] == pytest.approx(100 * 1 / 2)


def test_top_3_keeps_each_images_three_best_scores_ties_to_the_lower_class():
    # Image 0: four positive logits, the fourth (0.5) dropped. Image 1: four tied logits, class 3 dropped.
    meter = meter_of([[3.0, 2.0, 1.0, 0.5], [0.2, 0.2, 0.2, 0.2]], [[1, 1, 0, 1], [0, 0, 1, 1]])
    # Per class (correct, predicted, truth): (1, 2, 1), (1, 2, 1), (1, 2, 1), (0, 0, 2).
    top3 = meter.compute(top_k=3)
    assert (top3["OP"], top3["OR"]) == pytest.approx((100 * 3 / 6, 100 * 3 / 5))
    assert top3["OF1"] == pytest.approx(100 * 6 / 11)
    assert (top3["CP"], top3["CR"], top3["CF1"]) == pytest.approx((37.5, 75.0, 50.0))
    everything = meter.compute()
    assert (everything["OP"], everything["OR"]) == pytest.approx((100 * 5 / 8, 100.0))
    assert top3["mAP"] == everything["mAP"]  # top-k only changes the thresholded counts


def test_top_3_predicts_only_the_non_negative_logits_among_the_three_best():
    top3 = meter_of([[2.0, -0.5, -1.0, -3.0]], [[1, 1, 0, 0]]).compute(top_k=3)
    assert (top3["OP"], top3["OR"]) == pytest.approx((100.0, 50.0))


def test_top_3_ties_among_many_classes_go_to_the_lowest_class_indices():
    # 20 tied logits: more than torch's unstable CPU sort keeps in order.
    top3 = meter_of([[0.5] * 20], [[1, 1, 1] + [0] * 17]).compute(top_k=3)
    assert (top3["OP"], top3["OR"]) == pytest.approx((100.0, 100.0))


def test_interpolated_ap_takes_the_best_precision_at_eleven_recall_levels():
    meter = meter_of([0.9, 0.8, 0.7, 0.6, 0.5], [1, 0, 0, 1, 0])
    # Recall 0.5 at precision 1 (levels 0 to 0.5), recall 1 at best precision 1/2 (levels 0.6 to 1).
    assert meter.compute(interpolated=True)["mAP"] == pytest.approx(100 * (6 * 1 + 5 * 0.5) / 11)
    assert meter.compute()["mAP"] == pytest.approx(100 * (1 + 0.5) / 2)


def test_interpolated_ap_counts_a_recall_of_exactly_three_tenths_at_level_three_tenths():
    targets = [1] * 3 + [0] * 7 + [1] * 7  # 10 positives: recall 0.3 at precision 1, then precision <= 10/17
    meter = meter_of([float(-i) for i in range(17)], targets)
    assert meter.compute(interpolated=True)["mAP"] == pytest.approx(100 * (4 + 7 * 10 / 17) / 11)


def test_state_round_trip_gives_the_same_metrics_and_continues_the_id_counter():
    meter = AveragePrecisionMeter()
    meter.add(torch.tensor(COUNT_SCORES[:2]), torch.tensor(COUNT_TARGETS[:2]))
    meter.add(torch.tensor(COUNT_SCORES[2:]), torch.tensor(COUNT_TARGETS[2:]))
    state = meter.state()
    assert state["scores"].dtype == torch.float32 and state["targets"].dtype == torch.int8
    assert state["image_ids"].tolist() == [0, 1, 2]
    restored = AveragePrecisionMeter()
    restored.load_state(state)
    assert restored.compute() == meter.compute()
    restored.add(torch.tensor([[1.0, 1.0, 1.0]]), torch.tensor([[1, 1, 1]]))
    assert restored.state()["image_ids"].tolist() == [0, 1, 2, 3]


def test_load_state_continues_the_id_counter_after_the_largest_id_and_names_missing_keys():
    restored = meter_of([[0.7]], [[1]], image_ids=[20])  # replaced, not added to
    restored.load_state(meter_of([[0.1], [0.2]], [[1], [0]], image_ids=[9, 4]).state())
    restored.add(torch.tensor([[0.3]]), torch.tensor([[1]]))
    assert restored.state()["image_ids"].tolist() == [9, 4, 10]
    with pytest.raises(ValueError, match=r"missing keys \['image_ids', 'targets'\]"):
        restored.load_state({"scores": torch.zeros(1, 1)})


def test_add_stores_float32_scores_int8_targets_and_int64_ids_whatever_it_is_given():
    meter = AveragePrecisionMeter()
    meter.add(torch.tensor([[0.5], [0.25]], dtype=torch.bfloat16), torch.tensor([[1], [0]]),
              torch.tensor([[3], [1]], dtype=torch.int32))  # half-precision logits and ids of shape [B, 1]
    state = meter.state()
    assert (state["scores"].dtype, state["targets"].dtype, state["image_ids"].dtype) == (
        torch.float32, torch.int8, torch.int64)
    assert state["image_ids"].tolist() == [3, 1]


def test_reset_empties_the_meter_and_an_empty_meter_computes_without_crashing():
    meter = meter_of(COUNT_SCORES, COUNT_TARGETS)
    meter.reset()
    result = meter.compute()
    assert result["num_images"] == 0 and math.isnan(result["mAP"]) and result["OP"] == 0.0
    assert all(math.isnan(result[key]) for key in ("CP", "CR", "CF1"))  # no class with a positive: undefined


def test_shuffling_images_without_ties_does_not_change_the_metrics():
    generator = torch.Generator().manual_seed(1)
    scores = torch.randn(50, 5, generator=generator)
    targets = torch.randint(-1, 2, (50, 5), generator=generator)
    shuffled = torch.randperm(50, generator=generator)
    for top_k, interpolated in ((None, False), (3, False), (None, True)):
        in_order = meter_of(scores.tolist(), targets.tolist()).compute(top_k, interpolated)
        assert meter_of(scores[shuffled].tolist(), targets[shuffled].tolist()).compute(top_k, interpolated) == in_order


def test_shuffling_images_with_their_ids_does_not_change_metrics_even_with_ties():
    scores = torch.tensor([[0.5, 0.1], [0.5, 0.1], [0.2, 0.1], [0.5, 0.3]])
    targets = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]])
    ids = torch.tensor([10, 11, 12, 13])
    permutation = torch.tensor([3, 1, 0, 2])
    expected = meter_of(scores.tolist(), targets.tolist(), ids.tolist()).compute()
    shuffled = meter_of(scores[permutation].tolist(), targets[permutation].tolist(), ids[permutation].tolist())
    assert shuffled.compute() == expected


def test_add_rejects_targets_outside_one_zero_minus_one_and_mismatched_shapes():
    meter = AveragePrecisionMeter()
    with pytest.raises(ValueError, match="1 \\(positive\\), 0 \\(negative\\) or -1"):
        meter.add(torch.zeros(2, 3), torch.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="shape"):
        meter.add(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"shape \[B, 3\], got \(3,\)"):
        meter.add(torch.zeros(3), torch.zeros(3))
    meter.add(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"\[B, 3\]"):
        meter.add(torch.zeros(2, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="3 image ids for a batch of 2"):
        meter.add(torch.zeros(2, 3), torch.zeros(2, 3), torch.arange(3))


def test_gather_without_a_process_group_drops_duplicate_ids_keeping_the_first():
    meter = meter_of([[0.9], [0.1], [0.8]], [[1], [0], [0]], image_ids=[7, 3, 7])
    merged, duplicates = gather_meter(meter)
    assert duplicates == 1
    state = merged.state()
    assert state["image_ids"].tolist() == [3, 7]
    assert state["scores"].flatten().tolist() == pytest.approx([0.1, 0.9])
    # Twenty copies of one image: more entries than torch's unstable CPU sort keeps in order.
    merged, duplicates = gather_meter(meter_of([float(i) for i in range(20)], [1] * 20, image_ids=[5] * 20))
    assert duplicates == 19 and merged.state()["scores"].flatten().tolist() == [0.0]


def test_gather_of_an_empty_meter_without_a_process_group_gives_an_empty_meter():
    merged, duplicates = gather_meter(AveragePrecisionMeter())
    assert duplicates == 0 and merged.compute()["num_images"] == 0


def test_gather_keeps_the_meters_choice_of_counting_difficult_targets_as_negatives():
    meter = meter_of([0.9, 0.8, 0.7], [1, -1, 1], image_ids=[0, 1, 2], difficult_examples=False)
    merged, _ = gather_meter(meter)
    assert merged.compute()["mAP"] == pytest.approx(100 * (1 + 2 / 3) / 2)  # the difficult image: a negative


class FakeTwoRanks:
    """torch.distributed seen from rank 0 of two, whose other rank holds ``other``'s state: each all_gather returns
    this rank's tensor and the other rank's tensor of the same kind (header, scores, targets or ids), padded as
    gather_meter pads it. What two real processes exchange is tested in test_metrics_distributed.py (slow)."""

    def __init__(self, monkeypatch, other: AveragePrecisionMeter) -> None:
        import mlgcn_dist.metrics as metrics

        self.other, self.headers_sent = other, 0
        for name, fake in (("is_available", lambda: True), ("is_initialized", lambda: True),
                           ("get_world_size", lambda group=None: 2), ("get_backend", lambda group=None: "gloo"),
                           ("all_gather", self.all_gather)):
            monkeypatch.setattr(metrics.dist, name, fake)

    def _other_tensor(self, mine: torch.Tensor) -> torch.Tensor:
        state = self.other.state()
        rows, classes = state["scores"].shape
        if self.headers_sent == 0:  # the first exchange is the header: rows, classes, counter ids used
            self.headers_sent = 1
            return torch.tensor([[rows, classes, int(self.other.uses_counter_ids and rows > 0)]])
        key = {torch.float32: "scores", torch.int8: "targets", torch.int64: "image_ids"}[mine.dtype]
        return state[key].reshape(-1, *mine.shape[1:]) if rows else torch.zeros(0, *mine.shape[1:], dtype=mine.dtype)

    def all_gather(self, out: list[torch.Tensor], mine: torch.Tensor, group=None) -> None:
        theirs = self._other_tensor(mine)
        out[0].copy_(mine)
        out[1].zero_()
        out[1][: theirs.shape[0]] = theirs


def test_gather_from_ranks_holding_different_numbers_of_images_counts_each_image_once(monkeypatch):
    mine = meter_of([[0.9, 0.1], [0.7, 0.2], [0.5, 0.3]], [[1, 0], [0, 1], [1, 0]], image_ids=[4, 2, 0])
    theirs = meter_of([[0.8, 0.6], [0.4, 0.9]], [[0, 1], [1, 1]], image_ids=[1, 3])
    FakeTwoRanks(monkeypatch, theirs)
    merged, duplicates = gather_meter(mine)
    assert duplicates == 0  # the padding of the smaller rank is no image
    state = merged.state()
    assert state["image_ids"].tolist() == [0, 1, 2, 3, 4]
    assert state["scores"].flatten().tolist() == pytest.approx([0.5, 0.3, 0.8, 0.6, 0.7, 0.2, 0.4, 0.9, 0.9, 0.1])
    assert state["targets"].tolist() == [[1, 0], [0, 1], [0, 1], [1, 1], [1, 0]]


def test_an_image_repeated_on_the_next_rank_is_counted_once_with_the_first_ranks_scores(monkeypatch):
    """A DistributedSampler pads the last ranks with images of the first: the copy is dropped."""
    mine = meter_of([[0.9], [0.2]], [[1], [0]], image_ids=[0, 2])
    theirs = meter_of([[0.4], [0.3]], [[1], [1]], image_ids=[1, 0])
    FakeTwoRanks(monkeypatch, theirs)
    merged, duplicates = gather_meter(mine)
    assert duplicates == 1
    assert merged.state()["image_ids"].tolist() == [0, 1, 2]
    assert merged.state()["scores"].flatten().tolist() == pytest.approx([0.9, 0.4, 0.2])


def test_gather_refuses_a_rank_that_added_images_without_ids(monkeypatch):
    mine = meter_of([[0.9], [0.2]], [[1], [0]], image_ids=[0, 1])
    theirs = meter_of([[0.4]], [[1]])  # a running counter: its id 0 would be taken for this rank's image 0
    FakeTwoRanks(monkeypatch, theirs)
    with pytest.raises(ValueError, match="ids are needed to count each image once across ranks"):
        gather_meter(mine)


def test_gather_with_an_empty_rank_holds_the_other_ranks_images(monkeypatch):
    theirs = meter_of([[0.4, 0.1]], [[1, 0]], image_ids=[5])
    FakeTwoRanks(monkeypatch, theirs)
    merged, duplicates = gather_meter(AveragePrecisionMeter())
    assert duplicates == 0 and merged.state()["image_ids"].tolist() == [5]
    assert merged.state()["scores"].flatten().tolist() == pytest.approx([0.4, 0.1])


def test_gather_refuses_ranks_holding_scores_for_different_numbers_of_classes(monkeypatch):
    FakeTwoRanks(monkeypatch, meter_of([[0.4, 0.1, 0.2]], [[1, 0, 0]], image_ids=[1]))
    with pytest.raises(ValueError, match=r"different numbers of classes \[2, 3\]"):
        gather_meter(meter_of([[0.9, 0.1]], [[1, 0]], image_ids=[0]))


def test_gather_over_nccl_exchanges_tensors_on_the_current_cuda_device(monkeypatch):
    """NCCL moves CUDA tensors only, gloo CPU ones. Checked without a GPU: a CUDA device object needs none."""
    import mlgcn_dist.metrics as metrics

    monkeypatch.setattr(metrics.torch.cuda, "current_device", lambda: 1)
    for backend, device in (("nccl", torch.device("cuda", 1)), ("gloo", torch.device("cpu"))):
        monkeypatch.setattr(metrics.dist, "get_backend", lambda group=None, backend=backend: backend)
        assert metrics._gather_device(None) == device

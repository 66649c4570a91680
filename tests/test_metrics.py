"""Metrics on tiny hand-drawn masks; every expected number is worked out by hand in a comment."""

import pickle

import numpy as np
import pytest
import torch

from ssp_sam.metrics import (
    GRES_KEYS,
    RELEASE_GRES_KEYS,
    RELEASE_RES_KEYS,
    RES_KEYS,
    GRESMetrics,
    RESMetrics,
    SSPSAMReleaseMetrics,
    format_table,
    intersection_union,
)


def mask(*rows: str) -> np.ndarray:
    """A boolean mask drawn row by row, '#' = foreground."""
    return np.array([[char == "#" for char in row] for row in rows])


EMPTY = mask("....", "....", "....", "....")


def first_pixels(count: int) -> np.ndarray:
    """A 4x4 mask of its first `count` pixels in row-major order: first_pixels(a) is inside first_pixels(b), a <= b."""
    flat = np.zeros(16, dtype=bool)
    flat[:count] = True
    return flat.reshape(4, 4)


# --- intersection_union -----------------------------------------------------------------------------------------


def test_intersection_union_numpy_torch_and_integer_masks_agree():
    pred = mask("##..", "##..", "....", "....")
    gt = mask("#...", "#...", "#...", "#...")
    # pred has 4 pixels, gt 4; they share (0,0) and (1,0): I = 2, U = 4 + 4 - 2 = 6
    assert intersection_union(pred, gt) == (2, 6)
    assert intersection_union(torch.from_numpy(pred), torch.from_numpy(gt)) == (2, 6)
    assert intersection_union(pred.astype(np.uint8), gt.astype(np.int64)) == (2, 6)
    assert all(type(count) is int for count in intersection_union(pred, gt))


def test_intersection_union_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(4, 4\).*\(4, 5\)"):
        intersection_union(EMPTY, np.zeros((4, 5), dtype=bool))


def test_intersection_union_refuses_float_and_non_2d_masks():
    with pytest.raises(ValueError, match="dtype float"):
        intersection_union(EMPTY.astype(np.float32), EMPTY)
    with pytest.raises(ValueError, match="2-D"):
        intersection_union(np.zeros((1, 4, 4), dtype=bool), np.zeros((1, 4, 4), dtype=bool))


# --- RESMetrics --------------------------------------------------------------------------------------------------


def test_res_empty_gt_and_empty_prediction_scores_zero():
    metrics = RESMetrics()
    metrics.update(EMPTY, EMPTY)
    # I = 0, U = 0 -> IoU = 0 by convention; summed U = 0 -> oIoU = 0
    result = metrics.compute()
    assert result["n_samples"] == 1
    assert result["mIoU"] == 0.0
    assert result["oIoU"] == 0.0
    assert all(result[f"Pr@{x}"] == 0.0 for x in (0.5, 0.6, 0.7, 0.8, 0.9))
    assert "REC-acc" not in result


def test_res_empty_prediction_with_non_empty_gt():
    metrics = RESMetrics()
    metrics.update(EMPTY, mask("###.", "....", "....", "...."))
    # I = 0, U = 3 -> IoU = 0, oIoU = 0 / 3 = 0
    assert metrics.per_sample()[0]["I"] == 0
    assert metrics.per_sample()[0]["U"] == 3
    assert metrics.compute()["mIoU"] == 0.0
    assert metrics.compute()["oIoU"] == 0.0


def test_res_single_pixel_hit_and_miss():
    single = mask("....", ".#..", "....", "....")
    hit = RESMetrics()
    hit.update(single, single)
    # I = 1, U = 1 -> IoU = 1 >= 0.9 -> every Pr@X is 1
    assert hit.compute()["mIoU"] == 1.0
    assert hit.compute()["Pr@0.9"] == 1.0

    miss = RESMetrics()
    miss.update(mask("#...", "....", "....", "...."), mask("....", "....", "....", "...#"))
    # disjoint pixels: I = 0, U = 2 -> IoU = 0, oIoU = 0 / 2 = 0, Pr@0.5 = 0
    assert miss.per_sample()[0]["U"] == 2
    assert miss.compute()["mIoU"] == 0.0
    assert miss.compute()["oIoU"] == 0.0
    assert miss.compute()["Pr@0.5"] == 0.0


@pytest.mark.parametrize(
    ("intersection", "union", "threshold", "higher_threshold"),
    [(2, 4, 0.5, 0.6), (3, 5, 0.6, 0.7), (7, 10, 0.7, 0.8), (4, 5, 0.8, 0.9), (9, 10, 0.9, None)],
)
def test_res_precision_counts_an_iou_equal_to_the_threshold(intersection, union, threshold, higher_threshold):
    # pred = first `intersection` pixels, inside gt = first `union` pixels: IoU = intersection / union = threshold
    metrics = RESMetrics()
    metrics.update(first_pixels(intersection), first_pixels(union))
    result = metrics.compute()
    assert result[f"Pr@{threshold}"] == 1.0  # IoU >= X (LAVT, ReLA and the release; not CRIS's >)
    if higher_threshold is not None:
        assert result[f"Pr@{higher_threshold}"] == 0.0


def test_res_precision_over_several_samples():
    metrics = RESMetrics()
    for intersection, union in [(2, 4), (3, 5), (4, 5)]:
        metrics.update(first_pixels(intersection), first_pixels(union))
    # IoUs 0.5, 0.6, 0.8: >= 0.5 -> all 3 = 1; >= 0.6 -> {0.6, 0.8} = 2/3; >= 0.7 -> {0.8} = 1/3; >= 0.8 -> 1/3; >= 0.9 -> 0
    # mIoU = (0.5 + 0.6 + 0.8) / 3 = 1.9 / 3; oIoU = (2 + 3 + 4) / (4 + 5 + 5) = 9 / 14
    result = metrics.compute()
    assert result["Pr@0.5"] == 1.0
    assert result["Pr@0.6"] == pytest.approx(2 / 3)
    assert result["Pr@0.7"] == pytest.approx(1 / 3)
    assert result["Pr@0.8"] == pytest.approx(1 / 3)
    assert result["Pr@0.9"] == 0.0
    assert result["mIoU"] == pytest.approx(1.9 / 3)
    assert result["oIoU"] == pytest.approx(9 / 14)


def test_res_oiou_and_miou_differ():
    metrics = RESMetrics()
    metrics.update(mask("#...", "....", "....", "...."), mask("#...", "....", "....", "...."))
    metrics.update(mask("##..", "....", "....", "...."), mask("####", "####", "....", "...."))
    # sample 1: I = 1, U = 1 -> IoU 1; sample 2: I = 2, U = 8 -> IoU 0.25
    # mIoU = (1 + 0.25) / 2 = 0.625; oIoU = (1 + 2) / (1 + 8) = 1/3
    result = metrics.compute()
    assert result["mIoU"] == pytest.approx(0.625)
    assert result["oIoU"] == pytest.approx(1 / 3)
    assert [(row["I"], row["U"], row["IoU"]) for row in metrics.per_sample()] == [(1, 1, 1.0), (2, 8, 0.25)]
    assert all(type(result[key]) is float for key in result if key != "n_samples")


def test_res_rec_accuracy_counts_box_iou_of_exactly_one_half():
    metrics = RESMetrics()
    # pred (0,0,2,2) area 4 inside gt (0,0,2,4) area 8: IoU = 4 / 8 = 0.5 -> hit (>= 0.5)
    metrics.update(EMPTY, EMPTY, pred_box=[0, 0, 2, 2], gt_box=[0, 0, 2, 4])
    # pred (0,0,2,2) area 4 inside gt (0,0,4,3) area 12: IoU = 4 / 12 = 1/3 -> miss
    metrics.update(EMPTY, EMPTY, pred_box=torch.tensor([0.0, 0.0, 2.0, 2.0]), gt_box=torch.tensor([[0, 0, 4, 3]]))
    # REC-acc = 1 hit / 2 samples
    assert metrics.compute()["REC-acc"] == 0.5
    assert [row["box_IoU"] for row in metrics.per_sample()] == pytest.approx([0.5, 1 / 3])


def test_res_boxes_for_all_samples_or_none():
    metrics = RESMetrics()
    metrics.update(EMPTY, EMPTY, pred_box=[0, 0, 2, 2], gt_box=[0, 0, 2, 4])
    with pytest.raises(ValueError, match="all samples or for none"):
        metrics.update(EMPTY, EMPTY)
    with pytest.raises(ValueError, match="together"):
        metrics.update(EMPTY, EMPTY, pred_box=[0, 0, 2, 2])
    with pytest.raises(ValueError, match="gt_box"):
        metrics.update(EMPTY, EMPTY, pred_box=[0, 0, 2, 2], gt_box=[3, 0, 2, 4])
    assert len(metrics) == 1

    without_boxes = RESMetrics()
    without_boxes.update(EMPTY, EMPTY)
    with pytest.raises(ValueError, match="boxes"):
        metrics.merge(without_boxes)


def test_res_groups_and_unknown_group():
    metrics = RESMetrics()
    metrics.update(mask("##..", "....", "....", "...."), mask("####", "####", "....", "...."), group="testB")
    metrics.update(mask("#...", "....", "....", "...."), mask("#...", "....", "....", "...."), group="testA")
    metrics.update(EMPTY, mask("#...", "....", "....", "...."))
    # testB: I = 2, U = 8 -> 0.25; testA: I = 1, U = 1 -> 1; ungrouped: I = 0, U = 1 -> 0
    # all: mIoU = (0.25 + 1 + 0) / 3 = 1.25 / 3, oIoU = (2 + 1 + 0) / (8 + 1 + 1) = 0.3
    assert metrics.groups() == ["testA", "testB"]
    by_group = metrics.compute_by_group()
    assert list(by_group) == ["testA", "testB"]
    assert by_group["testA"]["mIoU"] == 1.0
    assert by_group["testA"]["n_samples"] == 1
    assert metrics.compute("testB")["mIoU"] == 0.25
    assert metrics.compute()["mIoU"] == pytest.approx(1.25 / 3)
    assert metrics.compute()["oIoU"] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="unknown group 'val'"):
        metrics.compute("val")


def test_compute_without_samples_is_an_error():
    with pytest.raises(ValueError, match="no samples"):
        RESMetrics().compute()


# --- GRESMetrics -------------------------------------------------------------------------------------------------


def gres_samples():
    """Four samples covering every (target, no-target decision) case of the gRefCOCO protocol."""
    three = mask("###.", "....", "....", "....")
    return [
        # target, said "target": pred = gt = 3 px -> I = 3, U = 3, IoU 1, score 1
        (three, three, False),
        # target, said "no target": pred 2 px inside gt 4 px, but as ReLA I = 0 while U = 4 is kept: score 0
        (mask("#...", "#...", "....", "...."), mask("#...", "#...", "#...", "#..."), True),
        # no-target, said "no target" (correct) though its mask has 3 px: score 1, adds nothing to cIoU
        (three, EMPTY, True),
        # no-target, said "target" (wrong), mask 5 px: score 0, adds I = 0 and U = 5 to cIoU
        (mask("####", "#...", "....", "...."), EMPTY, False),
    ]


def test_gres_every_case_of_the_protocol():
    metrics = GRESMetrics()
    for pred, gt, pred_no_target in gres_samples():
        metrics.update(pred, gt, pred_no_target)
    # gIoU = (1 + 0 + 1 + 0) / 4 = 0.5
    # cIoU = (3 + 0 + 0 + 0) / (3 + 4 + 0 + 5) = 3 / 12
    # N-acc = 1 correct of 2 no-target = 0.5; T-acc = 1 of 2 targets not said "no target" = 0.5
    # Pr@X over the targets' scores {1, 0}: 0.5 for every X
    result = metrics.compute()
    assert (result["n_samples"], result["n_target"], result["n_no_target"]) == (4, 2, 2)
    assert result["gIoU"] == 0.5
    assert result["cIoU"] == pytest.approx(3 / 12)
    assert result["N-acc"] == 0.5
    assert result["T-acc"] == 0.5
    assert all(result[f"Pr@{x}"] == 0.5 for x in (0.5, 0.6, 0.7, 0.8, 0.9))
    # per sample: the masks' IoU as drawn (0.5 for the second) and the score that enters gIoU (0)
    assert [row["score"] for row in metrics.per_sample()] == [1.0, 0.0, 1.0, 0.0]
    assert [row["IoU"] for row in metrics.per_sample()] == [1.0, 0.5, 0.0, 0.0]


def test_gres_sample_kind_comes_from_the_annotation_as_in_rela():
    # A target too small to cover a pixel of the evaluation frame (its mask is empty there): ReLA reads the
    # annotation's no-target flag, so it stays a target (score 0 whatever is answered), not a no-target (score 1).
    by_mask, by_flag = GRESMetrics(), GRESMetrics()
    by_mask.update(EMPTY, EMPTY, True)
    by_flag.update(EMPTY, EMPTY, True, gt_no_target=False)
    assert (by_mask.compute()["gIoU"], by_mask.compute()["N-acc"]) == (1.0, 1.0)
    flagged = by_flag.compute()
    assert (flagged["gIoU"], flagged["n_target"], flagged["T-acc"]) == (0.0, 1, 0.0) and "N-acc" not in flagged


def test_gres_target_called_no_target_keeps_its_union():
    # A target sample whose mask overlaps the GT but which the model called "no target" (ReLA's false positive):
    # pred 2 px inside gt 4 px -> I = 0 (not 2), U = 4: with a correct target (I = U = 2) cIoU = (2 + 0) / (2 + 4)
    metrics = GRESMetrics()
    metrics.update(mask("##..", "....", "....", "...."), mask("##..", "....", "....", "...."), False)
    metrics.update(mask("#...", "#...", "....", "...."), mask("#...", "#...", "#...", "#..."), True)
    result = metrics.compute()
    assert result["cIoU"] == pytest.approx(2 / 6)
    assert result["gIoU"] == 0.5  # (1 + 0) / 2
    assert result["T-acc"] == 0.5 and result["Pr@0.5"] == 0.5


def test_gres_wrong_no_target_adds_its_predicted_area_to_the_union():
    target_pred, target_gt = mask("##..", "....", "....", "...."), mask("####", "....", "....", "....")
    no_target_pred = mask("###.", "....", "....", "....")
    wrong, right = GRESMetrics(), GRESMetrics()
    for metrics, said_no_target in ((wrong, False), (right, True)):
        metrics.update(target_pred, target_gt, False)
        metrics.update(no_target_pred, EMPTY, said_no_target)
    # target: I = 2, U = 4. Wrong no-target adds its 3 px: cIoU = 2 / (4 + 3) = 2/7; gIoU = (0.5 + 0) / 2 = 0.25
    assert wrong.compute()["cIoU"] == pytest.approx(2 / 7)
    assert wrong.compute()["gIoU"] == 0.25
    assert wrong.compute()["N-acc"] == 0.0
    # right no-target adds nothing: cIoU = 2 / 4 = 0.5; gIoU = (0.5 + 1) / 2 = 0.75
    assert right.compute()["cIoU"] == 0.5
    assert right.compute()["gIoU"] == 0.75
    assert right.compute()["N-acc"] == 1.0


def test_gres_keys_left_out_when_a_population_is_empty():
    only_no_target = GRESMetrics()
    only_no_target.update(EMPTY, EMPTY, torch.tensor(True))
    # one correct no-target: gIoU = 1, N-acc = 1; summed U = 0 -> cIoU = 0; no targets -> no T-acc, no Pr@X
    result = only_no_target.compute()
    assert result["gIoU"] == 1.0
    assert result["N-acc"] == 1.0
    assert result["cIoU"] == 0.0
    assert "T-acc" not in result and "Pr@0.5" not in result

    only_target = GRESMetrics()
    only_target.update(mask("#...", "....", "....", "...."), mask("#...", "....", "....", "...."), False)
    # one target, IoU 1: gIoU = cIoU = T-acc = 1; no no-target samples -> no N-acc
    result = only_target.compute()
    assert result["gIoU"] == result["cIoU"] == result["T-acc"] == 1.0
    assert "N-acc" not in result
    assert result["n_no_target"] == 0


def test_gres_pred_no_target_must_be_a_bool():
    with pytest.raises(ValueError, match="pred_no_target"):
        GRESMetrics().update(EMPTY, EMPTY, "no")


# --- SSPSAMReleaseMetrics ---------------------------------------------------------------------------------------


def release_gres_samples():
    """(pred, gt) pairs in the release's frame; with empty_threshold=3, "small" means fewer than 3 px."""
    return [
        # target, pred = gt = 3 px: I = 3, U = 3, IoU 1 (counted by the release's "N-acc"!)
        (mask("###.", "....", "....", "...."), mask("###.", "....", "....", "....")),
        # target, pred 2 px inside gt 4 px: IoU 0.5 (a "T-acc" hit: 0 < IoU < 1)
        (mask("##..", "....", "....", "...."), mask("####", "....", "....", "....")),
        # target, pred 1 px (< 3) inside gt 4 px: not read as "no target" here: IoU 0.25 (a "T-acc" hit)
        (mask("....", "#...", "....", "...."), mask("....", "####", "....", "....")),
        # target, pred 2 px disjoint from gt 2 px: I = 0, U = 4, IoU 0
        (mask("....", "....", "##..", "...."), mask("....", "....", "..##", "....")),
        # no-target, pred 2 px < 3: IoU 1, I = U = 0
        (mask("....", "....", "....", "##.."), EMPTY),
        # no-target, pred 3 px >= 3: IoU 0, I = 0, U = 3
        (mask("....", "....", "....", "###."), EMPTY),
    ]


def test_release_gres_arithmetic_with_its_quirks():
    metrics = SSPSAMReleaseMetrics("gres", empty_threshold=3)
    for pred, gt in release_gres_samples():
        metrics.update(pred, gt)
    # release IoUs: 1, 0.5, 0.25, 0, 1, 0
    # gIoU = 2.75 / 6; cIoU = (3 + 2 + 1 + 0 + 0 + 0) / (3 + 4 + 4 + 4 + 0 + 3) = 6 / 18
    # "N-acc" = samples with IoU == 1 (the perfect target and the right no-target) / 2 no-target = 1.0,
    #   although one of the two no-target samples is wrong
    # "T-acc" = samples with 0 < IoU < 1 (0.5, 0.25) / 4 targets = 0.5
    # Pr@X over all 6 samples: >= 0.5: {1, 0.5, 1} = 3/6; >= 0.55 ... >= 0.9: {1, 1} = 2/6
    result = metrics.compute()
    assert result["gIoU (SSP-SAM release)"] == pytest.approx(2.75 / 6)
    assert result["cIoU (SSP-SAM release)"] == pytest.approx(6 / 18)
    assert result["N-acc (SSP-SAM release)"] == 1.0
    assert result["T-acc (SSP-SAM release)"] == 0.5
    assert result["Pr@0.5 (SSP-SAM release)"] == 0.5
    for x in ("0.55", "0.6", "0.65", "0.7", "0.75", "0.8", "0.85", "0.9"):
        assert result[f"Pr@{x} (SSP-SAM release)"] == pytest.approx(2 / 6)
    assert list(result) == list(RELEASE_GRES_KEYS)
    rows = metrics.per_sample()
    assert [row["IoU (SSP-SAM release)"] for row in rows] == [1.0, 0.5, 0.25, 0.0, 1.0, 0.0]
    assert [row["pred_area"] for row in rows] == [3, 2, 1, 2, 2, 3]

    # The standard arithmetic on the same pairs, "no target" = fewer than 3 px: the targets predicted with 2, 1
    # and 2 px are called "no target" (score 0), so gIoU = (1 + 0 + 0 + 0 + 1 + 0) / 6; N-acc = 1 of 2;
    # T-acc = 1 of 4
    standard = GRESMetrics()
    for pred, gt in release_gres_samples():
        standard.update(pred, gt, int(pred.sum()) < 3)
    assert standard.compute()["gIoU"] == pytest.approx(2 / 6)
    assert standard.compute()["N-acc"] == 0.5
    assert standard.compute()["T-acc"] == 0.25


def test_release_res_scores_both_empty_as_one_and_reaches_a_threshold_it_equals():
    metrics = SSPSAMReleaseMetrics("res", empty_threshold=50)
    metrics.update(EMPTY, EMPTY)  # both empty: IoU 1, I = U = 0
    metrics.update(first_pixels(7), first_pixels(10))  # IoU 7 / 10 = 0.7 exactly
    # mIoU = (1 + 0.7) / 2 = 0.85; oIoU = (0 + 7) / (0 + 10) = 0.7
    # Pr@X: >= 0.5 ... >= 0.7 both = 1; >= 0.75 ... >= 0.9 only the empty pair = 0.5
    result = metrics.compute()
    assert result["mIoU (SSP-SAM release)"] == pytest.approx(0.85)
    assert result["oIoU (SSP-SAM release)"] == pytest.approx(0.7)
    assert [result[f"Pr@{x} (SSP-SAM release)"] for x in ("0.5", "0.55", "0.6", "0.65", "0.7")] == [1.0] * 5
    assert [result[f"Pr@{x} (SSP-SAM release)"] for x in ("0.75", "0.8", "0.85", "0.9")] == [0.5] * 4
    assert list(result) == list(RELEASE_RES_KEYS)
    # The standard RES arithmetic scores the empty pair 0: mIoU = (0 + 0.7) / 2
    standard = RESMetrics()
    standard.update(EMPTY, EMPTY)
    standard.update(first_pixels(7), first_pixels(10))
    assert standard.compute()["mIoU"] == pytest.approx(0.35)


def test_release_counts_left_out_without_their_population():
    only_targets = SSPSAMReleaseMetrics("gres", empty_threshold=3)
    only_targets.update(first_pixels(2), first_pixels(4))  # IoU 0.5
    # no no-target sample: no "N-acc"; "T-acc" = 1 of 1
    assert "N-acc (SSP-SAM release)" not in only_targets.compute()
    assert only_targets.compute()["T-acc (SSP-SAM release)"] == 1.0


def test_release_rejects_bad_task_and_threshold():
    with pytest.raises(ValueError, match="task"):
        SSPSAMReleaseMetrics("phrasecut")
    with pytest.raises(ValueError, match="empty_threshold"):
        SSPSAMReleaseMetrics("gres", empty_threshold=0)


# --- merging, state, per-sample records ---------------------------------------------------------------------------


def test_merge_of_ranks_equals_single_accumulation():
    single = GRESMetrics()
    rank0, rank1 = GRESMetrics(), GRESMetrics()
    for index, (pred, gt, pred_no_target) in enumerate(gres_samples()):
        group = "multi" if index % 2 else "single"
        single.update(pred, gt, pred_no_target, group=group, sample_id=index)
        (rank0 if index < 2 else rank1).update(pred, gt, pred_no_target, group=group, sample_id=index)
    # as DDP would: pickle every rank's state, rebuild and merge
    merged = GRESMetrics.from_state_dict(pickle.loads(pickle.dumps(rank0.state_dict())))
    merged.merge(GRESMetrics.from_state_dict(pickle.loads(pickle.dumps(rank1.state_dict()))))
    assert merged.compute() == single.compute()
    assert merged.compute_by_group() == single.compute_by_group()
    assert merged.per_sample() == single.per_sample()
    # same hand values as test_gres_every_case_of_the_protocol: gIoU 0.5, cIoU 3/12
    assert merged.compute()["gIoU"] == 0.5
    assert merged.compute()["cIoU"] == pytest.approx(3 / 12)
    # group "single" = samples 0 and 2: scores 1 and 1 -> gIoU 1; cIoU = 3 / 3 = 1
    assert merged.compute("single")["gIoU"] == 1.0
    assert merged.compute("single")["cIoU"] == 1.0


def test_merge_refuses_other_metrics_and_configs():
    with pytest.raises(ValueError, match="cannot merge"):
        RESMetrics().merge(GRESMetrics())
    with pytest.raises(ValueError, match="config"):
        SSPSAMReleaseMetrics("gres", 50).merge(SSPSAMReleaseMetrics("gres", 60))
    with pytest.raises(ValueError, match="config"):
        SSPSAMReleaseMetrics("gres").merge(SSPSAMReleaseMetrics("res"))
    with pytest.raises(ValueError, match="cannot be loaded"):
        RESMetrics.from_state_dict(GRESMetrics().state_dict())


def test_release_state_round_trip_keeps_its_config():
    metrics = SSPSAMReleaseMetrics("gres", empty_threshold=3)
    for pred, gt in release_gres_samples():
        metrics.update(pred, gt)
    restored = SSPSAMReleaseMetrics.from_state_dict(pickle.loads(pickle.dumps(metrics.state_dict())))
    assert (restored.task, restored.empty_threshold) == ("gres", 3)
    # same hand value as test_release_gres_arithmetic_with_its_quirks
    assert restored.compute()["gIoU (SSP-SAM release)"] == pytest.approx(2.75 / 6)


def test_per_sample_records_carry_ids_and_groups():
    metrics = RESMetrics()
    metrics.update(first_pixels(3), first_pixels(5), group="val", sample_id="ref7_sent2")
    # I = 3, U = 5, IoU = 0.6
    assert metrics.per_sample() == [
        {"sample_id": "ref7_sent2", "group": "val", "I": 3, "U": 5, "box_IoU": None, "IoU": 0.6}
    ]


# --- reporting -----------------------------------------------------------------------------------------------------


def test_report_key_orders():
    assert RES_KEYS == ("mIoU", "oIoU", "Pr@0.5", "Pr@0.6", "Pr@0.7", "Pr@0.8", "Pr@0.9", "REC-acc")
    assert GRES_KEYS == ("gIoU", "cIoU", "N-acc", "T-acc", "Pr@0.5", "Pr@0.6", "Pr@0.7", "Pr@0.8", "Pr@0.9")
    assert RELEASE_GRES_KEYS[:4] == ("gIoU (SSP-SAM release)", "cIoU (SSP-SAM release)", "N-acc (SSP-SAM release)",
                                     "T-acc (SSP-SAM release)")
    assert RELEASE_RES_KEYS[:3] == ("mIoU (SSP-SAM release)", "oIoU (SSP-SAM release)", "Pr@0.5 (SSP-SAM release)")
    assert len(RELEASE_RES_KEYS) == 2 + 9 and RELEASE_RES_KEYS[-1] == "Pr@0.9 (SSP-SAM release)"


def test_format_table_prints_percentages_counts_and_gaps():
    table = format_table({"mIoU": 0.625, "oIoU": 1 / 3, "n_samples": 3}, keys=("n_samples", "mIoU", "oIoU", "REC-acc"))
    # 0.625 -> 62.50, 1/3 -> 33.33, count as is, missing key as "-"; columns right-aligned to the longer of name/value
    assert table == (
        "n_samples   mIoU   oIoU  REC-acc\n"
        "---------  -----  -----  -------\n"
        "        3  62.50  33.33        -"
    )

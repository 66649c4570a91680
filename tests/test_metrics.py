"""Metrics on tiny hand-drawn masks; every expected number is worked out by hand in a comment."""

import pickle

import numpy as np
import pytest
import torch

from ssp_sam.metrics import (
    GRES_KEYS,
    RES_KEYS,
    SSPSAM_GRES_KEYS,
    GRESMetrics,
    RESMetrics,
    SSPSAMGRESMetrics,
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
    # I = 1, U = 1 -> IoU = 1 > 0.9 -> every Pr@X is 1
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
    ("intersection", "union", "threshold", "lower_threshold"),
    [(2, 4, 0.5, None), (3, 5, 0.6, 0.5), (7, 10, 0.7, 0.6), (4, 5, 0.8, 0.7), (9, 10, 0.9, 0.8)],
)
def test_res_precision_is_strictly_greater_at_the_threshold(intersection, union, threshold, lower_threshold):
    # pred = first `intersection` pixels, inside gt = first `union` pixels: IoU = intersection / union = threshold
    metrics = RESMetrics()
    metrics.update(first_pixels(intersection), first_pixels(union))
    result = metrics.compute()
    assert result[f"Pr@{threshold}"] == 0.0
    if lower_threshold is not None:
        assert result[f"Pr@{lower_threshold}"] == 1.0


def test_res_precision_over_several_samples():
    metrics = RESMetrics()
    for intersection, union in [(2, 4), (3, 5), (4, 5)]:
        metrics.update(first_pixels(intersection), first_pixels(union))
    # IoUs 0.5, 0.6, 0.8: > 0.5 -> {0.6, 0.8} = 2/3; > 0.6 -> {0.8} = 1/3; > 0.7 -> 1/3; > 0.8 -> 0; > 0.9 -> 0
    # mIoU = (0.5 + 0.6 + 0.8) / 3 = 1.9 / 3; oIoU = (2 + 3 + 4) / (4 + 5 + 5) = 9 / 14
    result = metrics.compute()
    assert result["Pr@0.5"] == pytest.approx(2 / 3)
    assert result["Pr@0.6"] == pytest.approx(1 / 3)
    assert result["Pr@0.7"] == pytest.approx(1 / 3)
    assert result["Pr@0.8"] == 0.0
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
        # target, said "no target", mask still counted: pred 2 px inside gt 4 px -> I = 2, U = 4, IoU 0.5, score 0.5
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
    # gIoU = (1 + 0.5 + 1 + 0) / 4 = 0.625
    # cIoU = (3 + 2 + 0 + 0) / (3 + 4 + 0 + 5) = 5 / 12
    # N-acc = 1 correct of 2 no-target = 0.5; T-acc = 1 of 2 targets not said "no target" = 0.5
    # Pr@X over the targets' IoUs {1, 0.5}: only 1 > X for every X -> 0.5
    result = metrics.compute()
    assert (result["n_samples"], result["n_target"], result["n_no_target"]) == (4, 2, 2)
    assert result["gIoU"] == pytest.approx(0.625)
    assert result["cIoU"] == pytest.approx(5 / 12)
    assert result["N-acc"] == 0.5
    assert result["T-acc"] == 0.5
    assert all(result[f"Pr@{x}"] == 0.5 for x in (0.5, 0.6, 0.7, 0.8, 0.9))
    assert [row["score"] for row in metrics.per_sample()] == [1.0, 0.5, 1.0, 0.0]


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


# --- SSPSAMGRESMetrics -------------------------------------------------------------------------------------------


def sspsam_samples():
    return [
        # no-target, 49 px in the padded frame < 50 -> correct: score 1, adds nothing (pred 2 px at original size)
        (mask("##..", "....", "....", "...."), EMPTY, 49),
        # no-target, 50 px -> wrong: score 0, adds its 3 px at original size to U
        (mask("###.", "....", "....", "...."), EMPTY, 50),
        # target, 50 px -> "target": pred 2 px inside gt 4 px, I = 2, U = 4, IoU 0.5
        (mask("##..", "....", "....", "...."), mask("####", "....", "....", "...."), 50),
        # target, 49 px -> read as "no target", mask still counted: pred = gt = 2 px, I = 2, U = 2, IoU 1
        (mask("....", "....", "....", "..##"), mask("....", "....", "....", "..##"), 49),
    ]


def test_sspsam_variant_at_49_and_50_pixels():
    metrics = SSPSAMGRESMetrics()
    for pred, gt, area in sspsam_samples():
        metrics.update(pred, gt, area)
    # gIoU = (1 + 0 + 0.5 + 1) / 4 = 0.625; cIoU = (0 + 0 + 2 + 2) / (0 + 3 + 4 + 2) = 4/9
    # N-acc = 1 of 2 = 0.5; T-acc = targets with >= 50 px = 1 of 2 = 0.5; Pr@0.5 over {0.5, 1} = 0.5
    result = metrics.compute()
    assert result["gIoU (SSP-SAM)"] == pytest.approx(0.625)
    assert result["cIoU (SSP-SAM)"] == pytest.approx(4 / 9)
    assert result["N-acc (SSP-SAM)"] == 0.5
    assert result["T-acc (SSP-SAM)"] == 0.5
    assert result["Pr@0.5"] == 0.5
    assert not {"gIoU", "cIoU", "N-acc", "T-acc"} & set(result)
    assert [row["pred_no_target"] for row in metrics.per_sample()] == [True, False, False, True]


def test_sspsam_threshold_is_a_constructor_argument():
    metrics = SSPSAMGRESMetrics(empty_threshold=51)
    for pred, gt, area in sspsam_samples():
        metrics.update(pred, gt, np.int64(area))
    # with 51, 50 px also reads as "no target": both no-targets correct, both targets said "no target"
    # gIoU = (1 + 1 + 0.5 + 1) / 4 = 0.875; cIoU = (2 + 2) / (4 + 2) = 2/3; N-acc = 1; T-acc = 0
    result = metrics.compute()
    assert result["gIoU (SSP-SAM)"] == pytest.approx(0.875)
    assert result["cIoU (SSP-SAM)"] == pytest.approx(2 / 3)
    assert result["N-acc (SSP-SAM)"] == 1.0
    assert result["T-acc (SSP-SAM)"] == 0.0


def test_sspsam_rejects_bad_area_and_threshold():
    with pytest.raises(ValueError, match="pred_area_padded"):
        SSPSAMGRESMetrics().update(EMPTY, EMPTY, 12.5)
    with pytest.raises(ValueError, match="pred_area_padded"):
        SSPSAMGRESMetrics().update(EMPTY, EMPTY, -1)
    with pytest.raises(ValueError, match="empty_threshold"):
        SSPSAMGRESMetrics(empty_threshold=0)


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
    # same hand values as test_gres_every_case_of_the_protocol: gIoU 0.625, cIoU 5/12
    assert merged.compute()["gIoU"] == pytest.approx(0.625)
    assert merged.compute()["cIoU"] == pytest.approx(5 / 12)
    # group "single" = samples 0 and 2: scores 1 and 1 -> gIoU 1; cIoU = 3 / 3 = 1
    assert merged.compute("single")["gIoU"] == 1.0
    assert merged.compute("single")["cIoU"] == 1.0


def test_merge_refuses_other_metrics_and_configs():
    with pytest.raises(ValueError, match="cannot merge"):
        RESMetrics().merge(GRESMetrics())
    with pytest.raises(ValueError, match="config"):
        SSPSAMGRESMetrics(50).merge(SSPSAMGRESMetrics(60))
    with pytest.raises(ValueError, match="cannot be loaded"):
        RESMetrics.from_state_dict(GRESMetrics().state_dict())


def test_sspsam_state_round_trip_keeps_the_threshold():
    metrics = SSPSAMGRESMetrics(empty_threshold=51)
    for pred, gt, area in sspsam_samples():
        metrics.update(pred, gt, area)
    restored = SSPSAMGRESMetrics.from_state_dict(pickle.loads(pickle.dumps(metrics.state_dict())))
    assert restored.empty_threshold == 51
    # same hand value as test_sspsam_threshold_is_a_constructor_argument
    assert restored.compute()["gIoU (SSP-SAM)"] == pytest.approx(0.875)


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
    assert SSPSAM_GRES_KEYS[:4] == ("gIoU (SSP-SAM)", "cIoU (SSP-SAM)", "N-acc (SSP-SAM)", "T-acc (SSP-SAM)")


def test_format_table_prints_percentages_counts_and_gaps():
    table = format_table({"mIoU": 0.625, "oIoU": 1 / 3, "n_samples": 3}, keys=("n_samples", "mIoU", "oIoU", "REC-acc"))
    # 0.625 -> 62.50, 1/3 -> 33.33, count as is, missing key as "-"; columns right-aligned to the longer of name/value
    assert table == (
        "n_samples   mIoU   oIoU  REC-acc\n"
        "---------  -----  -----  -------\n"
        "        3  62.50  33.33        -"
    )

"""OVSS metrics (ssp_sam/ovss/metrics.py) against confusion matrices worked out by hand."""

from __future__ import annotations

import math
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssp_sam.ovss.metrics import ConfusionMatrix, scores_from_counts

# Case A, K = 3, ignore -1. Valid (gt, pred): (0,0) (0,0) (0,1) (1,1) (1,2) (2,2).
A_TARGET = [0, 0, 0, 1, 1, 2, -1, -1]
A_PRED = [0, 0, 1, 1, 2, 2, 0, 2]
A_COUNTS = [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
# TP (2, 1, 1), GT (3, 2, 1), PRED (2, 2, 2): IoU = 2/3, 1/3, 1/2.
A_SCORES = {"mIoU": 0.5, "mIoU (GT classes)": 0.5, "fwIoU": 19 / 36, "pAcc": 2 / 3, "mACC": 13 / 18}


def _matrix(num_classes, target, pred, **kwargs):
    matrix = ConfusionMatrix(num_classes, **kwargs)
    matrix.update(torch.tensor(pred), torch.tensor(target))
    return matrix


def test_hand_worked_matrix_and_scores():
    matrix = _matrix(3, A_TARGET, A_PRED)
    assert matrix.counts.tolist() == A_COUNTS
    assert matrix.compute() == pytest.approx(A_SCORES, abs=1e-12)
    assert matrix.per_class_iou() == pytest.approx([2 / 3, 1 / 3, 1 / 2])


def test_predicted_only_class_counts_zero_and_absent_class_is_not_scored():
    # K = 4: class 2 is predicted but not in the GT (IoU 0, counted), class 3 is in neither (not counted).
    matrix = _matrix(4, [0, 0, 1, 1], [0, 2, 1, 1])
    assert matrix.counts.tolist() == [[1, 0, 1, 0], [0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    iou = matrix.per_class_iou()
    assert iou[:3] == pytest.approx([1 / 2, 1.0, 0.0]) and math.isnan(iou[3])
    # mIoU over 3 classes; mACC over the 2 classes present in the GT; fwIoU weights 2/4 and 2/4. detectron2's
    # mIoU since 2022-07 (sem_seg_evaluation.py: iou_valid needs pos_gt > 0) averages classes 0 and 1 only.
    assert matrix.compute() == pytest.approx(
        {"mIoU": 1 / 2, "mIoU (GT classes)": 3 / 4, "fwIoU": 3 / 4, "pAcc": 3 / 4, "mACC": 3 / 4}
    )


def test_seen_unseen_and_harmonic_mean():
    matrix = _matrix(4, [0, 0, 1, 1], [0, 2, 1, 1])
    scores = matrix.compute(unseen=[1, 3])
    # seen {0, 2}: (1/2 + 0) / 2; unseen {1, 3}: only class 1 is scored -> 1; h = 2 s u / (s + u).
    assert scores["mIoU seen"] == pytest.approx(1 / 4)
    assert scores["mIoU unseen"] == pytest.approx(1.0)
    assert scores["hIoU"] == pytest.approx(2 / 5)
    assert scores["mIoU"] == pytest.approx(1 / 2)
    # a group without any scorable class is left out, and so is hIoU
    only_seen = _matrix(4, [0, 0], [0, 0]).compute(unseen=[3])
    assert "mIoU unseen" not in only_seen and "hIoU" not in only_seen and only_seen["mIoU seen"] == 1.0


def test_pas20b_maps_predictions_beyond_20_to_background():
    # 21 label classes (20 VOC + background = 20); the model predicts over a 59-name vocabulary.
    matrix = _matrix(21, [20, 20, 3, 3, 255], [35, 2, 58, 3, 40], ignore_index=255, background_from=20)
    counts = matrix.counts
    assert counts[20, 20] == 1 and counts[20, 2] == 1 and counts[3, 20] == 1 and counts[3, 3] == 1
    assert int(counts.sum()) == 4  # the ignored pixel is not counted
    # IoU_20 = 1/(2+2-1), IoU_3 = 1/(2+1-1), IoU_2 = 0/(0+1): mIoU = (1/3 + 1/2 + 0) / 3
    assert matrix.compute()["mIoU"] == pytest.approx(5 / 18)
    assert matrix.compute()["pAcc"] == pytest.approx(1 / 2)
    with pytest.raises(ValueError, match="last class"):
        ConfusionMatrix(21, background_from=19)


def test_update_matches_a_plain_bincount_and_accepts_batches():
    generator = torch.Generator().manual_seed(0)
    target = torch.randint(0, 6, (3, 17, 19), generator=generator)
    target[:, :4] = 255
    pred = torch.randint(0, 5, (3, 17, 19), generator=generator)
    matrix = ConfusionMatrix(5, ignore_index=255)
    target[target == 5] = 255
    matrix.update(pred, target)
    t, p = target.numpy().ravel(), pred.numpy().ravel()
    keep = t != 255
    expected = np.bincount(t[keep] * 5 + p[keep], minlength=25).reshape(5, 5)
    assert (matrix.counts.numpy() == expected).all()


def test_merge_equals_one_matrix_and_errors():
    half = len(A_TARGET) // 2
    first = _matrix(3, A_TARGET[:half], A_PRED[:half])
    first.merge(_matrix(3, A_TARGET[half:], A_PRED[half:]))
    assert first.counts.tolist() == A_COUNTS
    with pytest.raises(ValueError, match="merge"):
        first.merge(ConfusionMatrix(4))
    with pytest.raises(ValueError, match="shape"):
        first.update(torch.zeros(2, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="no labelled pixel"):
        scores_from_counts(torch.zeros(3, 3, dtype=torch.long))


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    half = len(A_TARGET) // 2
    part = slice(0, half) if rank == 0 else slice(half, None)
    matrix = _matrix(3, A_TARGET[part], A_PRED[part])
    matrix.all_reduce()
    torch.save(matrix.counts, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_all_reduce_sums_over_ranks(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt", weights_only=True).tolist() == A_COUNTS

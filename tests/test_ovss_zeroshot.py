"""Zero-shot pixel accuracy of the cost volume (ssp_sam/ovss/zero_shot.py, scripts/ovss_zeroshot.py): the argmax
of bilinearly upsampled costs against a hand-counted label, and the script's pixel counts on hand-made scenes."""

from __future__ import annotations

import json

import torch

from conftest import run_script
from ssp_sam.ovss.zero_shot import pixel_hits
from test_ovss_engine import write_bands


def test_pixel_hits_counts_the_upsampled_argmax_over_labelled_pixels():
    # Class 0 high in the left column of a 2x2 map, class 1 in the right. Bilinear 2 -> 4 (align_corners=False):
    # output column x reads source (x + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25 -> class 0, 0, 1, 1.
    costs = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])
    label = torch.tensor([
        [0, 0, 1, 1],  # 4 right
        [1, 0, 1, 0],  # 2 right
        [-1, -1, 0, 1],  # 2 labelled, 1 right
        [-1, -1, -1, -1],  # none labelled
    ])
    assert pixel_hits(costs, label).tolist() == [7, 10]


def test_script_scores_the_labelled_pixels_of_the_first_images(tmp_path):
    write_bands(tmp_path, "val", 3, seed=2)  # 64x64 scenes, a 4x4 corner ignored: 4096 - 16 = 4080 labelled pixels each
    out = tmp_path / "zeroshot.json"
    dataset = ["ovss_dataset=semseg", f"ovss_dataset.root={tmp_path}", "ovss_dataset.split=val", "ovss_dataset.image_dir=images/val",
               "ovss_dataset.label_dir=labels/val", "ovss_dataset.image_ext=.png", "ovss_dataset.classes=classes.json"]
    done = run_script("ovss_zeroshot.py", "ovss_model=tiny", *dataset, "max_images=2", "workers=0", "threads=1", f"out={out}")
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())
    assert (record["images"], record["labelled_pixels"], record["classes"]) == (2, 2 * 4080, 3)
    assert 0 <= record["correct_pixels"] <= record["labelled_pixels"]
    assert record["pixel_accuracy"] == record["correct_pixels"] / record["labelled_pixels"]
    assert record["ovss_model"]["variant"] == "catseg"  # only CLIP runs
    assert "zero-shot pixel accuracy" in done.stdout and "chance 1/3 = 0.3333" in done.stdout

    bad = run_script("ovss_zeroshot.py", "ovss_model=tiny", *dataset, "max_images=0")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["error: max_images: must be an integer >= 1 or null, got 0"]

"""Which objects the model's masks cover, per expression kind, on regenerated ShapeWorld scenes.

    python scripts/analyze_shapeworld.py [checkpoint=DIR] task=res seed=99 n_images=200 [out=counts.json]

IoU cannot tell "the wrong object" from "the right object and its look-alikes"; this can. Each
prediction is reduced to the objects it covers (``ssp_sam.data.shapeworld.grounding``) and counted
as exact / with others / partial / wrong / nothing. The scenes and expressions are regenerated
from (seed, split, index), so the split of ``scripts/make_shapeworld.py`` with the same seed is
analysed without reading it.
"""

from __future__ import annotations

from collections import Counter

import hydra
from omegaconf import DictConfig
from tqdm import tqdm

from ssp_sam.cli import reports_errors
from ssp_sam.data.shapeworld import generate_refs, generate_scene
from ssp_sam.data.shapeworld.grounding import OUTCOME_MEANINGS, OUTCOMES, covered_objects, grounding_outcome
from ssp_sam.data.shapeworld.scene import check_non_negative_int
from ssp_sam.errors import ConfigError
from ssp_sam.fileio import write_json
from ssp_sam.predictor import Predictor


def _table(counts: dict[str, Counter]) -> str:
    header = f"{'kind':<5} {'n':>5} " + " ".join(f"{outcome:>11}" for outcome in OUTCOMES)
    lines = [header, "-" * len(header)]
    for kind, counter in counts.items():
        total = sum(counter.values())
        shares = " ".join(f"{100 * counter[outcome] / total:>10.1f}%" for outcome in OUTCOMES)
        lines.append(f"{kind:<5} {total:>5} {shares}")
    return "\n".join(lines)


@hydra.main(config_path="../configs", config_name="analyze_shapeworld", version_base="1.3")
@reports_errors
def main(cfg: DictConfig) -> None:
    n_images = check_non_negative_int(cfg.n_images, "n_images")
    if not 0.0 <= float(cfg.min_coverage) < 1.0:
        raise ConfigError(f"min_coverage: expected a fraction in [0, 1), got {cfg.min_coverage!r}")
    predictor = Predictor.from_checkpoint(cfg.checkpoint, device=cfg.device)
    counts: dict[str, Counter] = {}
    with tqdm(range(n_images), desc=f"analyse {cfg.task} seed {cfg.seed}", unit="img") as images:
        for index in images:
            scene = generate_scene(cfg.seed, cfg.split, index)
            expressions = [sentence for ref in generate_refs(scene, cfg.task) for sentence in ref.sentences]
            if not expressions:
                continue
            predictions = predictor.predict(predictor.encode_image(scene.image), [e.text for e in expressions])
            object_masks = [obj.mask for obj in scene.objects]
            for expression, prediction in zip(expressions, predictions):
                covered = covered_objects(prediction.mask, object_masks, float(cfg.min_coverage))
                counts.setdefault(expression.kind, Counter())[grounding_outcome(covered, expression.targets)] += 1
    counts = {kind: counts[kind] for kind in sorted(counts, key="ALRMN".index)}
    counts["all"] = sum(counts.values(), Counter())

    print(_table(counts))
    for outcome in OUTCOMES:
        print(f"  {outcome}: {OUTCOME_MEANINGS[outcome]}")
    if cfg.out:
        write_json(cfg.out, {
            "checkpoint": cfg.checkpoint, "task": cfg.task, "seed": cfg.seed, "split": cfg.split,
            "n_images": n_images, "min_coverage": float(cfg.min_coverage),
            "counts": {kind: {outcome: counter[outcome] for outcome in OUTCOMES} for kind, counter in counts.items()},
        })
        print(f"wrote {cfg.out}")


if __name__ == "__main__":
    main()

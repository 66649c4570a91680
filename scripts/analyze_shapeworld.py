"""Which objects the model's masks cover, per expression kind, on regenerated ShapeWorld scenes.

    python scripts/analyze_shapeworld.py [checkpoint=DIR] task=res seed=99 n_images=200 [out=counts.json]

IoU cannot tell "the wrong object" from "the right object and its look-alikes"; this can. Each
prediction is reduced to the objects it covers (``ssp_sam.data.shapeworld.grounding``) and counted
as exact / with others / partial / wrong / nothing. Location (L) sentences are also read back into
their side and the objects their description fits (``expressions.read_location``): exact answers
by side and by number of fitting objects, and which object a wrong answer took instead (the opposite
extreme, another fitting object, an object the description does not fit). The scenes and expressions are regenerated
from (seed, split, index), so the split of ``scripts/make_shapeworld.py`` with the same seed is
analysed without reading it.
"""

from __future__ import annotations

from collections import Counter

import hydra
import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from ssp_sam.cli import reports_errors
from ssp_sam.data.shapeworld import generate_refs, generate_scene
from ssp_sam.data.shapeworld.expressions import read_location
from ssp_sam.data.shapeworld.grounding import (
    LOCATION_ERROR_MEANINGS,
    LOCATION_ERRORS,
    OUTCOME_MEANINGS,
    OUTCOMES,
    covered_objects,
    grounding_outcome,
    location_error,
)
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


def _fitting_group(count: int) -> str:
    return str(count) if count < 5 else "5+"


def _location_table(location: dict[str, dict[str, Counter]], errors: Counter, n_location: int) -> str:
    """Exact answers of the L sentences per side and per number of fitting objects, and the wrong ones by kind."""
    lines = ["location (L): exact answers by side and by number of objects the description fits"]
    for title, groups in (("side", location["side"]), ("fitting", location["fitting"])):
        for group in sorted(groups, key=str):
            counter = groups[group]
            total = sum(counter.values())
            lines.append(f"  {title:<8} {group:<7} {total:>5} {100 * counter['exact'] / total:>6.1f}% exact")
    shares = ", ".join(f"{error} {100 * errors[error] / max(n_location, 1):.1f}%" for error in LOCATION_ERRORS)
    lines.append(f"  wrong answers, of all L sentences: {shares}")
    lines += [f"    {error}: {LOCATION_ERROR_MEANINGS[error]}" for error in LOCATION_ERRORS]
    return "\n".join(lines)


@hydra.main(config_path="../configs", config_name="analyze_shapeworld", version_base="1.3")
@reports_errors
def main(cfg: DictConfig) -> None:
    n_images = check_non_negative_int(cfg.n_images, "n_images")
    if not 0.0 <= float(cfg.min_coverage) < 1.0:
        raise ConfigError(f"min_coverage: expected a fraction in [0, 1), got {cfg.min_coverage!r}")
    predictor = Predictor.from_checkpoint(cfg.checkpoint, device=cfg.device)
    counts: dict[str, Counter] = {}
    location: dict[str, dict[str, Counter]] = {"side": {}, "fitting": {}}
    location_errors: Counter = Counter()
    with tqdm(range(n_images), desc=f"analyse {cfg.task} seed {cfg.seed}", unit="img") as images:
        for index in images:
            scene = generate_scene(cfg.seed, cfg.split, index)
            expressions = [sentence for ref in generate_refs(scene, cfg.task) for sentence in ref.sentences]
            if not expressions:
                continue
            predictions = predictor.predict(predictor.encode_image(scene.image), [e.text for e in expressions])
            object_masks = [obj.mask for obj in scene.objects]
            for expression, prediction in zip(expressions, predictions):
                answer = np.zeros_like(prediction.mask) if prediction.no_target else prediction.mask  # as the evaluator reads it
                covered = covered_objects(answer, object_masks, float(cfg.min_coverage))
                outcome = grounding_outcome(covered, expression.targets)
                counts.setdefault(expression.kind, Counter())[outcome] += 1
                if expression.kind == "L":
                    reading = read_location(expression.text, scene.objects)
                    location["side"].setdefault(reading.side, Counter())[outcome] += 1
                    location["fitting"].setdefault(_fitting_group(len(reading.candidates)), Counter())[outcome] += 1
                    error = location_error(covered, reading.candidates)
                    if error is not None:
                        location_errors[error] += 1
    counts = {kind: counts[kind] for kind in sorted(counts, key="ALRMN".index)}
    counts["all"] = sum(counts.values(), Counter())

    print(_table(counts))
    for outcome in OUTCOMES:
        print(f"  {outcome}: {OUTCOME_MEANINGS[outcome]}")
    n_location = sum(counts.get("L", Counter()).values())
    if n_location:
        print(_location_table(location, location_errors, n_location))
    if cfg.out:
        write_json(cfg.out, {
            "checkpoint": cfg.checkpoint, "task": cfg.task, "seed": cfg.seed, "split": cfg.split,
            "n_images": n_images, "min_coverage": float(cfg.min_coverage),
            "counts": {kind: {outcome: counter[outcome] for outcome in OUTCOMES} for kind, counter in counts.items()},
            "location": {
                "by_side": {side: dict(counter) for side, counter in location["side"].items()},
                "by_fitting_objects": {group: dict(counter) for group, counter in location["fitting"].items()},
                "wrong_answers": {error: location_errors[error] for error in LOCATION_ERRORS},
            },
        })
        print(f"wrote {cfg.out}")


if __name__ == "__main__":
    main()

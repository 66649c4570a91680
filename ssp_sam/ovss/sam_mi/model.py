"""SAM-MI: CAT-Seg with frozen SAM's masks injected (TSPP -> SAM -> SMAgg -> DMI).

Per batch: CLIP costs (:meth:`CATSeg.costs`); SAM's image embedding, once per image (or given from a
cache); point prompts from TSPP's point map (or the dense grid, ``points=grid``); SAM's filtered
proposals; SMAgg assigns them to the aggregated classes by the prompt-averaged costs and merges them
into class masks; DMI injects the class masks into aggregation (low frequency) and the decoder (high
frequency). SAM is never trained; gradients reach TSPP, DMI, CAT-Seg and CLIP's q/v.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..catseg.cost import gather_classes
from ..catseg.model import CATSeg, CostState
from ..losses import point_map_loss
from ..model import OVSSModel, OVSSOutput
from ..model_config import OVSSModelConfig
from .dmi import LowFrequencyInjection, high_frequency_maps
from .proposals import Proposals, SAMProposer, grid_points
from .smagg import assign_proposals, assign_with_confidence, merge_by_class
from .tspp import TSPPHeads, sample_points


class SAMMI(OVSSModel):
    """``variant=sam_mi``. ``catseg`` must be built with the decoder's high-frequency channels when DMI uses them."""

    def __init__(self, catseg: CATSeg, proposer: SAMProposer, config: OVSSModelConfig) -> None:
        super().__init__(catseg, config)
        self.proposer = proposer
        hidden = config.aggregator.hidden_dim
        self.tspp = TSPPHeads(hidden) if config.uses_tspp else None
        self.low_frequency = (
            nn.ModuleList(
                LowFrequencyInjection(catseg.clip.embed_dim, hidden, config.dmi.num_heads) for _ in catseg.layers
            )
            if config.dmi.low_frequency
            else None
        )

    def forward(self, images: Tensor, text: Tensor, sam_embeddings: Tensor | None = None) -> OVSSOutput:
        state = self.catseg.costs(images, text)
        embeddings = self.proposer.embed(images) if sam_embeddings is None else sam_embeddings
        if self.tspp is not None:
            tspp = self.tspp(state.embedding.detach() if self.config.tspp.detach_input else state.embedding)
            sampling = self.config.tspp if self.training else self.config.tspp.at_inference()
            points, valid = sample_points(tspp.point_map(), self.image_size, sampling)
        else:
            tspp = None
            points = grid_points(self.config.proposals.grid_side, self.image_size, images.shape[0], images.device)
            valid = torch.ones(points.shape[:2], dtype=torch.bool, device=images.device)
        proposals = self.proposer.propose(embeddings, points, valid, self.image_size)
        class_masks = self.class_masks(state, proposals)

        grid = state.embedding.shape[-1]
        coarse = F.adaptive_avg_pool2d(class_masks, (grid, grid))
        present = class_masks.flatten(2).amax(dim=-1) > 0

        def before_layer(index: int, x: Tensor) -> Tensor:
            return self.low_frequency[index](x, state.dense, coarse, present)

        extras = None
        if self.config.dmi.high_frequency:
            extras = [high_frequency_maps(class_masks, grid * 2), high_frequency_maps(class_masks, grid * 4)]
        logits = self.catseg.decode(state, before_layer if self.low_frequency is not None else None, extras)
        return OVSSOutput(logits=logits, selected=state.selected, tspp=tspp, proposals=proposals)

    def class_masks(self, state: CostState, proposals: Proposals) -> Tensor:
        """SMAgg: (B, K, Hm, Wm) class masks of the aggregated classes (SAM's low resolution): binary, or
        with ``smagg.confidence="gated"`` each proposal's part scaled by its assignment's confidence."""
        grid = state.cost.shape[-1]
        scores = gather_classes(state.cost.mean(dim=1), state.selected, dim=1)  # (B, K, g, g)
        smagg = self.config.smagg
        weights = None
        if smagg.confidence == "gated":
            assignment, weights = assign_with_confidence(
                proposals.masks(grid), proposals.valid, scores, smagg.criterion, smagg.temperature
            )
        else:
            assignment = assign_proposals(proposals.masks(grid), proposals.valid, scores, smagg.criterion)
        return merge_by_class(proposals.masks(proposals.logits.shape[-1]), assignment, scores.shape[1], weights)

    def loss(self, output: OVSSOutput, labels: Tensor, ignore_index: int = 255) -> dict[str, Tensor]:
        """{"loss", "seg", and with TSPP "tspp"}: loss = seg + tspp.loss_weight * tspp."""
        losses = super().loss(output, labels, ignore_index)
        if output.tspp is not None:
            tspp = point_map_loss(
                output.tspp.where, output.tspp.presence, labels, output.logits.shape[1], output.selected, ignore_index
            )
            losses["tspp"] = tspp
            losses["loss"] = losses["seg"] + self.config.tspp.loss_weight * tspp
        return losses

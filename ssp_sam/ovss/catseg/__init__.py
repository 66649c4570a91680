"""CAT-Seg: cost volume, aggregation, guided upsampling decoder, on a q/v fine-tuned CLIP."""

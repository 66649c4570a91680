"""ssp_sam: SSP-SAM (SAM with Semantic-Spatial Prompt) for referring expression segmentation."""

__version__ = "0.1.0"

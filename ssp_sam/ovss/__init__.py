"""Open-vocabulary semantic segmentation (OVSS): datasets, metrics and models (CAT-Seg, SAM-MI)."""

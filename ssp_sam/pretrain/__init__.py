"""Pretraining of the small frozen encoders of the ShapeWorld model: SAM (sam.py) and CLIP (clip.py)."""

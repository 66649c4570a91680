"""Training, evaluation and checkpoints of the OVSS models (``scripts/train.py experiment=ovss_*``, ``scripts/eval.py``)."""

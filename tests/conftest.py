import os

# Tests never touch the network: every checkpoint is built locally (minibloom/checkpoints.py).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

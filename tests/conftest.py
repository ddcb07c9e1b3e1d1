import os

# Tests never touch the network: every checkpoint is built locally (minibloom/checkpoints.py).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Without a GPU, the Triton kernels run in Triton's interpreter. The flag must be set before triton is imported
# (its own helpers are jit functions), so it is set here, once, for the whole session.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

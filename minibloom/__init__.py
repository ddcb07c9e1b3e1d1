"""minibloom: BLOOM/BLOOMZ and mT5/mT0 from scratch, loading Hub safetensors, with parity against transformers.

    import minibloom
    lm = minibloom.load("bloomz-560m")
    print(lm.generate("Translate to English: Je t'aime.", max_new_tokens=20))
"""
from .errors import MinibloomError
from .lm import LM, load

__all__ = ["load", "LM", "MinibloomError"]
__version__ = "0.1.0"

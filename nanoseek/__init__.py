"""nanoseek: DeepSeek-V3/V2 and R1-Zero, rebuilt from first principles in PyTorch.

    import nanoseek
    model = nanoseek.from_pretrained("checkpoint_dir")   # HF-format DeepSeek-V2/V3 directory
    logits = model(input_ids)                             # (batch, seq, vocab) float
    model.save_pretrained("out_dir")                      # loads in transformers too
"""

from .checkpoint import CheckpointError, from_pretrained, save_pretrained
from .config import PRESETS, ConfigError, ModelConfig, get_preset
from .model import Transformer

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ModelConfig",
    "PRESETS",
    "Transformer",
    "from_pretrained",
    "get_preset",
    "save_pretrained",
]
__version__ = "0.1.0"

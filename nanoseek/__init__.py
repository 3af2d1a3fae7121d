"""nanoseek: DeepSeek-V3/V2 and R1-Zero, rebuilt from first principles in PyTorch.

    import nanoseek
    model = nanoseek.from_pretrained("checkpoint_dir")   # HF-format DeepSeek-V2/V3 directory
    logits = model(input_ids)                             # (batch, seq, vocab) float
    model.save_pretrained("out_dir")                      # loads in transformers too
    engine = nanoseek.Engine("checkpoint_dir")            # absorbed-MLA decoding, continuous batching
    outputs = engine.generate(["Hello"], nanoseek.SamplingParams(max_tokens=32))
"""

from .checkpoint import CheckpointError, from_pretrained, save_pretrained
from .config import PRESETS, ConfigError, ModelConfig, get_preset
from .engine import Engine
from .model import Transformer
from .sampling import SamplingParams

__all__ = [
    "CheckpointError",
    "ConfigError",
    "Engine",
    "ModelConfig",
    "PRESETS",
    "SamplingParams",
    "Transformer",
    "from_pretrained",
    "get_preset",
    "save_pretrained",
]
__version__ = "0.1.0"

"""nanoseek: DeepSeek-V3/V2 and R1-Zero, rebuilt from first principles in PyTorch.

    import nanoseek
    model = nanoseek.from_pretrained("checkpoint_dir")   # HF-format DeepSeek-V2/V3 directory
    logits = model(input_ids)                             # (batch, seq, vocab) float
    nanoseek.save_pretrained(model, "out_dir")            # loads in transformers too
    engine = nanoseek.Engine("checkpoint_dir")            # absorbed-MLA decoding, continuous batching
    outputs = engine.generate(["Hello"], nanoseek.SamplingParams(max_tokens=32))

The packages, lowest first (each imports only those before it): `model` (the architecture), `checkpoint`
(Hugging Face files and the tokenizer), `engine` (generation), `sandbox` and `tasks` (verifiable problems and
rewards), `train` (pretraining), `rl` (GRPO, evaluation, the R1-Zero pipeline), `server` (the OpenAI API),
`bench` (every benchmark) and `cli` (the `nanoseek` command).

Imports: the public API above from `model`, `checkpoint` and `engine`.
"""

from nanoseek.checkpoint.hf import CheckpointError, from_pretrained, save_pretrained
from nanoseek.engine.engine import Engine
from nanoseek.engine.sampling import SamplingParams
from nanoseek.model.config import ConfigError, ModelConfig
from nanoseek.model.presets import PRESETS, get_preset
from nanoseek.model.transformer import Transformer

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

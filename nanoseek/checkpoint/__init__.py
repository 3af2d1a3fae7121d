"""What is read from and written to disk for a model: Hugging Face checkpoints in and out (`hf.py`: single or
sharded safetensors, MTP layers, FP8 block-quantized weights dequantized on load, pickle refused) and the
tokenizer with its chat templates (`tokenizer.py`). Everything read from a directory is checked before it is
trusted (`trust.py`: size against the machine, paths inside the directory, regular files only, the index's
shape, finite weights).

Imports: `nanoseek.model`, `nanoseek.errors`, `nanoseek.fileio`.
"""

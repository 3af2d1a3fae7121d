"""What is read from and written to disk for a model: Hugging Face checkpoints in and out (`hf.py`: single or
sharded safetensors, MTP layers, FP8 block-quantized weights dequantized on load, pickle refused) and the
tokenizer with its chat templates (`tokenizer.py`).

Imports: `nanoseek.model`, `nanoseek.errors`, `nanoseek.fileio`.
"""

"""The DeepSeek model families, one file per paper concept: configuration with Hugging Face's field names
(`config.py`) and named shapes (`presets.py`); RMSNorm and RoPE (`layers.py`); Multi-head Latent Attention
(`mla.py`); DeepSeekMoE with auxiliary-loss-free balancing (`moe.py`); the decoder block (`block.py`); Multi-Token
Prediction (`mtp.py`); the causal LM (`transformer.py`); parameter and KV-cache counts (`stats.py`); weight-only
bf16/int8/int4 storage for inference (`quant.py`).

Imports: torch and `nanoseek.errors` only. Nothing here knows about files, tokenizers or training.
"""

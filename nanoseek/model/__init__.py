"""The DeepSeek model families, one file per paper concept: configuration with Hugging Face's field names
(`config.py`) and named shapes (`presets.py`); RMSNorm and RoPE (`layers.py`); Multi-head Latent Attention
(`mla.py`); DeepSeekMoE with auxiliary-loss-free balancing (`moe.py`); the decoder block (`block.py`); Multi-Token
Prediction (`mtp.py`); the causal LM (`transformer.py`); parameter and KV-cache counts (`stats.py`); weight-only
bf16/int8/int4 storage for inference (`quant.py`). DeepSeek-V4 (`v4.py`, built by `transformer.build_model`): its
configuration (`v4_config.py`), hybrid attention (`v4_attention.py`) with compressed branches and the lightning
indexer (`csa.py`), manifold-constrained hyper-connections (`mhc.py`), hash and sqrtsoftplus routing with clamped
SwiGLU experts (`v4_moe.py`); docs/models.md.

Imports: torch and `nanoseek.errors` only. Nothing here knows about files, tokenizers or training.
"""

"""What a DeepSeek-scale run costs, before it runs: `nanoseek plan train` (FLOPs per token, step time,
GPU-hours, dollars, memory per device for a parallel layout and the smallest layout that fits) and
`nanoseek plan serve` (cache bytes per token, concurrent sequences beside the weights, the memory-bandwidth
bound on decode tokens/s, cost per million output tokens). Accelerator presets and parsing of token counts
(`hardware.py`), the training plan (`train.py`), the serving plan (`serve.py`), the published figures the plan
is checked against (`reference.py`) and the curve of `--plot` (`plot.py`).

Imports: errors, model, train (training_flops_per_token and peak_flops, reused rather than rewritten).
"""

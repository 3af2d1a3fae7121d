"""Every `nanoseek bench` measurement: nanoseek beside the reference a user would pick instead, in one run,
with the ratio. `decode.py` (engine vs transformers' `generate`), `train.py` (training step vs transformers),
`grpo.py` (GRPO step vs TRL's `GRPOTrainer`), `serve.py` (concurrent streaming clients against the server),
`quality.py` (each weight format against fp32: held-out loss, top-1 agreement, pass@1), `profile.py` (where a
decode step's time goes: operators, time outside them, host syncs).

Imports: any nanoseek package but `nanoseek.cli`; the references (transformers, TRL) where they run.
"""

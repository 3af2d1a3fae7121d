"""The engine on low-precision weights: a quantized engine batches like an fp32 one (its batched output is its
own unbatched output), the checkpoint on disk and the caller's model stay as they were, bad formats are refused."""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn

from nanoseek.checkpoint.hf import save_pretrained
from nanoseek.engine import Engine, SamplingParams
from nanoseek.model.quant import QuantLinear

from helpers import CONFIGS, random_model

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
PROMPTS = [[5, 17, 99, 3], [42, 7], [200, 201, 202, 203, 204, 205], [9] * 11]


@pytest.mark.parametrize("weights", ["bf16", "int8", "int4"])
def test_batched_output_is_the_unbatched_output(weights):
    engine = Engine(random_model(CONFIGS["v3"]), weights=weights, compile=False)
    alone = [engine.generate([p], GREEDY)[0].outputs[0].token_ids for p in PROMPTS]
    together = [o.outputs[0].token_ids for o in engine.generate(PROMPTS, GREEDY)]
    assert together == alone


def test_quantized_load_leaves_the_checkpoint_and_the_callers_model_alone(tmp_path):
    model = random_model(CONFIGS["v3"])
    save_pretrained(model, tmp_path)
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(tmp_path.iterdir())}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for source in (tmp_path, model):
        engine = Engine(source, weights="int8", compile=False)
        assert isinstance(engine.model.lm_head, QuantLinear) and engine.weights == "int8"
        engine.generate([PROMPTS[0]], GREEDY)
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(tmp_path.iterdir())} == digest
    assert isinstance(model.lm_head, nn.Linear)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_bad_format_is_refused_by_name():
    with pytest.raises(ValueError, match="fp32, bf16, int8, int4, not .int3."):
        Engine(random_model(CONFIGS["v3"]), weights="int3")

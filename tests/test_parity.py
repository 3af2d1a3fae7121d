"""nanoseek against transformers' DeepseekV2/V3/V32 on the same random weights, fp32.

Tolerance: logits within 1e-4 absolute; the loss within 1e-5 and every gradient within
1e-4 absolute of transformers' after one backward pass.
"""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
import transformers

import nanoseek
from nanoseek.checkpoint.hf import save_pretrained
from nanoseek.engine import Engine
from nanoseek.model.config import ARCHITECTURES

from helpers import CONFIGS, random_model

ATOL = 1e-4


def load_hf(path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    # transformers builds zero-width shared experts when n_shared_experts is 0; nothing to load there.
    params = dict(model.named_parameters())
    missing = [k for k in info["missing_keys"] if params[k].numel() > 0]
    assert not missing, missing
    assert not info["mismatched_keys"], info["mismatched_keys"]
    return model.eval()


def tokens(cfg, seed=1, shape=(2, 37)):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, shape, generator=g)


def test_logits_nanoseek_to_transformers(config_name, tmp_path):
    cfg = CONFIGS[config_name]
    ours = random_model(cfg).eval()
    save_pretrained(ours, tmp_path)
    hf = load_hf(tmp_path)
    assert type(hf).__name__ == ARCHITECTURES[cfg.model_type]
    x = tokens(cfg)
    with torch.no_grad():
        diff = (ours(x) - hf(x).logits).abs().max().item()
    assert diff < ATOL, f"{config_name}: max |logit diff| {diff:.2e}"


def test_logits_transformers_to_nanoseek(config_name, tmp_path):
    cfg = CONFIGS[config_name]
    # transformers builds and initializes the weights; nanoseek reads what it saved.
    save_pretrained(random_model(cfg), tmp_path / "seed")
    hf = load_hf(tmp_path / "seed")
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if p.dim() == 1 else 0.02))
    hf.save_pretrained(tmp_path / "hf")
    ours = nanoseek.from_pretrained(tmp_path / "hf")
    x = tokens(cfg, seed=2)
    with torch.no_grad():
        diff = (ours(x) - hf(x).logits).abs().max().item()
    assert diff < ATOL, f"{config_name}: max |logit diff| {diff:.2e}"


def _hf_grad(hf, cfg, native_name, grads):
    """transformers' gradient for one of nanoseek's parameters (experts are fused gate_up there)."""
    from nanoseek.checkpoint.hf import hf_names

    if ".experts." in native_name:
        layer = native_name.split(".")[1]
        kind = native_name.rsplit(".", 1)[1]
        inter = cfg.moe_intermediate_size
        if kind == "down_proj":
            return grads[f"model.layers.{layer}.mlp.experts.down_proj"]
        gate_up = grads[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
        return gate_up[:, :inter] if kind == "gate_proj" else gate_up[:, inter:]
    return grads[hf_names(cfg, native_name, cfg.n_routed_experts)[0]]


@pytest.mark.parametrize("name", ["v3", "v2_group", "v32_sparse"])
def test_training_step_loss_and_gradients(name, tmp_path):
    cfg = CONFIGS[name]
    ours = random_model(cfg)
    save_pretrained(ours, tmp_path)
    hf = load_hf(tmp_path)
    ours.train(), hf.train()
    x = tokens(cfg, shape=(2, 24))
    inputs, labels = x[:, :-1], x[:, 1:]
    loss_ours = F.cross_entropy(ours(inputs).flatten(0, 1), labels.flatten())
    loss_ours.backward()
    loss_hf = F.cross_entropy(hf(inputs).logits.flatten(0, 1), labels.flatten())
    loss_hf.backward()
    assert abs(loss_ours.item() - loss_hf.item()) < 1e-5
    grads = {n: p.grad for n, p in hf.named_parameters()}
    checked = indexer = 0
    for n, p in ours.named_parameters():
        g_hf = _hf_grad(hf, cfg, n, grads)
        if ".indexer." in n:  # top-k passes no gradient to the indexer (transformers runs it under no_grad)
            assert p.grad is None and g_hf is None, n
            indexer += 1
            continue
        assert p.grad is not None and g_hf is not None, n
        diff = (p.grad - g_hf).abs().max().item()
        assert diff < ATOL, f"{n}: max |grad diff| {diff:.2e}"
        checked += 1
    # Each MoE layer's fused gate_up_proj in transformers is two of nanoseek's tensors.
    assert checked + indexer == len(list(hf.parameters())) + len(ours.moe_layers())
    assert indexer == 5 * len(ours.dsa_layers())  # wq_b, wk, k_norm weight and bias, weights_proj


def test_a_v3_checkpoint_transformers_wrote_loads_without_its_absent_mtp_layer(tmp_path):
    """transformers builds no MTP module: a V3 checkpoint it saves keeps num_nextn_predict_layers 1 in its
    config but holds no MTP layer. nanoseek loads it with MTP off and one warning, with transformers'
    logits; an engine asked to speculate on it decodes plainly (use_mtp is ignored without MTP modules)."""
    cfg = dataclasses.replace(CONFIGS["v3"], num_nextn_predict_layers=1)
    save_pretrained(random_model(cfg), tmp_path / "seed")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "seed", dtype=torch.float32).eval()
    hf.save_pretrained(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_nextn_predict_layers"] == 1
    with pytest.warns(UserWarning, match="no MTP layer"):
        ours = nanoseek.from_pretrained(tmp_path / "hf")
    assert len(ours.mtp) == 0
    x = tokens(cfg, seed=4)
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() < ATOL
    assert not Engine(ours, use_mtp=True).use_mtp

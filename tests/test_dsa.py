"""DeepSeek Sparse Attention (V3.2) in the model: the indexer's top-k against a brute-force reference, the
three forms of sparse attention against each other, sparse against dense, and bad V3.2 configs.
Parity with transformers' DeepseekV32 (logits both ways, loss and gradients) runs in test_parity.py over
the `v32_sparse` and `v32_dense` configs.

Tolerances: fp32 throughout; the forms of attention agree within 1e-5 absolute.
"""

import json

import pytest
import torch

import nanoseek
from nanoseek.checkpoint.hf import load_config, save_pretrained
from nanoseek.model.config import ConfigError, ModelConfig
from nanoseek.model.dsa import causal_keep, selected_mask, top_positions
from nanoseek.model.layers import apply_rope
from nanoseek.model.transformer import Transformer

from helpers import CONFIGS, random_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(model, T=29, seed=1):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (2, T), generator=g)
    x = torch.randn(2, T, cfg.hidden_size, generator=g)
    cos, sin = model.rotary(torch.arange(T)[None])
    return ids, x, cos, sin


@torch.no_grad()
def test_indexer_scores_and_top_k_match_a_brute_force_reference():
    """I[t, s] = sum_j w[t, j] ReLU(q[t, j] . k[s]) (V3.2 eq. 1), computed one (t, s, j) at a time, and the
    top-k set of every query among the keys it may see, found by sorting each row in Python."""
    model = random_model(CONFIGS["v32_sparse"])
    attn = model.layers[1].self_attn
    idx = attn.indexer
    _, x, cos, sin = _inputs(model, T=13)
    c_q = attn.query_latent(x)
    keys = idx.keys(x, cos, sin)
    scores = idx(x, c_q, cos, sin, keys)
    q = idx._rotate(idx.wq_b(c_q).view(2, 13, idx.n_heads, idx.head_dim), cos, sin)
    w = idx.weights_proj(x) * idx.n_heads**-0.5
    for b in range(2):
        for t in range(13):
            for s in range(13):
                ref = sum(
                    w[b, t, j] * torch.relu(q[b, t, j] @ keys[b, s] * idx.softmax_scale) for j in range(idx.n_heads)
                )
                assert abs(scores[b, t, s].item() - ref.item()) < 1e-5
    # A keep-mask that is causal and hides a few more keys: selection never leaves it.
    keep = causal_keep(13, 13, x.device).expand(2, 1, 13, 13).clone()
    keep[0, 0, 9:, 2:5] = False
    for k in (1, 4, 13, 20):
        chosen = selected_mask(scores, keep, k)
        for b in range(2):
            for t in range(13):
                allowed = [s for s in range(13) if keep[b, 0, t, s]]
                best = sorted(allowed, key=lambda s: -scores[b, t, s].item())[:k]
                assert sorted(chosen[b, 0, t].nonzero().flatten().tolist()) == sorted(best), (k, b, t)
        positions, valid = top_positions(scores, keep, k)
        assert positions.shape[-1] == min(k, 13)
        assert torch.equal(valid, keep[:, 0].gather(-1, positions))


@torch.no_grad()
def test_absorbed_sparse_equals_absorbed_and_expanded_under_the_sparse_mask():
    """The decode form (each query's k latents gathered, DSA.absorbed_sparse) against the masked absorbed and
    expanded forms over the whole sequence, for every query of a sequence at once."""
    model = random_model(CONFIGS["v32_sparse"])
    attn = model.layers[2].self_attn
    _, x, cos, sin = _inputs(model)
    c_q = attn.query_latent(x)
    q_nope, q_pe = attn.project_q(x, c_q)
    q_pe = apply_rope(q_pe, cos, sin, attn.rope_interleave)
    c_kv, k_pe = attn.project_latent(x, cos, sin)
    keys = attn.indexer.keys(x, cos, sin)
    scores = attn.indexer(x, c_q, cos, sin, keys)
    keep = causal_keep(x.shape[1], x.shape[1], x.device)
    mask = selected_mask(scores, keep, attn.indexer.topk)
    assert (mask.sum(-1) <= attn.indexer.topk).all() and (mask.sum(-1)[..., -1] == attn.indexer.topk).all()
    expanded = attn.expanded(q_nope, q_pe, c_kv, k_pe, mask)
    absorbed = attn.absorbed(q_nope, q_pe, c_kv, k_pe, mask)
    positions, valid = top_positions(scores, keep, attn.indexer.topk)
    B, T, k = positions.shape
    take = positions.reshape(B, T * k, 1)
    c_sel = c_kv.gather(1, take.expand(-1, -1, c_kv.shape[-1])).view(B, T, k, -1)
    pe_sel = k_pe.gather(1, take.expand(-1, -1, k_pe.shape[-1])).view(B, T, k, -1)
    sparse = attn.absorbed_sparse(q_nope, q_pe, c_sel, pe_sel, valid)
    assert (absorbed - expanded).abs().max().item() < 1e-5
    assert (sparse - expanded).abs().max().item() < 1e-5


@torch.no_grad()
def test_sparsity_changes_the_output_and_a_topk_above_the_length_is_plain_mla():
    """With index_topk below the length the selection matters (logits move when attention is made dense); with
    it above, a V3.2 model is DeepSeek-V3 with an idle indexer: the same logits as the V3 model of its other
    weights."""
    sparse = random_model(CONFIGS["v32_sparse"]).eval()
    ids, *_ = _inputs(sparse, T=40)
    before = sparse(ids)
    sparse.set_dsa_stage(dense_attention=True, indexer_kl=False)
    assert (sparse(ids) - before).abs().max().item() > 1e-2
    assert torch.allclose(sparse(ids[:, :8]), before[:, :8], atol=1e-5)  # the first 8 queries see <= 8 keys

    dense = random_model(CONFIGS["v32_dense"]).eval()
    v3 = Transformer(CONFIGS["v32_dense"].replace(model_type="deepseek_v3")).eval()
    missing, unexpected = v3.load_state_dict(dense.state_dict(), strict=False)
    assert not missing and all(".indexer." in k for k in unexpected) and unexpected
    assert torch.allclose(dense(ids), v3(ids), atol=1e-5)


def test_config_round_trip_and_v3_configs_stay_free_of_indexer_keys(tmp_path):
    cfg = CONFIGS["v32_sparse"]
    d = cfg.to_hf_dict()
    assert d["architectures"] == ["DeepseekV32ForCausalLM"] and d["model_type"] == "deepseek_v32"
    assert (d["index_n_heads"], d["index_head_dim"], d["index_topk"]) == (8, 32, 8)
    assert ModelConfig.from_hf_dict(d) == cfg
    assert not {"index_n_heads", "index_head_dim", "index_topk"} & set(CONFIGS["v3"].to_hf_dict())
    save_pretrained(random_model(cfg), tmp_path)
    assert load_config(tmp_path) == cfg


def _v32(**changes):
    return {**CONFIGS["v32_sparse"].to_hf_dict(), **changes}


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"index_topk": 0}, "index_topk"),
        ({"index_topk": -5}, "index_topk"),
        ({"index_n_heads": 0}, "index_n_heads"),
        ({"index_head_dim": 4}, "index_head_dim"),  # narrower than the 8 rotated dims
        ({"index_topk": 2.5}, "index_topk"),
        ({"q_lora_rank": None}, "q_lora_rank"),
        ({"rope_interleave": False}, "rope_interleave"),
        ({"mlp_layer_types": ["sparse", "sparse", "sparse"]}, "mlp_layer_types"),
        ({"layer_types": ["full_attention"] * 3}, "layer_types"),
    ],
)
def test_bad_v32_configs_are_refused_with_the_field_named(changes, field, tmp_path):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_hf_dict(_v32(**changes))
    (tmp_path / "config.json").write_text(json.dumps(_v32(**changes)))
    with pytest.raises(ConfigError, match=field):
        nanoseek.from_pretrained(tmp_path)


def test_a_consistent_layer_pattern_is_accepted_and_written_back():
    d = _v32(mlp_layer_types=["dense", "sparse", "sparse"], layer_types=["indexed_attention"] * 3)
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg.to_hf_dict()["mlp_layer_types"] == ["dense", "sparse", "sparse"]

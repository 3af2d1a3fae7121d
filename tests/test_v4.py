"""DeepSeek-V4 (`deepseek_v4`) against transformers' DeepseekV4ForCausalLM on the same random weights, fp32, and
its parts on their own: Sinkhorn mixing, hash routing, clamped experts, config refusals, MTP (which transformers
does not build), the published shapes' parameters and KV-cache bytes (docs/models.md).

Tolerance as for V3 (test_parity.py): logits within 1e-4 absolute, the loss within 1e-5, every gradient within
1e-4. The sequences (37 tokens) are longer than the sliding window (6 or 8) and several compression windows
(rates 4, 8, 16), so every branch (window, CSA with a sparse and a dense indexer, HCA) carries weight.
"""

import dataclasses
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open

import nanoseek
from nanoseek.checkpoint.hf import load_config, save_pretrained, v4_hf_names
from nanoseek.cli import main
from nanoseek.model.config import ConfigError, ModelConfig
from nanoseek.model.mhc import sinkhorn
from nanoseek.model.moe import Experts
from nanoseek.model.presets import get_preset
from nanoseek.model.stats import format_stats, model_stats, parameter_count, v4_cache_bytes_per_token
from nanoseek.model.transformer import Transformer, build_model
from nanoseek.model.v4 import DeepseekV4
from nanoseek.model.v4_config import CSA, HCA, SLIDING, V4Config
from nanoseek.model.v4_moe import ClampedExperts, HashGate
from nanoseek.plan.serve import cache_read, cache_sizes

from helpers import random_model

ATOL = 1e-4

V4_BASE = dict(
    model_type="deepseek_v4",
    vocab_size=256,
    hidden_size=64,
    moe_intermediate_size=32,
    num_attention_heads=4,
    q_lora_rank=24,
    qk_rope_head_dim=8,
    n_routed_experts=8,
    num_experts_per_tok=2,
    scoring_func="sqrtsoftplus",
    first_k_dense_replace=0,
    routed_scaling_factor=1.5,
    max_position_embeddings=256,
    index_n_heads=8,
    index_head_dim=16,
)

CONFIGS = {
    # Every layer type, two hash layers then top-k ones; the indexer keeps 3 of up to 9 CSA entries (sparse).
    "v4_sparse": ModelConfig(
        **V4_BASE,
        num_hidden_layers=4,
        index_topk=3,
        v4=V4Config(
            head_dim=32,
            layer_types=(SLIDING, CSA, HCA, CSA),
            mlp_layer_types=("hash_moe", "hash_moe", "moe", "moe"),
            compress_rates={CSA: 4, HCA: 8},
            sliding_window=6,
            o_groups=2,
            o_lora_rank=16,
            hc_mult=4,
        ),
    ),
    # YaRN on the compressed branches (its frequencies, without its cos/sin scaling), two streams, HCA first, the
    # indexer keeping everything (dense CSA); also read from the legacy spelling below.
    "v4_yarn_dense": ModelConfig(
        **{**V4_BASE, "num_experts_per_tok": 3},
        num_hidden_layers=3,
        index_topk=64,
        rope_scaling={
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "beta_fast": 32,
            "beta_slow": 1,
        },
        v4=V4Config(
            head_dim=16,
            layer_types=(HCA, CSA, SLIDING),
            mlp_layer_types=("hash_moe", "moe", "moe"),
            compress_rates={CSA: 4, HCA: 16},
            sliding_window=8,
            o_groups=4,
            o_lora_rank=8,
            hc_mult=2,
            hc_sinkhorn_iters=10,
        ),
    ),
}


def load_hf(path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["mismatched_keys"], info["mismatched_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    return model.eval()


def tokens(cfg, seed=1, shape=(2, 37)):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, shape, generator=g)


@pytest.fixture(params=sorted(CONFIGS))
def v4_name(request):
    return request.param


def test_logits_nanoseek_to_transformers(v4_name, tmp_path):
    cfg = CONFIGS[v4_name]
    ours = random_model(cfg).eval()
    save_pretrained(ours, tmp_path)
    hf = load_hf(tmp_path)
    assert type(hf).__name__ == "DeepseekV4ForCausalLM"
    assert hf.config.layer_types == list(cfg.v4.layer_types)
    assert hf.config.mlp_layer_types == list(cfg.v4.mlp_layer_types)
    x = tokens(cfg)
    with torch.no_grad():
        diff = (ours(x) - hf(x, use_cache=False).logits).abs().max().item()
    assert diff < ATOL, f"{v4_name}: max |logit diff| {diff:.2e}"


def test_logits_transformers_to_nanoseek(v4_name, tmp_path):
    cfg = CONFIGS[v4_name]
    save_pretrained(random_model(cfg), tmp_path / "seed")
    hf = load_hf(tmp_path / "seed")
    torch.manual_seed(3)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * (0.1 if p.dim() == 1 else 0.02))
    hf.save_pretrained(tmp_path / "hf")
    ours = nanoseek.from_pretrained(tmp_path / "hf")
    assert isinstance(ours, DeepseekV4)
    x = tokens(cfg, seed=2)
    with torch.no_grad():
        diff = (ours(x) - hf(x, use_cache=False).logits).abs().max().item()
    assert diff < ATOL, f"{v4_name}: max |logit diff| {diff:.2e}"


def test_legacy_spelling_reads_the_same_model(tmp_path):
    """config.json with `compress_ratios` / `num_hash_layers` (DeepSeek's release) instead of `layer_types` /
    `mlp_layer_types`: the same model for nanoseek and for transformers."""
    cfg = CONFIGS["v4_yarn_dense"]
    save_pretrained(random_model(cfg), tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    rates = {SLIDING: 0, **raw.pop("compress_rates")}
    raw["compress_ratios"] = [rates[t] for t in raw.pop("layer_types")]
    raw["num_hash_layers"] = raw.pop("mlp_layer_types").count("hash_moe")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="compress_ratios"):
        ModelConfig.from_hf_dict(raw)  # HCA at 16 is not a ratio the legacy spelling can say (0, 4, 128)
    raw["compress_ratios"] = [128, 4, 0]
    raw["compress_rates"] = {CSA: 4, HCA: 16}  # the rate of each kind, as transformers writes it
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert load_config(tmp_path) == cfg
    hf = load_hf(tmp_path)
    assert hf.config.layer_types == list(cfg.v4.layer_types)
    x = tokens(cfg, seed=5)
    with torch.no_grad():
        assert (nanoseek.from_pretrained(tmp_path)(x) - hf(x, use_cache=False).logits).abs().max() < ATOL


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_training_step_loss_and_gradients(name, tmp_path):
    cfg = CONFIGS[name]
    ours = random_model(cfg)
    save_pretrained(ours, tmp_path)
    hf = load_hf(tmp_path)
    ours.train(), hf.train()
    x = tokens(cfg, shape=(2, 30))
    inputs, labels = x[:, :-1], x[:, 1:]
    loss_ours = F.cross_entropy(ours(inputs).flatten(0, 1), labels.flatten())
    loss_ours.backward()
    loss_hf = F.cross_entropy(hf(inputs, use_cache=False).logits.flatten(0, 1), labels.flatten())
    loss_hf.backward()
    assert abs(loss_ours.item() - loss_hf.item()) < 1e-5
    # transformers' gradients under DeepSeek's on-disk names (its experts unfused), ours mapped to the same.
    grads = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grads = transformers.core_model_loading.revert_weight_conversion(hf, grads)
    checked = indexer = 0
    for n, p in ours.named_parameters():
        names = v4_hf_names(n, cfg.n_routed_experts)
        ref = torch.stack([grads[k] for k in names]) if len(names) > 1 else grads.get(names[0])
        if ".indexer." in n and ref is None:  # top-k passes no gradient to the indexer, in both
            assert p.grad is None, n
            indexer += 1
            continue
        assert p.grad is not None and ref is not None, n
        diff = (p.grad - ref).abs().max().item()
        assert diff < ATOL, f"{n}: max |grad diff| {diff:.2e}"
        checked += 1
    assert checked + indexer == len(list(ours.parameters()))
    # the indexer's own weights (compressor kv, gate, position bias, norm; q_b_proj, weights_proj)
    assert indexer == 6 * cfg.v4.layer_types.count(CSA)


# ---- the parts on their own ------------------------------------------------------------------------------
def test_sinkhorn_mixing_matrices_are_doubly_stochastic():
    """The mixing matrices are positive, their columns sum to 1 within 1e-5 (the last normalization is by
    columns) and their rows within 1e-3 after V4's 20 iterations for N(0, 1) logits (measured: 9e-4 worst of
    10,000). Sinkhorn converges more slowly the more spread the logits: at N(0, 3²) 20 iterations leave rows
    up to 5e-2 off, 200 up to 3e-3 (measured). Every comb of a forward of the parity tests' random model (mixing
    logits of spread about 1.5): columns within 1e-5, rows within 1e-2 (measured 6e-3)."""
    torch.manual_seed(0)
    m = sinkhorn(torch.randn(10000, 4, 4), iters=20, eps=1e-6)
    assert (m > 0).all()
    assert (m.sum(dim=-2) - 1).abs().max() < 1e-5
    assert (m.sum(dim=-1) - 1).abs().max() < 1e-3
    spread = torch.randn(1000, 4, 4) * 3
    assert (sinkhorn(spread, iters=20, eps=1e-6).sum(dim=-1) - 1).abs().max() > 1e-2
    assert (sinkhorn(spread, iters=200, eps=1e-6).sum(dim=-1) - 1).abs().max() < 5e-3
    cfg = CONFIGS["v4_sparse"]
    model = random_model(cfg).eval()
    seen = []
    for layer in model.layers:
        for hc in (layer.attn_hc, layer.ffn_hc):
            hc.register_forward_hook(lambda mod, args, out: seen.append(out[2]))
    with torch.no_grad():
        model(tokens(cfg))
    assert len(seen) == 2 * cfg.num_hidden_layers
    for comb in seen:
        assert (comb > 0).all() and (comb.sum(dim=-2) - 1).abs().max() < 1e-5
        assert (comb.sum(dim=-1) - 1).abs().max() < 1e-2


def test_hash_routing_follows_the_table():
    cfg = CONFIGS["v4_sparse"]
    model = random_model(cfg).eval()
    moe = model.layers[0].mlp
    assert isinstance(moe.gate, HashGate) and moe.gate.e_score_correction_bias is None
    ids = tokens(cfg)
    x = torch.randn(ids.numel(), cfg.hidden_size)
    weights, indices, scores = moe.gate(x, ids)
    assert torch.equal(indices, moe.gate.tid2eid[ids.flatten()])
    expected = scores.gather(1, indices)
    expected = expected / expected.sum(-1, keepdim=True) * cfg.routed_scaling_factor
    assert torch.allclose(weights, expected)
    # each token's experts are distinct in a fresh table
    table = moe.gate.tid2eid
    assert (table.sort(-1).values.diff(dim=-1) > 0).all()
    assert not isinstance(model.layers[2].mlp.gate, HashGate)


def test_clamped_experts_grouped_loop_and_per_token_paths_agree():
    """V4's experts through torch._grouped_mm, the loop over experts and the per-token decode loop give the same
    outputs, and the clamp bites (a small limit changes them against plain SwiGLU)."""
    torch.manual_seed(0)
    experts = ClampedExperts(4, 16, 8, limit=0.5)
    for p in experts.parameters():
        p.data.normal_(0, 1.0)
    x, counts = torch.randn(10, 16), torch.tensor([3, 0, 5, 2])
    assert experts.use_grouped_mm
    grouped, loop = experts._grouped(x, counts), experts._loop(x, counts)
    assert (grouped - loop).abs().max() < 1e-5
    indices = torch.repeat_interleave(torch.arange(4), counts)[:, None]  # each token its one expert
    per_token = experts.few_tokens(x, torch.ones(10, 1), indices)
    assert (per_token - loop).abs().max() < 1e-5
    plain = torch.cat([Experts.one(experts, e, x[i : i + 1]) for i, e in enumerate(indices[:, 0].tolist())])
    assert (plain - loop).abs().max() > 0.1


def test_training_forward_and_backward_on_a_tiny_config():
    cfg = CONFIGS["v4_sparse"]
    model = random_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = tokens(cfg, shape=(2, 33))
    losses = []
    for _ in range(3):
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with pytest.raises(ValueError, match="positions"):
        model(x, cache=object())  # a cache needs the new tokens' positions
    with pytest.raises(ValueError, match="mask"):
        model(x, mask=torch.ones(1, 1, 33, 33, dtype=torch.bool))


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(v4=V4Config(layer_types=(SLIDING, "full_attention"))), "layer_types"),
        (dict(v4=V4Config(mlp_layer_types=("moe",) * 3)), "mlp_layer_types"),
        (dict(v4=V4Config(o_groups=3)), "o_groups"),  # 4 heads · 512 do not split in 3
        (dict(v4=V4Config(compress_rates={CSA: 4})), "compress_rates"),
        (dict(v4=V4Config(hc_mult=0)), "hc_mult"),
        (dict(v4=V4Config(swiglu_limit=float("nan"))), "swiglu_limit"),
        (dict(v4=V4Config(head_dim=4, o_groups=4)), "qk_rope_head_dim"),
        (dict(scoring_func="sigmoid"), "scoring_func"),
        (dict(n_shared_experts=2), "n_shared_experts"),
        (dict(norm_topk_prob=False), "norm_topk_prob"),
        (dict(first_k_dense_replace=1), "first_k_dense_replace"),
        (dict(q_lora_rank=0), "q_lora_rank"),
    ],
)
def test_bad_v4_configs_are_refused_naming_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**{**V4_BASE, "num_hidden_layers": 2, "index_topk": 4, **change})


def test_transformers_aliases_win_as_in_transformers():
    """transformers maps `intermediate_size` onto V4's `moe_intermediate_size` (its attribute_map), so a config
    carrying both (the Hub's tiny test checkpoint does) gets the alias's value; nanoseek reads the same."""
    raw = {k: v for k, v in CONFIGS["v4_sparse"].to_hf_dict().items() if k != "architectures"}
    raw.update(intermediate_size=48, kv_lora_rank=None, qk_nope_head_dim=448, n_group=None)
    ours = ModelConfig.from_hf_dict(dict(raw))
    theirs = transformers.DeepseekV4Config(**{k: v for k, v in raw.items() if k not in ("model_type", "dtype")})
    assert ours.moe_intermediate_size == theirs.moe_intermediate_size == 48
    assert "intermediate_size" not in ours.to_hf_dict()


def test_legacy_compress_ratios_may_list_the_mtp_layer():
    """DeepSeek's configs list one more compress ratio than layers, 0 for the MTP layer: accepted; anything else
    for it is refused (nanoseek builds MTP layers sliding-window only)."""
    raw = {k: v for k, v in CONFIGS["v4_sparse"].to_hf_dict().items() if k not in ("layer_types", "compress_rates")}
    raw["compress_ratios"] = [0, 4, 128, 4, 0]
    assert ModelConfig.from_hf_dict(dict(raw)).v4.layer_types == (SLIDING, CSA, HCA, CSA)
    raw["compress_ratios"] = [0, 4, 128, 4, 4]
    with pytest.raises(ConfigError, match="compress_ratios"):
        ModelConfig.from_hf_dict(raw)


def test_sqrtsoftplus_is_refused_outside_v4():
    with pytest.raises(ConfigError, match="scoring_func"):
        ModelConfig(scoring_func="sqrtsoftplus")


def test_a_v4_config_is_never_built_as_a_v3_model():
    cfg = CONFIGS["v4_sparse"]
    with pytest.raises(ConfigError, match="deepseek_v4"):
        Transformer(cfg)
    assert isinstance(build_model(cfg), DeepseekV4)


def test_plan_serve_models_v4s_caches(capsys):
    """`plan serve` on V4-Flash at 128K: the cache per token is the derived one (docs/models.md), and a decode step
    reads, per sequence and by hand: the 128-token window in all 43 layers, every indexer key and the top-512
    entries in the 21 CSA layers, all 1,024 entries in the 20 HCA layers; 2 bytes a value."""
    cfg, T = get_preset("deepseek-v4-flash"), 131072
    sizes = cache_sizes(cfg, 2, 8, T)
    assert sizes.mla == v4_cache_bytes_per_token(cfg, T, 2)
    window, csa, hca = 43 * 128 * 512, 21 * (T // 4 * 128 + 512 * 512), 20 * (T // 128 * 512)
    assert cache_read(cfg, sizes, "mla", T) == 2 * (window + csa + hca) == 213_778_432
    assert cache_read(cfg, sizes, "mha", T) == T * 2 * 64 * 512 * 43 * 2
    assert main(["plan", "serve", "--model", "deepseek-v4-flash", "--context", str(T)]) == 0
    out = capsys.readouterr().out
    assert "V4 window + compressed      6,923 B" in out and "(V4 cache, group of 8)" in out


def test_config_round_trip():
    for cfg in CONFIGS.values():
        assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    assert dataclasses.replace(CONFIGS["v4_sparse"]).v4 == CONFIGS["v4_sparse"].v4


# ---- the published shapes -----------------------------------------------------------------------------
# Published: V4-Flash 284B total / 13B active, V4-Pro 1.6T / 49B (model cards, tech report), rounded.
PUBLISHED = {"deepseek-v4-flash": (284e9, 13e9), "deepseek-v4-pro": (1.6e12, 49e9)}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_counts(name):
    """Counted on the meta device and by arithmetic, the main model equal to transformers' DeepseekV4ForCausalLM
    of the same config (which builds no MTP). Against the published figures, which carry two significant digits:
    Flash's total (284.33B) and Pro's active (48.85B) within 1%; Flash's active (13.27B, "13B") and Pro's total
    (1.573T, "1.6T") within that rounding plus 1%, as test_cli holds V2's and V3's; Pro with its MTP module
    (1.5988T) within 0.1% of 1.6T."""
    cfg = get_preset(name)
    s = model_stats(cfg)
    assert s.total + s.mtp == parameter_count(cfg)
    with torch.device("meta"):
        hf_cfg = transformers.DeepseekV4Config(
            **{k: v for k, v in cfg.to_hf_dict().items() if k not in ("model_type", "architectures", "dtype")}
        )
        assert s.total == sum(p.numel() for p in transformers.DeepseekV4ForCausalLM(hf_cfg).parameters())
    total, active = PUBLISHED[name]
    assert abs(s.total / total - 1) < 0.025 and abs(s.active / active - 1) < 0.025
    if name == "deepseek-v4-flash":
        assert abs(s.total / total - 1) < 0.01
        assert s.mtp == 6_610_048_635  # one MTP module: a sliding-window layer, e/h projections, norms, head
    else:
        assert abs(s.active / active - 1) < 0.01
        assert abs((s.total + s.mtp) / total - 1) < 0.001


def test_info_cli_on_the_v4_presets(capsys):
    assert main(["info", "deepseek-v4-pro"]) == 0
    out = capsys.readouterr().out
    assert "30 CSA" in out and "31 HCA" in out and "9,909 B" in out and "9,856 B" in out and "25.84B" in out
    assert main(["info", "deepseek-v4-flash"]) == 0
    assert "284.33B" in capsys.readouterr().out


def test_kv_cache_bytes_per_token_match_the_derivation_in_docs():
    """bf16 values; the hand derivation is in docs/models.md. Flash: 21 CSA layers cache (512 + 128) values per 4
    tokens, 20 HCA layers 512 per 128 tokens, every layer its last 128 tokens' 512 values."""
    flash, pro = get_preset("deepseek-v4-flash"), get_preset("deepseek-v4-pro")
    k128, m1 = 128 * 1024, 1024 * 1024
    assert (
        v4_cache_bytes_per_token(flash, k128)
        == 2 * (21 * 640 * k128 // 4 + 20 * 512 * k128 // 128 + 43 * 128 * 512) / k128
    )
    assert round(v4_cache_bytes_per_token(flash, k128)) == 6923
    assert round(v4_cache_bytes_per_token(flash, m1)) == 6885
    assert (
        v4_cache_bytes_per_token(pro, k128)
        == 2 * (30 * 640 * k128 // 4 + 31 * 512 * k128 // 128 + 61 * 128 * 512) / k128
    )
    assert round(v4_cache_bytes_per_token(pro, k128)) == 9909
    assert round(v4_cache_bytes_per_token(pro, m1)) == 9856
    # V3's MLA latent (576 values a layer) and V3.2's latent + indexer key, 61 layers, bf16: context-independent
    assert model_stats(get_preset("deepseek-v3")).latent_cache_bytes == 70272
    v32 = model_stats(get_preset("deepseek-v3.2"))
    assert v32.latent_cache_bytes + v32.index_cache_bytes == 85888
    # MHA of V4's shape: K and V for every head of 512 in every layer
    assert model_stats(flash).mha_cache_bytes == 2 * 64 * 512 * 43 * 2 == 5636096
    assert model_stats(pro).mha_cache_bytes == 2 * 128 * 512 * 61 * 2 == 15990784
    text = format_stats("deepseek-v4-flash", flash, model_stats(flash))
    assert "21 CSA" in text and "20 HCA" in text and "6,923 B" in text and "6,885 B" in text


# ---- Multi-Token Prediction ------------------------------------------------------------------------------
MTP_CFG = dataclasses.replace(CONFIGS["v4_sparse"], num_nextn_predict_layers=2)


def test_mtp_modules_round_trip_under_deepseeks_names_and_transformers_skips_them(tmp_path):
    """V4's MTP modules follow DeepSeek's inference code (transformers builds none, so there is no reference to
    compare their numbers with): saved under DeepSeek's `mtp.K.` names, read back to the same logits of every
    depth; transformers loads the same checkpoint, skips them, and agrees on the main logits."""
    ours = random_model(MTP_CFG).eval()
    save_pretrained(ours, tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        names = set(f.keys())
    for name in (
        "mtp.0.e_proj.weight",
        "mtp.0.h_proj.weight",
        "mtp.0.enorm.weight",
        "mtp.0.hc_head_fn",
        "mtp.1.attn.wq_a.weight",
        "mtp.1.hc_attn_fn",
        "mtp.1.ffn.experts.7.w3.weight",
        "mtp.1.norm.weight",
    ):
        assert name in names, name
    assert not any(n.startswith("mtp.") and ".compressor." in n for n in names)  # MTP layers: sliding window only
    back = nanoseek.from_pretrained(tmp_path)
    x = tokens(MTP_CFG)
    with torch.no_grad():
        assert torch.equal(back(x), ours(x))
        ours_mtp, back_mtp = ours.mtp_logits(ours.streams(x), x), back.mtp_logits(back.streams(x), x)
        assert [t.shape[1] for t in ours_mtp] == [36, 35]
        assert all(torch.equal(a, b) for a, b in zip(ours_mtp, back_mtp))
        hf = load_hf(tmp_path)
        assert (ours(x) - hf(x, use_cache=False).logits).abs().max() < ATOL


def test_a_v4_checkpoint_transformers_wrote_loads_without_its_absent_mtp(tmp_path):
    save_pretrained(random_model(MTP_CFG), tmp_path / "seed")
    load_hf(tmp_path / "seed").save_pretrained(tmp_path / "hf")
    with pytest.warns(UserWarning, match="no MTP layer"):
        ours = nanoseek.from_pretrained(tmp_path / "hf")
    assert len(ours.mtp) == 0


def test_mtp_trains_with_the_main_model():
    model = random_model(MTP_CFG).train()
    x = tokens(MTP_CFG, shape=(2, 33))
    streams = model.streams(x)
    logits = model.lm_head(model.norm(model.hc_head(streams)))
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    for k, mtp in enumerate(model.mtp_logits(streams, x), start=1):  # position i predicts token i+k+1
        loss = loss + F.cross_entropy(mtp[:, :-1].flatten(0, 1), x[:, k + 1 :].flatten())
    loss.backward()
    assert all(p.grad is not None for n, p in model.mtp.named_parameters() if ".indexer." not in n)
    assert model.layers[0].attn_hc.fn.grad is not None

"""Checkpoint format: round trips, sharding, MTP layers, FP8 dequantization, config spellings, bad input."""

import json
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import nanoseek
from nanoseek import CheckpointError, ConfigError, ModelConfig, Transformer
from nanoseek.checkpoint.hf import dequantize_fp8, save_pretrained

from helpers import CONFIGS, random_model


def same_weights(a: Transformer, b: Transformer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k].float(), sb[k].float()), k


def test_round_trip_with_mtp_and_sharding(tmp_path):
    cfg = CONFIGS["v3"].replace(num_nextn_predict_layers=2)
    model = random_model(cfg)
    save_pretrained(model, tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    # MTP modules live at model.layers.{num_hidden_layers + k}, with V3's copies of embedding and head
    assert "model.layers.3.eh_proj.weight" in index["weight_map"]
    assert "model.layers.4.shared_head.head.weight" in index["weight_map"]
    assert "model.layers.4.mlp.experts.7.down_proj.weight" in index["weight_map"]
    loaded = nanoseek.from_pretrained(tmp_path)
    same_weights(model, loaded)
    x = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        h1, h2 = model.eval().hidden_states(x), loaded.hidden_states(x)
        for a, b in zip(model.mtp_logits(h1, x), loaded.mtp_logits(h2, x)):
            torch.testing.assert_close(a, b)


def test_dtype_and_device_on_load(tmp_path):
    model = random_model(CONFIGS["v3"])
    save_pretrained(model, tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    tensors = load_file(tmp_path / "model.safetensors")
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    loaded = nanoseek.from_pretrained(tmp_path, device="cpu", dtype=torch.bfloat16)
    assert loaded.embed_tokens.weight.dtype == torch.bfloat16
    bias = loaded.moe_layers()[0].gate.e_score_correction_bias
    assert bias.dtype == torch.float32
    assert torch.equal(bias, model.moe_layers()[0].gate.e_score_correction_bias)  # not rounded through bf16
    assert loaded(torch.tensor([[1, 2, 3]])).dtype == torch.float32


@pytest.mark.parametrize("scale_fmt", ["fp32", "ue8m0"])
def test_fp8_block_quantized_checkpoint_loads_dequantized(tmp_path, scale_fmt):
    """DeepSeek's FP8 release: float8_e4m3fn weights, one fp32 weight_scale_inv per 128x128 block; V3.1's
    UE8M0 scales are powers of two (rounded up, so the block still fits), stored here as float8_e8m0fnu."""
    cfg = CONFIGS["v3"].replace(hidden_size=160, intermediate_size=272)  # several 128-blocks, ragged edges
    model = random_model(cfg)
    save_pretrained(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    expected = {}
    torch.manual_seed(0)
    for name in list(tensors):
        t = tensors[name]
        if t.dim() != 2 or "embed" in name or "lm_head" in name or "norm" in name or ".gate.weight" in name:
            continue  # DeepSeek keeps these in bf16/fp32
        M, N = t.shape
        # DeepSeek's recipe: each block's scale maps its absmax onto fp8's largest value, 448
        padded = torch.zeros(-(-M // 128) * 128, -(-N // 128) * 128)
        padded[:M, :N] = t.abs()
        absmax = padded.view(-(-M // 128), 128, -(-N // 128), 128).amax(dim=(1, 3))
        scale = absmax.clamp_min(1e-12) / 448.0
        if scale_fmt == "ue8m0":
            scale = torch.exp2(torch.log2(scale).ceil())
        q = (t / scale.repeat_interleave(128, 0)[:M].repeat_interleave(128, 1)[:, :N]).to(torch.float8_e4m3fn)
        tensors[name] = q
        stored = scale.to(torch.float8_e8m0fnu) if scale_fmt == "ue8m0" else scale
        assert torch.equal(stored.float(), scale)  # a power of two is exact in e8m0
        tensors[name.removesuffix("weight") + "weight_scale_inv"] = stored
        expected[name] = q.float() * scale.repeat_interleave(128, 0)[:M].repeat_interleave(128, 1)[:, :N]
    assert any(t.shape[0] > 128 and t.shape[1] > 128 for t in expected.values()), "need multi-block tensors"
    save_file(tensors, tmp_path / "model.safetensors")
    cfg_json = json.loads((tmp_path / "config.json").read_text())
    cfg_json["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "weight_block_size": [128, 128],
        "activation_scheme": "dynamic",
        **({"scale_fmt": "ue8m0"} if scale_fmt == "ue8m0" else {}),
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg_json))
    loaded = nanoseek.from_pretrained(tmp_path)
    sd = loaded.state_dict()
    torch.testing.assert_close(sd["layers.0.mlp.gate_proj.weight"], expected["model.layers.0.mlp.gate_proj.weight"])
    torch.testing.assert_close(
        sd["layers.2.self_attn.kv_b_proj.weight"], expected["model.layers.2.self_attn.kv_b_proj.weight"]
    )
    torch.testing.assert_close(
        sd["layers.1.mlp.experts.up_proj"][5], expected["model.layers.1.mlp.experts.5.up_proj.weight"]
    )
    # and the dequantized weights are close to the originals (e4m3 keeps 3 mantissa bits: relative error <= 1/16)
    orig = model.state_dict()["layers.0.mlp.gate_proj.weight"]
    assert ((sd["layers.0.mlp.gate_proj.weight"] - orig).abs() <= orig.abs() / 16 + 1e-6).all()


def test_dequantize_fp8_rejects_bad_scale_shape():
    with pytest.raises(CheckpointError, match="weight_scale_inv"):
        dequantize_fp8(torch.zeros(300, 200, dtype=torch.float8_e4m3fn), torch.ones(2, 2))


# ---- bad input ----------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    save_pretrained(random_model(CONFIGS["v2_greedy"]), tmp_path)
    return tmp_path


def test_missing_tensor_is_named(saved):
    tensors = load_file(saved / "model.safetensors")
    del tensors["model.layers.1.self_attn.kv_b_proj.weight"]
    save_file(tensors, saved / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.kv_b_proj\.weight is missing"):
        nanoseek.from_pretrained(saved)


def test_missing_expert_is_named(saved):
    tensors = load_file(saved / "model.safetensors")
    del tensors["model.layers.2.mlp.experts.6.up_proj.weight"]
    save_file(tensors, saved / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"experts\.6\.up_proj\.weight is missing"):
        nanoseek.from_pretrained(saved)


def test_wrong_shape_is_named(saved):
    tensors = load_file(saved / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(64, 63)
    save_file(tensors, saved / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"o_proj\.weight has shape \(64, 63\), expected \(64, 64\)"):
        nanoseek.from_pretrained(saved)


def test_unexpected_tensor_is_named(saved):
    tensors = load_file(saved / "model.safetensors")
    tensors["model.layers.0.self_attn.mystery.weight"] = torch.zeros(2)
    save_file(tensors, saved / "model.safetensors")
    with pytest.raises(CheckpointError, match="mystery"):
        nanoseek.from_pretrained(saved)


def test_unknown_model_type(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["model_type"] = "llama"
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unknown model_type 'llama'"):
        nanoseek.from_pretrained(saved)


def test_malformed_config(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        nanoseek.from_pretrained(saved)


def test_corrupt_safetensors_is_named(saved):
    (saved / "model.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file"):
        nanoseek.from_pretrained(saved)


class _Boom:
    """Unpickling this would create a file: proof of code execution if it ever happened."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_checkpoint_refused_and_never_unpickled(saved, tmp_path_factory):
    canary = tmp_path_factory.mktemp("canary") / "executed"
    (saved / "model.safetensors").unlink()
    (saved / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom(str(canary))))
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*safetensors only"):
        nanoseek.from_pretrained(saved)
    assert not canary.exists()


def test_missing_directory():
    with pytest.raises(CheckpointError, match="does not exist"):
        nanoseek.from_pretrained("/nonexistent/ckpt")


def test_sharded_index_names_missing_shard(tmp_path):
    save_pretrained(random_model(CONFIGS["v3"]), tmp_path, max_shard_bytes=100_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        nanoseek.from_pretrained(tmp_path)


# ---- config.json ---------------------------------------------------------------------------------
def hub_v3_config():
    """DeepSeek-V3's config.json as released (older spelling, remote-code keys)."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
        "model_type": "deepseek_v3",
        "vocab_size": 129280,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "num_hidden_layers": 61,
        "num_nextn_predict_layers": 1,
        "num_attention_heads": 128,
        "num_key_value_heads": 128,
        "n_shared_experts": 1,
        "n_routed_experts": 256,
        "ep_size": 1,
        "routed_scaling_factor": 2.5,
        "kv_lora_rank": 512,
        "q_lora_rank": 1536,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "qk_nope_head_dim": 128,
        "topk_method": "noaux_tc",
        "n_group": 8,
        "topk_group": 4,
        "num_experts_per_tok": 8,
        "moe_layer_freq": 1,
        "first_k_dense_replace": 3,
        "norm_topk_prob": True,
        "scoring_func": "sigmoid",
        "hidden_act": "silu",
        "max_position_embeddings": 163840,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-06,
        "use_cache": True,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "tie_word_embeddings": False,
        "rope_theta": 10000,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 40,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096,
            "type": "yarn",
        },
        "attention_bias": False,
        "attention_dropout": 0.0,
        "torch_dtype": "bfloat16",
        "quantization_config": {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [128, 128],
        },
    }


def test_hub_config_reads_as_the_v3_preset():
    cfg = ModelConfig.from_hf_dict(hub_v3_config())
    preset = nanoseek.get_preset("deepseek-v3")
    for field in (
        "hidden_size",
        "q_lora_rank",
        "n_group",
        "topk_group",
        "rope_theta",
        "rope_scaling",
        "num_nextn_predict_layers",
        "routed_scaling_factor",
        "first_k_dense_replace",
    ):
        assert getattr(cfg, field) == getattr(preset, field), field
    assert cfg.extra["ep_size"] == 1  # unknown keys survive a round trip
    assert abs(cfg.softmax_scale - 192**-0.5 * (0.1 * 1.0 * __import__("math").log(40) + 1) ** 2) < 1e-12


def test_both_rope_spellings_read_the_same():
    old = hub_v3_config()
    new = dict(old)
    new.pop("rope_theta")
    scaling = dict(new.pop("rope_scaling"))
    scaling.pop("type")
    new["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, **scaling}
    a, b = ModelConfig.from_hf_dict(old), ModelConfig.from_hf_dict(new)
    assert a.rope_scaling == b.rope_scaling and a.rope_theta == b.rope_theta
    # and writing keeps both spellings, which read back identically
    again = ModelConfig.from_hf_dict(a.to_hf_dict())
    assert again.rope_scaling == a.rope_scaling and again.rope_theta == a.rope_theta
    d = a.to_hf_dict()
    assert d["rope_parameters"]["rope_type"] == "yarn" and d["rope_scaling"]["type"] == "yarn"


def test_config_round_trip_every_preset(tmp_path):
    for name in nanoseek.PRESETS:
        cfg = nanoseek.get_preset(name)
        cfg.to_json(tmp_path / "config.json")
        assert ModelConfig.from_json(tmp_path / "config.json") == cfg, name


def test_v2_config_defaults():
    cfg = ModelConfig.from_hf_dict(
        {
            **hub_v3_config(),
            "model_type": "deepseek_v2",
            "topk_method": "greedy",
            "scoring_func": "softmax",
            "q_lora_rank": None,
        }
    )
    assert cfg.q_lora_rank == 0 and cfg.topk_method == "greedy"


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"n_group": 3}, "divide into n_group"),
        ({"topk_method": "magic"}, "unknown topk_method"),
        ({"num_experts_per_tok": 300}, "num_experts_per_tok"),
        ({"qk_rope_head_dim": 63}, "must be even"),
    ],
)
def test_invalid_config_named(bad, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_hf_dict({**hub_v3_config(), **bad})


META_BUILD = """
import resource, sys, torch
import nanoseek
from nanoseek.model.transformer import Transformer
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.device("meta"):
    model = Transformer(nanoseek.get_preset("deepseek-v3"))
assert all(p.is_meta for p in model.parameters())
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def test_published_shapes_build_on_meta_without_memory():
    """In a fresh interpreter: the peak RSS of this process already holds every earlier test's peak, so growth
    measured here could hide behind it."""
    proc = subprocess.run([sys.executable, "-c", META_BUILD], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    grown_mb = float(proc.stdout.split()[-1])
    assert grown_mb < 500, f"building V3 on meta grew the peak RSS by {grown_mb:.0f} MB"

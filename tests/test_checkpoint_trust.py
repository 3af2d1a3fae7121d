"""Checkpoints from strangers: every hostile or broken directory fails fast with an error naming the field,
file or tensor (sizes before anything is built, paths before anything is opened, NaN/Inf as tensors load),
nothing blocks, and what nanoseek writes has ordinary file modes."""

import json
import os
import socket
import stat
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import nanoseek
from nanoseek import CheckpointError, ConfigError, Transformer
from nanoseek.checkpoint import trust
from nanoseek.checkpoint.hf import load_config, save_pretrained
from nanoseek.checkpoint.tokenizer import Tokenizer, train_tokenizer
from nanoseek.cli import generate as cli_generate
from nanoseek.cli import main
from nanoseek.engine.engine import Engine
from nanoseek.errors import NanoseekError
from nanoseek.model.config import FIELD_LIMITS
from nanoseek.model.stats import parameter_count

from helpers import CONFIGS, random_model

pytestmark = pytest.mark.usefixtures("one_thread")

INDEX = "model.safetensors.index.json"
TENSOR = "model.layers.0.self_attn.o_proj.weight"
EXPERT = "model.layers.2.mlp.experts.5.up_proj.weight"


@pytest.fixture
def saved(tmp_path):
    root = tmp_path / "ckpt"
    save_pretrained(random_model(CONFIGS["v2_greedy"]), root)
    return root


@pytest.fixture
def sharded(tmp_path):
    root = tmp_path / "sharded"
    save_pretrained(random_model(CONFIGS["v3"]), root, max_shard_bytes=100_000)
    return root


def edit_config(root, **changes):
    cfg = json.loads((root / "config.json").read_text())
    cfg.update(changes)
    (root / "config.json").write_text(json.dumps(cfg))


# ---- sizes: bounded per field, then against the machine, before any module is built --------------------
@pytest.mark.parametrize("value", [1_000_000, 10**9])
def test_absurd_layer_count_is_named_fast(saved, value):
    edit_config(saved, num_hidden_layers=value)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=f"num_hidden_layers={value} is over nanoseek's limit of 1,024"):
        nanoseek.from_pretrained(saved)
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("value", [10**9, 1e9, "4096"])
def test_absurd_hidden_size_is_named(saved, value):
    edit_config(saved, hidden_size=value)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="hidden_size"):
        nanoseek.from_pretrained(saved)
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("value", [0, -1])
def test_nonpositive_max_position_embeddings_is_refused_at_load(saved, value):
    edit_config(saved, max_position_embeddings=value)
    with pytest.raises(ConfigError, match=f"max_position_embeddings={value} must be positive"):
        nanoseek.from_pretrained(saved)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"vocab_size": 0}, "vocab_size=0 must be positive"),
        ({"n_routed_experts": 1 << 20}, "n_routed_experts"),
        ({"moe_layer_freq": 0}, "moe_layer_freq"),
        ({"num_nextn_predict_layers": -1}, "num_nextn_predict_layers"),
        ({"kv_lora_rank": 4.5}, "kv_lora_rank must be an integer"),
        ({"rms_norm_eps": -1e-6}, "rms_norm_eps must be a finite number > 0"),
        ({"rope_theta": 0}, "rope_theta"),
        ({"rope_theta": "big"}, "rope_theta must be a number"),
        ({"routed_scaling_factor": float("nan")}, "routed_scaling_factor"),
        ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false"),
        ({"eos_token_id": []}, "eos_token_id is an empty list"),
        ({"bos_token_id": "<s>"}, "bos_token_id must be an integer"),
        ({"rope_scaling": [1, 2]}, "rope_scaling must be an object"),
        ({"rope_scaling": {"type": "yarn", "factor": float("inf")}}, "rope_scaling.factor"),
        ({"rope_scaling": {"type": "yarn", "factor": 4, "beta_fast": -1}}, "beta_fast"),
        ({"quantization_config": [128]}, "quantization_config must be an object"),
        ({"quantization_config": {"weight_block_size": [0, 0]}}, "weight_block_size"),
        ({"quantization_config": {"weight_block_size": "128"}}, "weight_block_size"),
    ],
)
def test_nonsensical_config_values_are_named_at_load(saved, change, match):
    cfg = json.loads((saved / "config.json").read_text())
    del cfg["rope_parameters"]  # the newer spelling, read before rope_theta and rope_scaling
    (saved / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ConfigError, match=match):
        nanoseek.from_pretrained(saved)


def test_config_that_is_not_an_object(saved):
    (saved / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        nanoseek.from_pretrained(saved)


def test_published_shapes_are_within_the_field_limits():
    for name in nanoseek.PRESETS:
        nanoseek.get_preset(name).validate()  # and every parity config was built by helpers already


def test_parameter_count_by_arithmetic_matches_the_meta_build():
    configs = [*CONFIGS.values(), *(nanoseek.get_preset(n) for n in ("tiny", "small", "deepseek-v3"))]
    for cfg in configs:
        for c in (cfg, cfg.replace(tie_word_embeddings=True, attention_bias=True, num_nextn_predict_layers=2)):
            with torch.device("meta"):
                model = Transformer(c)
            assert parameter_count(c) == sum(p.numel() for p in model.parameters())


def test_model_too_big_for_the_machine_is_named_before_anything_is_built(tmp_path, monkeypatch):
    """DeepSeek-V3's published config.json with no weights: refused for its size, not for the missing files."""
    v3 = nanoseek.get_preset("deepseek-v3")
    (tmp_path / "config.json").write_text(json.dumps(v3.to_hf_dict()))
    monkeypatch.setattr(trust, "host_memory", lambda: 24 * 1024**3)
    monkeypatch.setattr(Transformer, "__init__", lambda *a, **k: pytest.fail("a module was built"))
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"num_hidden_layers=61.*would need 2\.5 TiB of float32 weights; "):
        nanoseek.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"1\.2 TiB of bfloat16 weights; this machine has 24\.0 GiB"):
        nanoseek.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert time.perf_counter() - start < 2.0


def test_largest_shape_within_the_field_limits_is_refused_fast(tmp_path):
    """Every size field at its limit: counted by arithmetic, so refused at once, never built even on meta."""
    limits = FIELD_LIMITS
    cfg = CONFIGS["v2_greedy"].replace(
        num_hidden_layers=limits["num_hidden_layers"][1],
        hidden_size=limits["hidden_size"][1],
        vocab_size=limits["vocab_size"][1],
        num_nextn_predict_layers=limits["num_nextn_predict_layers"][1],
    )
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="would need .* TiB of float32 weights; this machine has"):
        nanoseek.from_pretrained(tmp_path)
    assert time.perf_counter() - start < 2.0


def test_a_model_that_fits_a_small_budget_loads(saved, monkeypatch):
    need = parameter_count(load_config(saved)) * 4
    monkeypatch.setattr(trust, "host_memory", lambda: need)
    nanoseek.from_pretrained(saved)
    monkeypatch.setattr(trust, "host_memory", lambda: need - 1)
    with pytest.raises(CheckpointError, match="this machine has"):
        nanoseek.from_pretrained(saved)


# ---- paths: inside the directory, regular files only, never blocking -----------------------------------
def load_in_thread(root, timeout=20.0, load=nanoseek.from_pretrained):
    """load(root) (default: from_pretrained) in a thread: returns the exception it raised (None if it loaded);
    fails the test instead of hanging the suite if it blocks (on a FIFO: a writer is then opened to release the
    reader)."""
    result = {}

    def run():
        try:
            load(root)
            result["error"] = None
        except Exception as e:  # noqa: BLE001 (handed to the test)
            result["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        for p in root.rglob("*"):
            if stat.S_ISFIFO(os.lstat(p).st_mode):
                try:
                    os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:
                    pass
        pytest.fail(f"loading {root} blocked for {timeout} s")
    return result["error"]


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_fifo_under_a_checkpoint_name_is_refused_without_blocking(saved, name):
    (saved / name).unlink()
    os.mkfifo(saved / name)
    start = time.perf_counter()
    error = load_in_thread(saved)
    assert isinstance(error, NanoseekError) and f"{name} in {saved} is a FIFO, not a regular file" in str(error)
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_fifo_tokenizer_files_are_refused_without_blocking(tmp_path, name):
    root = tmp_path / "tok"
    train_tokenizer(["a small corpus for a small tokenizer, 0123456789"] * 20, vocab_size=300).save_pretrained(root)
    (root / name).unlink()
    os.mkfifo(root / name)
    error = load_in_thread(root, load=Tokenizer.from_pretrained)
    assert isinstance(error, CheckpointError) and f"{name} in {root} is a FIFO, not a regular file" in str(error)


def test_fifo_shard_and_fifo_index_are_refused(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    os.mkfifo(shard)
    error = load_in_thread(sharded)
    assert isinstance(error, CheckpointError) and f"{shard.name} in {sharded} is a FIFO" in str(error)
    (sharded / INDEX).unlink()
    os.mkfifo(sharded / INDEX)
    error = load_in_thread(sharded)
    assert isinstance(error, CheckpointError) and f"{INDEX} in {sharded} is a FIFO" in str(error)


def test_socket_and_directory_named_like_weights_are_refused(saved, tmp_path):
    (saved / "model.safetensors").unlink()
    (saved / "model.safetensors").mkdir()
    with pytest.raises(CheckpointError, match="model.safetensors in .* is a directory, not a regular file"):
        nanoseek.from_pretrained(saved)
    (saved / "model.safetensors").rmdir()
    short = tmp_path / "s"  # AF_UNIX paths are short
    short.mkdir()
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(short / "model.safetensors"))
        for f in ("config.json",):
            os.replace(saved / f, short / f)
        with pytest.raises(CheckpointError, match="is a socket, not a regular file"):
            nanoseek.from_pretrained(short)
    finally:
        sock.close()


def point_index_at(root, target):
    index = json.loads((root / INDEX).read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"] = {k: (target if v == first else v) for k, v in index["weight_map"].items()}
    (root / INDEX).write_text(json.dumps(index))
    return first


def test_index_naming_a_file_outside_is_refused(sharded):
    first = sorted(sharded.glob("model-*.safetensors"))[0]
    os.replace(first, sharded.parent / "outside.safetensors")  # a valid shard, one level up
    point_index_at(sharded, "../outside.safetensors")
    with pytest.raises(CheckpointError, match=r"\.\./outside\.safetensors, named in .* points outside"):
        nanoseek.from_pretrained(sharded)
    point_index_at(sharded, "sub/../../outside.safetensors")
    with pytest.raises(CheckpointError, match="points outside"):
        nanoseek.from_pretrained(sharded)


def test_index_naming_an_absolute_path_is_refused(sharded):
    first = sorted(sharded.glob("model-*.safetensors"))[0]
    outside = sharded.parent / "outside.safetensors"
    os.replace(first, outside)
    point_index_at(sharded, str(outside))
    with pytest.raises(CheckpointError, match="is an absolute path"):
        nanoseek.from_pretrained(sharded)


def test_symlink_escaping_the_directory_is_refused(sharded, saved):
    """A shard (or the single weight file) that is a link to a file outside, even a valid one."""
    first = sorted(sharded.glob("model-*.safetensors"))[0]
    outside = sharded.parent / "outside.safetensors"
    os.replace(first, outside)
    first.symlink_to(outside)
    with pytest.raises(CheckpointError, match=f"{first.name}, named in .* is a link to .*outside"):
        nanoseek.from_pretrained(sharded)
    other = saved.parent / "elsewhere"
    other.mkdir()
    os.replace(saved / "model.safetensors", other / "w.safetensors")
    (saved / "model.safetensors").symlink_to(os.path.relpath(other / "w.safetensors", saved))
    with pytest.raises(CheckpointError, match="model.safetensors is a link to .*elsewhere"):
        nanoseek.from_pretrained(saved)


def test_symlinks_inside_the_directory_and_a_hub_cache_snapshot_load(tmp_path):
    """The Hugging Face hub cache: snapshots/<rev>/<file> are links to ../../blobs/<hash>."""
    repo = tmp_path / "models--someone--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    model = random_model(CONFIGS["v2_greedy"])
    save_pretrained(model, tmp_path / "plain")
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in (tmp_path / "plain").iterdir():
        os.replace(f, blobs / f"hash-{f.name}")
        (snap / f.name).symlink_to(f"../../blobs/hash-{f.name}")
    loaded = nanoseek.from_pretrained(snap)
    assert torch.equal(loaded.embed_tokens.weight, model.embed_tokens.weight)


@pytest.mark.parametrize(
    "index,match",
    [
        ([1, 2], "must hold a JSON object, got list"),
        ({"metadata": {}}, "has no weight_map"),
        ({"weight_map": ["model-00001-of-00002.safetensors"]}, "weight_map must map tensor names to file names"),
        ({"weight_map": "model.safetensors"}, "weight_map must map tensor names to file names, got str"),
        ({"weight_map": {TENSOR: 3}}, r"weight_map\['.*o_proj.weight'\] = 3 is not a .safetensors file name"),
        ({"weight_map": {TENSOR: None}}, "= None is not a .safetensors file name"),
        ({"weight_map": {TENSOR: ["a.safetensors"]}}, "is not a .safetensors file name"),
        ({"weight_map": {TENSOR: "config.json"}}, "'config.json' is not a .safetensors file name"),
        ({"weight_map": {"": "model-00001-of-00002.safetensors"}}, "empty tensor name"),
    ],
)
def test_malformed_index_is_a_named_checkpoint_error(sharded, index, match):
    (sharded / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=match):
        nanoseek.from_pretrained(sharded)


def test_index_that_is_not_json(sharded):
    (sharded / INDEX).write_text("{weight_map")
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        nanoseek.from_pretrained(sharded)


def test_rope_theta_in_the_newer_spelling_is_checked_too(saved):
    edit_config(saved, rope_parameters={"rope_type": "default", "rope_theta": -5})
    with pytest.raises(ConfigError, match="rope_theta must be a finite number > 1"):
        nanoseek.from_pretrained(saved)


# ---- values: NaN and Inf are an error naming the tensor, unless allowed --------------------------------
def poison(root, name, value, index=(0, 0)):
    tensors = load_file(root / "model.safetensors")
    tensors[name][index] = value
    save_file(tensors, root / "model.safetensors")


@pytest.mark.parametrize("value,counts", [(float("nan"), "1 NaN and 0 infinite"), (float("inf"), "0 NaN and 1")])
def test_nonfinite_weight_is_named_and_loads_when_allowed(saved, value, counts):
    poison(saved, TENSOR, value)
    with pytest.raises(CheckpointError, match=rf"tensor {TENSOR} in model.safetensors holds {counts}"):
        nanoseek.from_pretrained(saved)
    with pytest.warns(UserWarning, match=f"1 tensor.*NaN or Inf.*{TENSOR}"):
        model = nanoseek.from_pretrained(saved, allow_nonfinite=True)
    w = model.layers[0].self_attn.o_proj.weight
    assert not torch.isfinite(w[0, 0]) and torch.isfinite(w.flatten()[1:]).all()


def test_nonfinite_expert_and_router_bias_are_named(saved, tmp_path):
    poison(saved, EXPERT, float("-inf"), (3, 1))
    with pytest.raises(CheckpointError, match=rf"tensor {EXPERT} in model.safetensors holds 0 NaN and 1 inf"):
        nanoseek.from_pretrained(saved)
    v3 = tmp_path / "v3"
    save_pretrained(random_model(CONFIGS["v3"]), v3)
    poison(v3, "model.layers.1.mlp.gate.e_score_correction_bias", float("nan"), 2)
    with pytest.raises(CheckpointError, match=r"e_score_correction_bias in model.safetensors holds 1 NaN"):
        nanoseek.from_pretrained(v3)


def test_nonfinite_in_a_bf16_checkpoint_and_in_a_shard(tmp_path, sharded):
    save_pretrained(random_model(CONFIGS["v2_greedy"]), tmp_path / "bf16", dtype=torch.bfloat16)
    poison(tmp_path / "bf16", TENSOR, float("nan"))
    for dtype in (None, torch.bfloat16):
        with pytest.raises(CheckpointError, match=f"tensor {TENSOR} in model.safetensors holds 1 NaN"):
            nanoseek.from_pretrained(tmp_path / "bf16", dtype=dtype)
    index = json.loads((sharded / INDEX).read_text())["weight_map"]
    shard = index["model.norm.weight"]
    tensors = load_file(sharded / shard)
    tensors["model.norm.weight"][5] = float("nan")
    save_file(tensors, sharded / shard)
    with pytest.raises(CheckpointError, match=f"tensor model.norm.weight in {shard} holds 1 NaN"):
        nanoseek.from_pretrained(sharded)


def test_fp8_weight_with_a_nonfinite_scale_or_value_is_named(saved):
    """FP8 weights are checked after dequantization: an Inf scale, or an fp8 NaN, shows there."""
    tensors = load_file(saved / "model.safetensors")
    w = tensors[TENSOR]
    tensors[TENSOR] = (w / 0.01).to(torch.float8_e4m3fn)
    tensors[TENSOR.removesuffix("weight") + "weight_scale_inv"] = torch.tensor([[float("inf")]])
    save_file(tensors, saved / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"tensor {TENSOR} in model.safetensors holds"):
        nanoseek.from_pretrained(saved)
    tensors[TENSOR.removesuffix("weight") + "weight_scale_inv"] = torch.tensor([[0.01]])
    save_file(tensors, saved / "model.safetensors")
    nanoseek.from_pretrained(saved)  # finite: loads
    tensors[TENSOR][1, 2] = float("nan")
    save_file(tensors, saved / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"tensor {TENSOR} in model.safetensors holds 1 NaN"):
        nanoseek.from_pretrained(saved)


def test_a_weight_that_overflows_the_load_dtype_is_named(saved):
    poison(saved, TENSOR, 1e6)  # finite in float32, Inf in float16
    nanoseek.from_pretrained(saved)
    with pytest.raises(CheckpointError, match="tensor layers.0.self_attn.o_proj.weight cast to torch.float16 holds"):
        nanoseek.from_pretrained(saved, dtype=torch.float16)
    with pytest.warns(UserWarning):
        nanoseek.from_pretrained(saved, dtype=torch.float16, allow_nonfinite=True)


def test_engine_and_generate_pass_allow_nonfinite_through(saved, monkeypatch):
    poison(saved, TENSOR, float("nan"))
    with pytest.raises(CheckpointError, match=TENSOR):
        Engine(saved)
    with pytest.warns(UserWarning, match=TENSOR):
        assert Engine(saved, allow_nonfinite=True).model is not None
    (saved / "tokenizer.json").write_text("{}")
    seen = []

    def fake_engine(path, **kw):
        seen.append(kw["allow_nonfinite"])
        raise NanoseekError("stop here")

    monkeypatch.setattr(cli_generate, "Engine", fake_engine)
    base = ["generate", "--model", str(saved), "--prompt", "hi"]
    assert main(base) == 2 and main([*base, "--allow-nonfinite-weights"]) == 2
    assert seen == [False, True]


# ---- what nanoseek writes: ordinary modes -----------------------------------------------------------------
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_saved_files_have_the_modes_open_would_give(tmp_path, umask, mode):
    model = random_model(CONFIGS["v3"])
    tokenizer = train_tokenizer(["What is 2 + 3? <think> 5 </think>"] * 20, vocab_size=256)
    old = os.umask(umask)
    try:
        for out, shard in ((tmp_path / "single", 1 << 30), (tmp_path / "sharded", 100_000)):
            save_pretrained(model, out, max_shard_bytes=shard)
            tokenizer.save_pretrained(out)
            files = sorted(out.iterdir())
            names = {f.name for f in files}
            assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
            assert "model.safetensors" in names or INDEX in names
            for f in files:
                assert stat.S_IMODE(os.stat(f).st_mode) == mode, f"{f.name}: {oct(os.stat(f).st_mode)}"
    finally:
        os.umask(old)

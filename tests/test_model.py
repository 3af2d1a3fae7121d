"""Model behaviour that has no transformers counterpart: MTP, positions, the balance loss hook."""

import torch
import torch.nn.functional as F

from nanoseek import Transformer, get_preset
from nanoseek.checkpoint.hf import save_pretrained

from helpers import CONFIGS, random_model


def test_forward_shape_and_dtype():
    model = Transformer(get_preset("tiny"))
    logits = model(torch.randint(0, 2048, (3, 17)))
    assert logits.shape == (3, 17, 2048) and logits.dtype == torch.float32


def test_causal_prefix_invariance():
    model = random_model(CONFIGS["v3"]).eval()
    x = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        full, prefix = model(x), model(x[:, :12])
    torch.testing.assert_close(full[:, :12], prefix, atol=1e-5, rtol=1e-5)


def test_explicit_positions_equal_default():
    model = random_model(CONFIGS["v2_greedy"]).eval()
    x = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x, positions=torch.arange(9)[None]))
        # a shifted window sees different rotations, so logits change
        assert not torch.allclose(model(x), model(x, positions=torch.arange(5, 14)[None]))


def test_mtp_depths_shapes_and_causality():
    cfg = CONFIGS["v3"].replace(num_nextn_predict_layers=2)
    model = random_model(cfg).eval()
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        h = model.hidden_states(x)
        d1, d2 = model.mtp_logits(h, x)
        assert d1.shape == (2, 15, 256) and d2.shape == (2, 14, 256)
        # depth k at position i sees tokens up to i+k only: changing the last token leaves earlier outputs alone
        y = x.clone()
        y[:, -1] = (y[:, -1] + 1) % 256
        e1, e2 = model.mtp_logits(model.hidden_states(y), y)
        torch.testing.assert_close(d1[:, :-1], e1[:, :-1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(d2[:, :-1], e2[:, :-1], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(d1[:, -1], e1[:, -1])


def test_mtp_loss_trains_mtp_and_shared_weights():
    cfg = CONFIGS["v3"].replace(num_nextn_predict_layers=1)
    model = random_model(cfg).train()
    x = torch.randint(0, 256, (2, 12))
    inputs, labels = x[:, :-1], x[:, 1:]
    (d1,) = model.mtp_logits(model.hidden_states(inputs), inputs)
    F.cross_entropy(d1.flatten(0, 1), labels[:, 1:].flatten()).backward()
    assert model.mtp[0].eh_proj.weight.grad.abs().sum() > 0
    assert model.embed_tokens.weight.grad.abs().sum() > 0  # shared embedding
    assert model.lm_head.weight.grad.abs().sum() > 0  # shared head


def test_sequence_balance_loss_collected_in_training():
    cfg = CONFIGS["v3"].replace(aux_loss_alpha=1e-2)
    model = random_model(cfg).train()
    model(torch.randint(0, 256, (2, 8)))
    aux = model.aux_loss()
    assert torch.is_tensor(aux) and aux.item() > 0 and aux.requires_grad
    assert Transformer(CONFIGS["v3"]).train().aux_loss() == 0.0  # α = 0: nothing computed


def test_tied_embeddings_share_storage(tmp_path):
    import nanoseek

    model = random_model(CONFIGS["v3"].replace(tie_word_embeddings=True))
    assert model.lm_head.weight is model.embed_tokens.weight
    save_pretrained(model, tmp_path)
    loaded = nanoseek.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    x = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), loaded(x))


class DenseLatentCache:
    """The smallest LatentCache: per-layer tensors grown by concatenation (the engine pages them)."""

    def __init__(self, n_layers: int, absorb: bool = False):
        self.c_kv, self.k_pe, self.keys, self.absorb = [None] * n_layers, [None] * n_layers, [None] * n_layers, absorb

    @staticmethod
    def _grow(store, i, new):
        store[i] = new if store[i] is None else torch.cat([store[i], new], 1)
        S, T = store[i].shape[1], new.shape[1]
        return store[i], torch.ones(T, S, dtype=torch.bool).tril(S - T)[None, None]

    def update(self, i, c_kv, k_pe):
        self._grow(self.k_pe, i, k_pe)
        c_kv, mask = self._grow(self.c_kv, i, c_kv)
        return c_kv, self.k_pe[i], mask

    def update_index(self, i, keys):  # DSA layers: the indexer's keys
        return self._grow(self.keys, i, keys)

    def gather(self, i, c_kv, k_pe, positions):  # DSA sparse decode: only the selected rows
        c_kv, k_pe, _ = self.update(i, c_kv, k_pe)
        B, T, k = positions.shape
        take = positions.reshape(B, T * k, 1)
        return tuple(t.gather(1, take.expand(-1, -1, t.shape[-1])).view(B, T, k, -1) for t in (c_kv, k_pe))


def test_absorbed_decode_equals_expanded_attention(config_name):
    """Prefill 12 tokens, then decode 8 one at a time over the latent cache, in the expanded and in
    the absorbed form: both equal the uncached forward within 1e-4 (fp32)."""
    from helpers import CONFIGS

    model = random_model(CONFIGS[config_name]).eval()
    x = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(x)
        for absorb in (False, True):
            cache = DenseLatentCache(len(model.layers))
            steps = [model(x[:, :12], cache=cache)]
            cache.absorb = absorb
            for t in range(12, 20):
                steps.append(model(x[:, t : t + 1], positions=torch.tensor([[t]]), cache=cache))
            diff = (torch.cat(steps, 1) - full).abs().max().item()
            assert diff < 1e-4, f"absorb={absorb}: {diff:.2e}"
        # and one absorbed step against one expanded step on the same cache contents
        q = torch.randn(2, 1, model.config.hidden_size)
        attn = model.layers[1].self_attn
        c_kv, k_pe = torch.randn(2, 15, attn.kv_lora_rank), torch.randn(2, 15, attn.qk_rope_head_dim)
        q_nope, q_pe = attn.project_q(q)
        mask = torch.ones(2, 1, 1, 15, dtype=torch.bool)
        torch.testing.assert_close(
            attn.absorbed(q_nope, q_pe, c_kv, k_pe, mask),
            attn.expanded(q_nope, q_pe, c_kv, k_pe, mask),
            atol=1e-5,
            rtol=1e-4,
        )

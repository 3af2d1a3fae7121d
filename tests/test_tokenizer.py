"""The tokenizer: training, ids, round trips, and chat templates rendered identically by transformers."""

import json

import pytest
import transformers

from nanoseek.checkpoint.tokenizer import (
    ASSISTANT,
    BOS,
    EOS,
    R1_ZERO_PREAMBLE,
    USER,
    Tokenizer,
    TokenizerError,
    train_tokenizer,
)

CORPUS = [
    f"What is {a} + {b}? <think> {a} + {b} = {a + b} </think> <answer>{a + b}</answer>"
    for a in range(0, 3000, 7)
    for b in (13, 908)
] + ["The quick brown fox jumps over the lazy dog. ü ß 中文"] * 20

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "<think> 2 + 2 = 4 </think> 4"},
    {"role": "user", "content": "And 3 + 3?"},
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=512)


def test_ids_and_sizes(tok):
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert tok.vocab_size <= 512
    for t in ("<think>", "</think>", "<answer>", "</answer>"):
        assert len(tok.encode(t)) == 1


def test_digits_are_single_tokens_and_text_round_trips(tok):
    ids = tok.encode("12345")
    assert len(ids) == 5 and tok.decode(ids) == "12345"
    text = "Any text, even unseen: ü ß 中文 ☃ <answer>42</answer>"
    assert tok.decode(tok.encode(text)) == text


def test_skip_special_keeps_reasoning_tags(tok):
    ids = tok.encode("<think> a </think> <answer>7</answer>") + [tok.eos_id]
    assert tok.decode(ids, skip_special_tokens=True) == "<think> a </think> <answer>7</answer>"


def test_decode_stream_reassembles_split_characters(tok):
    text = "ü 中文 fine"
    ids = tok.encode(text)
    stream, pieces = tok.decode_stream(), []
    for i in ids:
        piece = stream.step(tok.tk, i)
        if piece is not None:
            pieces.append(piece)
    assert "".join(pieces) == text


def test_save_and_load(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = Tokenizer.from_pretrained(tmp_path)
    assert again.encode("What is 17 + 4?") == tok.encode("What is 17 + 4?")
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == EOS and cfg["chat_template"]


@pytest.mark.parametrize("template", ["deepseek", "r1_zero"])
@pytest.mark.parametrize("gen", [True, False])
def test_transformers_renders_the_same_chat(tok, tmp_path, template, gen):
    tok.with_chat_template(template).save_pretrained(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = Tokenizer.from_pretrained(tmp_path)
    for messages in (CONVERSATION, CONVERSATION[1:2], CONVERSATION[1:3]):
        theirs = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert theirs == ours.apply_chat_template(messages, add_generation_prompt=gen)
        assert hf.encode(theirs, add_special_tokens=False) == ours.encode(theirs)


def test_template_layouts(tok):
    ds = tok.apply_chat_template(CONVERSATION)
    # earlier reasoning is dropped from the history, as DeepSeek's API asks
    assert ds == f"{BOS}Be brief.{USER}What is 2 + 2?{ASSISTANT}4{EOS}{USER}And 3 + 3?{ASSISTANT}"
    zero = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}], template="r1_zero")
    assert zero == f"{BOS}{R1_ZERO_PREAMBLE} User: What is 2 + 2? Assistant:"


def test_bad_input(tok, tmp_path):
    with pytest.raises(TokenizerError, match="role"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}])
    with pytest.raises(TokenizerError, match="string content"):
        tok.apply_chat_template([{"role": "user", "content": 5}])
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot be read"):
        Tokenizer.from_pretrained(tmp_path)

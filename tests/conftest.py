"""Shared fixtures: a tiny random-weight Llama with a real byte-level BPE tokenizer.

Unit tests run on it in milliseconds; only tests marked ``integration`` load the
embedded default model.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The refund policy allows returns within 21 days with form RF-20.",
    "Travel above 500 crowns is approved by the finance lead, Ida Marsh.",
    "Badges are issued at the front desk of the Lisbon office between 9 and 11.",
    "What is the refund policy? Who approves travel? Where are badges issued?",
] * 4


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def make_tiny_model(seed: int = 0, layers: int = 2, max_positions: int = 1024):
    from transformers import LlamaConfig, LlamaForCausalLM

    import cag

    tokenizer = _tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    # Random weights rarely pick EOS; that is fine, answers stop at max_new_tokens.
    return cag.wrap_model(model, tokenizer, name=f"tiny-llama-{seed}")


@pytest.fixture(scope="session")
def tiny():
    return make_tiny_model()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh cache home for one test, also exported as CAG_HOME for the CLI."""
    path = tmp_path / "cag-home"
    monkeypatch.setenv("CAG_HOME", str(path))
    return path


@pytest.fixture
def docs(tmp_path) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "refunds.md").write_text("# Refunds\nReturns are accepted within 21 days with form RF-20.\n")
    (folder / "travel.md").write_text("# Travel\nTravel above 500 crowns is approved by Ida Marsh, the finance lead.\n")
    (folder / "badges.txt").write_text("Badges are issued at the Lisbon front desk between 9 and 11.\n")
    return folder


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.pop("CAG_STORE", None)  # a developer's shared store must not receive the tests' caches


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One redis-server for the session; tests keep apart by key prefix (see ``redis_url``)."""
    from redis_servers import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    """A URL of the session's Redis with a prefix of this test's own."""
    import uuid

    return f"{redis_server.url}?prefix=t{uuid.uuid4().hex[:12]}:"


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory):
    """A three-node Redis Cluster on loopback ports."""
    from redis_servers import RedisCluster

    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster")).start()
    yield cluster
    cluster.stop()


def save_tiny_model(folder: Path, seed: int = 0, **kwargs) -> Path:
    """A tiny model saved as a model folder, for tests that go through `--model PATH`."""
    lm = make_tiny_model(seed=seed, **kwargs)
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def real_home(tmp_path_factory) -> Path:
    """A cache home holding the embedded default model, converted once per test session."""
    from cag.model import load_model

    path = tmp_path_factory.mktemp("real-home")
    load_model(home=path)  # converts the embedded GGUF into path/models
    return path


def header_of(path: Path) -> dict:
    """The JSON header of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])


def rewrite_header(path: Path, edit) -> None:
    """Rewrite a safetensors file's header through ``edit(header)``, keeping the data as it is."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


_GGUF_LINEARS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """The rotary row order llama.cpp's converter writes q and k in."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(lm, path):
    """Write the tiny model's linear layers as a Q4_1 GGUF (its head as Q8_0), and give the model
    the weights a GGUF loader would: each layer de-quantized from its blocks."""
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    config = lm.model.config
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    writer = GGUFWriter(str(path), "llama")
    for i, layer in enumerate(lm.model.model.layers):
        for kind, module in _GGUF_LINEARS.items():
            linear = layer.get_submodule(module)
            w = linear.weight.detach().numpy()
            if kind in heads:
                w = _llama_cpp_permute(w, heads[kind])
            blocks = quants.quantize(w, GGMLQuantizationType.Q4_1)
            writer.add_tensor(f"blk.{i}.{kind}.weight", blocks, raw_shape=blocks.shape, raw_dtype=GGMLQuantizationType.Q4_1)
            back = quants.dequantize(blocks, GGMLQuantizationType.Q4_1)
            if kind in heads:
                back = _unpermute(back, heads[kind])
            with torch.no_grad():
                linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(back)))
    head = lm.model.lm_head  # the tiny model's head is its own (untied): GGUF's "output", in Q8_0
    blocks = quants.quantize(head.weight.detach().numpy(), GGMLQuantizationType.Q8_0)
    writer.add_tensor("output.weight", blocks, raw_shape=blocks.shape, raw_dtype=GGMLQuantizationType.Q8_0)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(np.ascontiguousarray(quants.dequantize(blocks, GGMLQuantizationType.Q8_0))))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path

"""`--quantize q4`: a GGUF's own Q4_1 weights, computed by torch's packed int4 kernel."""

from __future__ import annotations

import pytest
import torch

import cag
from cag.errors import ModelError
from cag.gguf_blocks import HEAD, dequantize, linear_blocks, split_q4_1
from cag.int4 import Int4Linear, use_gguf_int4

from conftest import make_tiny_model, write_tiny_gguf



def test_int4_linear_computes_the_blocks_weights():
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (96, 64))
    d, m = torch.rand(96, 2) * 0.1, torch.randn(96, 2) * 0.1
    weight = (codes.float().view(96, 2, 32) * d[..., None] + m[..., None]).view(96, 64)
    x = torch.randn(5, 3, 64)
    out = Int4Linear.from_q4_1(codes, d.half(), m.half())(x)
    assert out.shape == (5, 3, 96) and out.dtype == torch.float32
    ref = x @ (codes.float().view(96, 2, 32) * d.half().float()[..., None] + m.half().float()[..., None]).view(96, 64).t()
    # The kernel runs in bfloat16: agreement to its precision, not bit for bit.
    torch.testing.assert_close(out, ref, atol=0.05 * ref.abs().max().item(), rtol=0.02)
    assert not torch.allclose(out, x @ torch.zeros_like(weight).t())


def test_gguf_blocks_are_the_weights_a_gguf_loader_gives(tmp_path):
    lm = make_tiny_model(seed=1)
    path = write_tiny_gguf(lm, tmp_path / "tiny.gguf")
    found = dict(linear_blocks(lm.model.config, path))
    assert torch.equal(dequantize(found.pop(HEAD)), lm.model.lm_head.weight)  # Q8_0
    assert len(found) == 7 * lm.model.config.num_hidden_layers
    for name, blocks in found.items():
        codes, d, m = split_q4_1(blocks)
        assert codes.max() <= 15 and d.dtype == m.dtype == torch.float16
        assert torch.equal(dequantize(blocks), lm.model.model.get_submodule(name).weight), name


def test_q4_model_answers_from_the_cache_as_from_a_full_prefill(tmp_path, home, docs):
    lm = make_tiny_model(seed=2)
    path = write_tiny_gguf(lm, tmp_path / "tiny.gguf")
    float_fingerprint = cag.wrap_model(lm.model, lm.tokenizer, name="tiny").fingerprint
    q4 = cag.wrap_model(lm.model, lm.tokenizer, name="tiny", quantize="q4", gguf=path)
    assert q4.name == "tiny:q4" and q4.fingerprint != float_fingerprint
    assert sum(isinstance(m, Int4Linear) for m in q4.model.modules()) == 7 * lm.model.config.num_hidden_layers
    assert not any(isinstance(m, torch.nn.Linear) and m is not q4.model.lm_head for m in q4.model.modules())
    kb = cag.build([docs], name="kb", model=q4, home=home)
    for question in ("Who approves travel?", "Where are badges issued?"):
        cached = kb.ask(question, max_new_tokens=10)
        full = kb.ask(question, max_new_tokens=10, use_cache=False)
        assert cached.token_ids == full.token_ids and cached.reused_tokens > 0 == full.reused_tokens


def test_q4_needs_gguf_weights(tmp_path, tiny_dir):
    lm = make_tiny_model(seed=3)
    with pytest.raises(ModelError, match="GGUF"):
        cag.wrap_model(lm.model, lm.tokenizer, name="tiny", quantize="q4")
    with pytest.raises(ModelError, match="only the default model"):
        cag.load_model(str(tiny_dir), quantize="q4")
    empty = tmp_path / "empty.gguf"
    from gguf import GGUFWriter

    writer = GGUFWriter(str(empty), "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelError, match="no Q4_1"):
        use_gguf_int4(make_tiny_model(seed=3).model, empty)


@pytest.mark.integration
def test_the_default_model_computes_with_its_gguf_blocks_when_asked(real_home):
    from cag.home import models_dir
    from cag.model import load_model
    from cag.prefill import prefill

    q4 = load_model(home=real_home, quantize="q4")
    assert q4.quantize == "q4" and q4.name.endswith(":q4")
    assert sum(isinstance(m, Int4Linear) for m in q4.model.modules()) == 7 * q4.num_layers
    packs = list((models_dir(real_home) / "int4").glob("*.int4.safetensors"))
    assert len(packs) == 1  # packed once, then read back
    again = load_model("SmolLM2-135M-Instruct:q4", home=real_home)
    assert again.fingerprint == q4.fingerprint
    dense = load_model(home=real_home, quantize="none")
    assert dense.fingerprint == load_model(home=real_home).fingerprint
    assert dense.quantize is None and dense.fingerprint != q4.fingerprint
    ids = list(q4.tokenizer("The refund policy allows returns within", add_special_tokens=False)["input_ids"])
    logits = [prefill(lm, ids).last_logits for lm in (q4, again, dense)]
    assert torch.equal(logits[0], logits[1])  # packs read back compute exactly what fresh packing does
    assert logits[0].argmax() == logits[2].argmax()  # the same model: bfloat16 rounding, not other weights

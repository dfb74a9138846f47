"""Opt-in int8 weights and the thread count: a quantized model is a model of its own."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import cag
from cag.cli.main import app
from cag.errors import CacheMismatchError, ModelError
from cag.model import default_threads, set_threads
from cag.quantize import Int8Linear


@pytest.fixture(scope="module")
def fp32(tiny_dir):
    return cag.load_model(str(tiny_dir))


@pytest.fixture(scope="module")
def int8(tiny_dir):
    return cag.load_model(str(tiny_dir), quantize="int8")


def _logits(lm, ids):
    with torch.inference_mode():
        return lm.model(input_ids=torch.tensor([ids])).logits[0].float()


def test_int8_replaces_linear_weights_and_has_its_own_fingerprint(tiny_dir, fp32, int8):
    linear = [m for m in fp32.model.modules() if isinstance(m, torch.nn.Linear)]
    quantized = [m for m in int8.model.modules() if isinstance(m, Int8Linear)]
    assert len(quantized) == len(linear) > 0 and not any(isinstance(m, torch.nn.Linear) for m in int8.model.modules())
    assert all(m.weight_t.dtype == torch.int8 and m.inverse_smooth is not None for m in quantized)  # calibrated
    assert int8.quantize == "int8" and fp32.quantize is None
    assert int8.name == f"{fp32.name}:int8"
    assert int8.fingerprint != fp32.fingerprint
    again = cag.load_model(f"{tiny_dir}:int8")  # the name suffix is the same request
    assert again.fingerprint == int8.fingerprint and again.quantize == "int8"
    assert int8.dtype == torch.float32  # activations, hence the KV cache, stay float32


def test_int8_linear_is_close_and_independent_of_the_other_rows():
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 40)
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(2, 7, 48)
    with torch.inference_mode():
        want, got = linear(x), layer(x)
        assert got.shape == want.shape == (2, 7, 40)
        assert float((got - want).abs().max()) < 0.02 * float(want.abs().max())
        # Each row is quantized on its own and the integer product is exact: a row's
        # output does not depend on its batch (what batched answers rely on).
        assert torch.equal(layer(x[:1, 3:4]), got[:1, 3:4])
        assert torch.equal(layer(torch.zeros(1, 48)), linear.bias.detach()[None])


def test_smoothing_tames_an_outlier_channel():
    """SmoothQuant: an activation channel 50x larger than the rest would leave the others
    a few levels of an 8-bit row; dividing it out (into the weights) keeps them precise."""
    from cag.quantize import _smoothing

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(16, 64)
    x[:, 5] *= 50
    plain = Int8Linear.from_linear(linear)
    smoothed = Int8Linear.from_linear(linear, _smoothing(linear.weight, x.abs().amax(dim=0)))
    with torch.inference_mode():
        want = linear(x)
        error_plain = float((plain(x) - want).pow(2).mean())
        error_smoothed = float((smoothed(x) - want).pow(2).mean())
    assert error_smoothed < error_plain / 2, (error_smoothed, error_plain)


def test_int8_logits_track_fp32(fp32, int8):
    ids = list(range(3, 60))
    a, b = _logits(fp32, ids), _logits(int8, ids)
    assert not torch.equal(a, b)  # really quantized
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert float(cosine.min()) > 0.98, cosine


@pytest.mark.parametrize("name, quantize, message", [
    ("smollm2", "int4", "unknown quantization 'int4'"),
    ("smollm2:int8", "int4", "pick one"),  # the name's suffix and the argument disagree
])
def test_bad_quantize_requests_are_refused_before_loading(home, name, quantize, message):
    with pytest.raises(ModelError, match=message):
        cag.load_model(name, home=home, quantize=quantize)
    assert not (home / "models").exists()  # refused before converting anything


def test_caches_are_not_shared_between_fp32_and_int8(fp32, int8, docs, home):
    cag.build([docs], name="full", model=fp32, home=home)
    cag.build([docs], name="small", model=int8, home=home)
    with pytest.raises(CacheMismatchError, match="quantized"):
        cag.load("full", model=int8, home=home)
    with pytest.raises(CacheMismatchError, match="quantized"):
        cag.load("small", model=fp32, home=home)
    reloaded = cag.load("small", home=home)  # the entry names the int8 model: it is loaded again as such
    assert reloaded.lm.quantize == "int8" and reloaded.lm.fingerprint == int8.fingerprint
    with pytest.raises(ModelError, match="without int8"):
        cag.load("full", model=fp32, quantize="int8", home=home)


def test_int8_batches_answer_and_stay_close_to_one_by_one(int8, docs, home):
    """8-bit rounding of activations can tip a last-bit float difference (a batch's matrix
    shapes) into a different answer, so batched int8 answers are compared by their logits."""
    from cag.batch import SharedPrefixBatch

    kb = cag.build([docs], name="small", model=int8, home=home)
    questions = ["Who approves travel?", "Where are badges issued?", "What is the refund policy?"]
    answers = kb.ask_many(questions, max_new_tokens=6)
    assert [a.question for a in answers] == questions and all(a.new_tokens > 0 and a.batch == 3 for a in answers)
    prompts = [kb.prompt.question_ids(q) for q in questions]
    batched = SharedPrefixBatch(int8, kb.cache, 3, capacity=4).prefill(prompts, chunk_size=64)
    for row, prompt in enumerate(prompts):
        alone = SharedPrefixBatch(int8, kb.cache, 1, capacity=4).prefill([prompt], chunk_size=64)[0]
        cosine = torch.nn.functional.cosine_similarity(batched[row], alone, dim=0)
        assert float(cosine) > 0.99, cosine


def test_cli_build_and_ask_with_int8(tiny_dir, docs, home):
    runner = CliRunner()
    built = runner.invoke(app, ["build", str(docs), "--name", "q", "--model", str(tiny_dir), "--quantize", "int8", "--json"])
    assert built.exit_code == 0, built.output
    listed = json.loads(runner.invoke(app, ["info", "q", "--json"]).stdout)
    assert listed["model"].endswith(":int8")
    asked = runner.invoke(app, ["ask", "--cache", "q", "Who approves travel?", "--max-new-tokens", "3", "--json"])
    assert asked.exit_code == 0, asked.output
    refused = runner.invoke(app, ["ask", "--cache", "q", "Hi?", "--model", str(tiny_dir)])
    assert refused.exit_code != 0 and "quantiz" in refused.output and "Traceback" not in refused.output
    unknown = runner.invoke(app, ["build", str(docs), "--model", str(tiny_dir), "--quantize", "int3"])
    assert unknown.exit_code != 0 and "int3" in unknown.output and "Traceback" not in unknown.output


def test_threads_are_settable_and_default_to_the_cpus_we_may_use(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("CAG_THREADS", "3")
        assert default_threads() == 3
        monkeypatch.setenv("CAG_THREADS", "zero")
        with pytest.raises(ModelError, match="CAG_THREADS"):
            default_threads()
        monkeypatch.delenv("CAG_THREADS")
        torch.set_num_threads(64)
        import os

        if hasattr(os, "sched_getaffinity"):
            assert default_threads() <= len(os.sched_getaffinity(0))
        with pytest.raises(ModelError):
            set_threads(0)
    finally:
        torch.set_num_threads(before)

"""tracer/placement.py and load_model's precision and placement: settings refused in one line
before anything loads; models that accelerate spreads over the CPU and disk trace, decode and
collect key statistics exactly as on one device; bfloat16 and float16 weights trace close to
float32, and key statistics of bfloat16 weights accumulate in float64."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import make_tiny_model
from tracer.cli import main
from tracer.errors import HyperParameterError
from tracer.hooks import active_hook_count, hooked
from tracer.lens import logit_lens
from tracer.models import load_model
from tracer.placement import module_device, named_weights, parse_max_memory, placement_arguments, resolve_dtype
from tracer.stats import compute_key_statistics, key_fingerprint, weights_fingerprint
from tracer.trace import trace_all

PROMPT, SUBJECT = "The Eiffel Tower is located in", "Eiffel Tower"
TRACE = dict(samples=3, noise=0.5, window=2, progress=False)
#: CPU budget that leaves the embeddings and the first block on the CPU and sends the rest of a
#: tiny model (about 270 kB of float32 weights) to disk
TIGHT = {"cpu": "200kB"}


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model_dir(request, tmp_path_factory):
    lm = make_tiny_model(request.param)
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


def _offloaded(path, folder):
    lm = load_model(str(path), device_map="auto", max_memory=TIGHT, offload_folder=folder)
    placed = set(lm.model.hf_device_map.values())
    assert placed == {"cpu", "disk"}, lm.model.hf_device_map  # the split this test is about
    return lm


def test_settings_are_checked_in_one_line():
    assert resolve_dtype(None) is torch.float32 and resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype(torch.float16) is torch.float16 and resolve_dtype("torch.float32") is torch.float32
    for bad in ("float64", "int8", torch.float64, 3):
        with pytest.raises(HyperParameterError, match="pass one of float32, bfloat16, float16"):
            resolve_dtype(bad)
    assert parse_max_memory("cpu=2GiB, disk=1.5GB") == {"cpu": 2 * 2 ** 30, "disk": 1_500_000_000}
    assert parse_max_memory({"cpu": "300MiB", "disk": 4096}) == {"cpu": 300 * 2 ** 20, "disk": 4096}
    for bad, message in (("cpu", "not understood at 'cpu'"), ("cpu=", "not understood"), ("gpu=2GB", "device 'gpu'"),
                         ("cpu=lots", "cpu='lots' is not a size"), ("cpu=1GB,cpu=2GB", "twice"),
                         (f"cuda:{torch.cuda.device_count()}=1GB", "CUDA device")):
        with pytest.raises(HyperParameterError, match=message) as e:
            parse_max_memory(bad)
        assert "\n" not in str(e.value)
    assert placement_arguments(None, "auto", "cpu=1GB", "off") == {"device_map": "auto", "max_memory": {"cpu": 10 ** 9},
                                                                  "offload_folder": "off"}
    assert placement_arguments("cpu", None, None, None) == {"device": torch.device("cpu")}
    for args, message in ((("cpu", "auto", None, None), "not both"), ((None, "everywhere", None, None), "auto, balanced"),
                          ((None, None, "cpu=1GB", None), "max memory go"), ((None, None, None, "off"), "offload folder go"),
                          (("tpu:7", None, None, None), "not understood")):
        with pytest.raises(HyperParameterError, match=message):
            placement_arguments(*args)


def test_bad_settings_refused_before_loading(tmp_path):
    not_a_model = tmp_path / "nothing-here"  # never reached: the settings are refused first
    with pytest.raises(HyperParameterError, match="dtype 'half'"):
        load_model(str(not_a_model), dtype="half")
    with pytest.raises(HyperParameterError, match="is a file"):
        (tmp_path / "f").write_text("x")
        load_model(str(not_a_model), device_map="auto", offload_folder=tmp_path / "f")


def test_offloaded_model_traces_as_on_one_device(model_dir, tmp_path):
    plain = load_model(str(model_dir), device="cpu")
    lm = _offloaded(model_dir, tmp_path / "offload")
    assert lm.dispatched and lm.device == torch.device("cpu")
    wrappers = {name: m.__dict__["forward"] for name, m in lm.model.named_modules() if "forward" in m.__dict__}
    assert wrappers  # accelerate's AlignDevicesHook wrappers
    want = trace_all(plain, PROMPT, SUBJECT, **TRACE)
    got = trace_all(lm, PROMPT, SUBJECT, **TRACE)
    for kind in want:
        # the same operations on the same shapes in one process: the same bits (the issue asks <= 1e-5)
        np.testing.assert_array_equal(got[kind].scores, want[kind].scores)
        assert (got[kind].high_score, got[kind].low_score) == (want[kind].high_score, want[kind].low_score)
    naive = trace_all(lm, PROMPT, SUBJECT, kinds=("mlp",), naive=True, **TRACE)["mlp"]
    np.testing.assert_array_equal(naive.scores, trace_all(plain, PROMPT, SUBJECT, kinds=("mlp",), naive=True, **TRACE)["mlp"].scores)
    # the batched engine replaced the forwards of skipped blocks: accelerate's wrappers are back
    assert active_hook_count(lm.model) == 0
    assert {name: m.__dict__.get("forward") for name, m in lm.model.named_modules() if name in wrappers} == wrappers
    assert all(p.device.type == "meta" for n, p in lm.model.named_parameters() if n.startswith(lm.layers.block_name(3)))


def test_offloaded_model_lens_and_key_statistics(model_dir, tmp_path, shared_data):
    plain = load_model(str(model_dir), device="cpu")
    lm = _offloaded(model_dir, tmp_path / "offload")
    a, b = logit_lens(plain, PROMPT, targets=[" Paris"]), logit_lens(lm, PROMPT, targets=[" Paris"])
    np.testing.assert_array_equal(a.probs, b.probs)
    np.testing.assert_array_equal(a.top_ids, b.top_ids)
    # every weight, offloaded ones read from the disk store: the same names, dtypes and bytes
    want = dict(named_weights(plain.model))
    got = {name: w for name, w in named_weights(lm.model)}
    assert list(got) == list(want) and all(torch.equal(got[n], want[n]) for n in want)
    assert weights_fingerprint(lm) == weights_fingerprint(plain)
    layer = lm.n_layers - 1  # on disk
    assert key_fingerprint(lm, layer) == key_fingerprint(plain, layer)
    corpus = shared_data / "wikipedia" / "enwiki_2015_3220_articles.jsonl.gz"
    s_plain = compute_key_statistics(plain, layer, 400, corpus, chunk_tokens=100, progress=False)
    s_off = compute_key_statistics(lm, layer, 400, corpus, chunk_tokens=100, progress=False)
    assert s_off.mom2.dtype == torch.float64 and torch.equal(s_off.mom2, s_plain.mom2)
    # the forward passes stopped inside offloaded blocks: their weights went back to disk
    assert all(p.device.type == "meta" for n, p in lm.model.named_parameters() if n.startswith(lm.layers.block_name(layer)))
    assert module_device(lm.model.get_submodule(lm.layers.block_name(layer))) == torch.device("cpu")


def test_cli_trace_with_device_map_gives_the_plain_scores(tiny_model_dir, tmp_path):
    common = ["trace", "--model", str(tiny_model_dir), "--prompt", PROMPT, "--subject", SUBJECT, "--kind", "all",
              "--samples", "3", "--noise", "0.5", "--window", "2", "--no-progress"]
    assert main(common + ["--json", str(tmp_path / "plain.json")]) == 0
    assert main(common + ["--device-map", "auto", "--max-memory", "cpu=200kB", "--offload-folder", str(tmp_path / "D"),
                          "--json", str(tmp_path / "a.json")]) == 0
    plain, placed = (json.loads((tmp_path / f).read_text()) for f in ("plain.json", "a.json"))
    for p, q in zip(plain, placed):
        np.testing.assert_array_equal(np.array(q["scores"]), np.array(p["scores"]))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_traces_close_to_float32(model_dir, dtype):
    reference = trace_all(load_model(str(model_dir), device="cpu"), PROMPT, SUBJECT, **TRACE)
    lm = load_model(str(model_dir), device="cpu", dtype=dtype)
    assert lm.dtype == getattr(torch, dtype) and all(p.dtype == lm.dtype for p in lm.model.parameters())
    got = trace_all(lm, PROMPT, SUBJECT, **TRACE)
    for kind, r in got.items():
        assert r.scores.dtype == np.float64 and np.isfinite(r.scores).all() and ((r.scores >= 0) & (r.scores <= 1)).all()
        assert r.answer == reference[kind].answer
        # Not a bound derived from the arithmetic (a worst-case one is vacuous at 8 significant
        # bits): measured 2.6e-3 (bfloat16) and 7e-4 (float16) on these models, and 1e-2 leaves
        # 4x; a restored state in the wrong place or an overflow would move scores by far more.
        assert np.nanmax(np.abs(r.scores - reference[kind].scores)) <= 1e-2


def test_key_statistics_of_bfloat16_weights_accumulate_in_float64(model_dir):
    lm = load_model(str(model_dir), device="cpu", dtype="bfloat16")
    texts = ["The Eiffel Tower is located in Paris, the capital of France.", "Rome is the capital of Italy.",
             "The Louvre is a museum in Paris.", "Mount Everest is the highest mountain on Earth.",
             "The Danube flows through Vienna and Budapest.", "Tokyo is the largest city of Japan."] * 6
    pieces = [lm.tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
    n_tokens = sum(len(p) for p in pieces)
    layer, module = 1, lm.layers.mlp_out_name(1)
    stats = compute_key_statistics(lm, layer, n_tokens, texts, corpus_name="six", progress=False)
    keys = []
    with torch.no_grad(), hooked(lm.model, inputs={module: lambda k: keys.append(k.reshape(-1, k.shape[-1]))}):
        for p in pieces:
            lm.model(input_ids=torch.tensor([p]))
    k = torch.cat(keys)
    assert k.dtype == torch.bfloat16 and len(k) == n_tokens
    k64 = k.double()
    exact = k64.T @ k64 / n_tokens  # the bfloat16 keys' products, in float64 (exact in float64 up to the sums)
    # float64 sums in any order (Higham): within 2 gamma(n) sum|k_i k_j| / n; a float32 or bfloat16
    # accumulator would be off by about 2**-24 or 2**-8 of that instead of 2**-53
    bound = 2 * (n_tokens * 2.0 ** -53) / (1 - n_tokens * 2.0 ** -53) * (k64.abs().T @ k64.abs()) / n_tokens
    assert stats.mom2.dtype == torch.float64 and bool(((stats.mom2 - exact).abs() <= bound).all())
    assert stats.dtype == "float64" and stats.fingerprint == key_fingerprint(lm, layer)

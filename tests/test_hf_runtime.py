"""The Hugging Face runtime on the real embedded model (SmolLM2-135M-Instruct, CPU, fp32).

The first test run converts the GGUF into cached safetensors (~35 s); later loads take seconds.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from conftest import POLICIES, SHIPPED, run_cli
from kvpolicy import load_policy, make_plan
from kvpolicy.diagnostics import Source
from kvpolicy.eval.haystack import needle_sample
from kvpolicy.engines.hf import PolicyCache, attend_through, generate, load_model, reconstruct
from kvpolicy.lang.lower import check_source
from kvpolicy.kernels import reference as R
from kvpolicy.store.whole import compress as compressor

PROMPT = ("The history of the lighthouse begins with fires on hilltops. Later, towers were built "
          "to hold the fires higher, and lenses focused their light far out to sea. ") * 12


@pytest.fixture(scope="module")
def smol():
    model, tokenizer = load_model()
    return model, tokenizer


def policy_of(text: str):
    result = check_source(Source("test.kvp", text))
    assert not result.errors, [e.render() for e in result.errors]
    return result.policy


def ids_of(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt")["input_ids"]


@torch.no_grad()
def policy_logits(model, ids, policy, steps, tokens=None, cache_dtype="float32",
                  backend="torch"):
    """Logits of the prompt's last position and of `steps` decode steps (teacher-forced with
    `tokens` when given, else greedy), through a PolicyCache."""
    cache = PolicyCache(policy, model, cache_dtype=cache_dtype, backend=backend)
    logits, chosen = [], []
    with attend_through(model):
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache.compress()
        cache.bytes_after_compress = cache.nbytes()["total"]
        for step in range(steps + 1):
            logits.append(out.logits[0, -1])
            token = int(tokens[step]) if tokens is not None else int(out.logits[0, -1].argmax())
            chosen.append(token)
            if step == steps:
                break
            out = model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
    return torch.stack(logits), chosen, cache


@torch.no_grad()
def dynamic_logits(model, ids, tokens, edit=None, cache=None):
    """The same with HF's DynamicCache (or `cache`); `edit(cache, prompt_length, step)` may change
    its keys and values after the prefill and after every step."""
    cache = DynamicCache() if cache is None else cache
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    n = ids.shape[1]
    if edit is not None:
        edit(cache, n, 0)
    logits = [out.logits[0, -1]]
    for step, token in enumerate(tokens[:-1]):
        position = torch.tensor([[n + step]])
        out = model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True,
                    position_ids=position)
        if edit is not None:
            edit(cache, n, step + 1)
        logits.append(out.logits[0, -1])
    return torch.stack(logits)


def test_keep_everything_policy_matches_dynamic_cache(smol):
    model, tokenizer = smol
    ids = ids_of(tokenizer, PROMPT)
    ours, tokens, cache = policy_logits(model, ids, policy_of("policy full { }"), steps=16)
    reference = dynamic_logits(model, ids, tokens)
    assert (ours - reference).abs().max() <= 1e-5
    assert cache.bytes_after_compress == cache.plan.compressed_bytes


class FakeQuantLayer(DynamicLayer):
    """HF's own cache layer, with keys and values quantized and dequantized in place exactly where
    PolicyCache packs them: after the prompt's forward, the middle's whole blocks (the rest of the
    middle stays in the window); while decoding, each block that leaves the window — before the
    step's attention, as PolicyCache does. Reference math; no packing, no kvpolicy attention."""

    def __init__(self, policy, unit: int = 32):
        super().__init__()
        self.policy, self.unit = policy, unit
        self.done = None  # tokens already quantized (from position 0; the policy has no sinks)

    def update(self, key_states, value_states, *args, **kwargs):
        prefill = not self.is_initialized
        keys, values = super().update(key_states, value_states)
        if prefill:
            return keys.clone(), values.clone()  # the prompt attends in full precision
        if self.done is None:
            prompt = keys.shape[2] - key_states.shape[2]
            self.done = 0
            self._quantize_to((prompt - self.policy.window) // self.unit * self.unit)
        while keys.shape[2] - self.done >= self.policy.window + self.unit:
            self._quantize_to(self.done + self.unit)
        return self.keys, self.values

    def _quantize_to(self, end: int) -> None:
        for begin in range(self.done, end, self.unit):
            span = slice(begin, begin + self.unit)
            for tensor, fmt in ((self.keys, self.policy.keys), (self.values, self.policy.values)):
                codes, scale, zero = R.quantize(tensor[0, :, span], fmt)
                tensor[0, :, span] = R.dequantize(codes, scale, zero, fmt).to(tensor.dtype)
        self.done = end


def test_quant_only_policy_matches_fake_quantization(smol):
    model, tokenizer = smol
    ids = ids_of(tokenizer, PROMPT)
    policy = policy_of("policy q { keep window 64; keys int4 group 32 per channel; "
                       "values int4 group 32 per token }")
    ours, tokens, cache = policy_logits(model, ids, policy, steps=40)  # crosses a block flush
    assert cache.layers[0].compressed.body_count.sum() > 0
    fake = DynamicCache()
    fake.layers = [FakeQuantLayer(policy) for _ in range(model.config.num_hidden_layers)]
    fake.layer_class_to_replicate = None
    reference = dynamic_logits(model, ids, tokens, cache=fake)
    assert (ours - reference).abs().max() <= 1e-3
    plain = dynamic_logits(model, ids, tokens)
    assert (ours - plain).abs().max() > 1e-2  # the quantization is real


def test_eviction_only_policy_keeps_exactly_the_planned_tokens(smol):
    model, tokenizer = smol
    ids = ids_of(tokenizer, PROMPT)
    n = ids.shape[1]
    policy = policy_of("policy e { keep sinks 4; keep window 64; retain 30%; "
                       "retain layer 0 60%, layer last 10%; score snapkv(observe = 16) }")
    _, _, cache = policy_logits(model, ids, policy, steps=0)
    for layer, plan_layer in zip(cache.layers, cache.plan.layers):
        packed = layer.compressed
        assert int(packed.sink_len[0]) == 4 and packed.window_key.shape[2] == plan_layer.window
        counts = packed.body_count[0]
        assert counts.tolist() == [plan_layer.body_tokens] * 3
        for h in range(3):
            _, _, positions = R.unpack_blocks(packed.body_blocks[int(packed.body_start[0, h]):],
                                              packed.body_layout, int(counts[h]))
            kept = set(positions.tolist()) | set(range(4)) | set(range(n - plan_layer.window, n))
            assert len(kept) == plan_layer.kept_tokens  # sinks + window + selected, disjoint
            assert all(4 <= p < n - plan_layer.window for p in positions.tolist())
    assert cache.bytes_after_compress == cache.plan.compressed_bytes


def test_streaming_llm_is_sinks_plus_recent_tokens(smol):
    model, tokenizer = smol
    ids = ids_of(tokenizer, PROMPT)
    n = ids.shape[1]
    policy = load_policy(POLICIES / "streaming_llm.kvp")
    ours, tokens, cache = policy_logits(model, ids, policy, steps=8)
    kept_recent = cache.plan.layers[0].kept_tokens - 4
    keep = torch.cat([torch.arange(4), torch.arange(n - kept_recent, n)])

    def truncate(dynamic, prompt_length, step):
        if step == 0:
            for layer in dynamic.layers:
                layer.keys = layer.keys[:, :, keep]
                layer.values = layer.values[:, :, keep]
    reference = dynamic_logits(model, ids, tokens, edit=truncate)
    assert (ours - reference).abs().max() <= 1e-4


def test_adaptive_budgets_move_tokens_but_keep_the_bytes(smol):
    model, tokenizer = smol
    ids = ids_of(tokenizer, PROMPT)
    policy = policy_of("policy a { keep sinks 4; keep window 32; retain 40%; "
                       "adapt temperature 0.5; keys int2 group 32 per channel; "
                       "values int2 group 32 per token; guard 25% of retained at int8 }")
    _, _, cache = policy_logits(model, ids, policy, steps=2, cache_dtype="bfloat16")
    counts = torch.stack([layer.compressed.body_count[0] + layer.compressed.guard_count[0]
                          for layer in cache.layers])
    assert len(set(counts.flatten().tolist())) > 1  # heads and layers got different budgets
    planned = sum(layer.selected for layer in cache.plan.layers) * 3
    assert int(counts.sum()) == planned
    assert cache.bytes_after_compress == cache.plan.compressed_bytes


@pytest.fixture(scope="module")
def prefills(smol):
    """One recorded full-precision prefill per context length, shared by every policy, with the
    reconstruction passes any shipped policy's `score reconstruct` reads."""
    model, tokenizer = smol
    chunks = reconstruct.chunks_needed(load_policy(path) for path in SHIPPED)
    recorded = {}
    for context in (700, 2300):
        sample = needle_sample(tokenizer, context, 0.5, seed=context)
        ids = ids_of(tokenizer, sample.context)
        cache = PolicyCache(policy_of("policy r { score snapkv(observe = 64) }"), model,
                            backend="torch")
        with attend_through(model), torch.no_grad():
            model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        records = [layer.prefill for layer in cache.layers]
        for chunk in sorted(chunks):
            reconstruct.record(model, reconstruct.instruction_ids(tokenizer), ids, records, chunk,
                               reconstruct.special_ids(tokenizer))
        recorded[ids.shape[1]] = (records, cache.shape)
    return recorded


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_measured_bytes_equal_the_plan(prefills, path):
    policy = load_policy(path)
    for context, (prefill, shape) in prefills.items():
        plan = make_plan(policy, shape, context)
        layers = compressor.compress(plan, prefill)
        adaptive = policy.adapt is not None and policy.adapt.counts_per_sequence
        measured = sum(compressor.measured_bytes(layer, plan_layer, adaptive)
                       for layer, plan_layer in zip(layers, plan.layers))
        assert abs(measured - plan.compressed_bytes) <= 0.01 * plan.compressed_bytes
        assert measured == plan.compressed_bytes  # in fact exactly


def test_needle_is_answered_under_conservative(smol):
    model, tokenizer = smol
    sample = needle_sample(tokenizer, 1000, 0.5, seed=3)
    result = generate(model, tokenizer, sample.context + "\n" + sample.question,
                      POLICIES / "conservative.kvp", max_new_tokens=32)
    assert sample.answer in result.text
    assert result.measured_bytes_after_compress == result.planned_bytes


def test_run_command_prints_generation_and_measured_over_planned():
    # The acceptance command: the aggressive policy on the embedded model, with a prompt long
    # enough (~2.3k tokens) for its 2048-token window to leave tokens to select and pack.
    result = run_cli("run", "policies/aggressive.kvp", "--needle", "2300",
                     "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert "measured/planned 1.0000" in result.stdout
    assert "after the prompt (2,3" in result.stdout and "needle at depth 0.5" in result.stdout
    assert "the policy is written for qwen2.5-7b; running it on smollm2-135m" in result.stderr


def test_run_times_the_reconstruction_passes_and_answers_the_needle(write_policy):
    path = write_policy("policy r {\n    keep sinks 4\n    keep window 64\n    retain 80%\n"
                        "    score reconstruct(chunk = 256, pool = max 7)\n}\n")
    result = run_cli("run", str(path), "--needle", "900", "--max-new-tokens", "40")
    assert result.returncode == 0, result.stderr
    assert "measured/planned 1.0000" in result.stdout
    assert "reconstruction passes" in result.stdout
    # 20% of a 900-token prompt evicted: what the model re-reads keeps the needle
    assert "(found)" in result.stdout, result.stdout


def test_transformers_generate_works_with_the_cache(smol):
    model, tokenizer = smol
    ids = ids_of(tokenizer, "The capital of France is")
    cache = PolicyCache(POLICIES / "kivi.kvp", model, backend="torch")
    with attend_through(model):
        ours = model.generate(ids, past_key_values=cache, max_new_tokens=8, do_sample=False)
    plain = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert cache.compressed  # compressed by itself before the first decode step
    assert torch.equal(ours, plain)  # a short prompt fits KIVI's 16-bit window


def test_sm_scale_is_the_models(smol):
    model, _ = smol
    attention = model.model.layers[0].self_attn
    assert math.isclose(attention.scaling, 1 / math.sqrt(64))


def test_compiled_kernels_run_inside_the_model(tmp_path, monkeypatch):
    """backend="triton" compiles the policy for the model and attends (and packs) with the
    generated kernels — here in Triton's interpreter, on a tiny random Llama built locally."""
    from transformers import LlamaConfig, LlamaForCausalLM
    monkeypatch.setenv("KVPOLICY_CACHE", str(tmp_path))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 97, (1, 90))
    policy = policy_of("policy t { keep sinks 2; keep window 32; retain 70%; "
                       "keys int4 group 16 per channel; values int4 group 16 per token; "
                       "guard 25% of retained at int8; cluster evicted k 4 }")
    compiled, tokens, cache = policy_logits(model, ids, policy, steps=3, cache_dtype="bfloat16",
                                            backend="triton")
    assert cache.kernels is not None and any((tmp_path / "build").iterdir())
    plain, _, _ = policy_logits(model, ids, policy, steps=3, tokens=tokens,
                                cache_dtype="bfloat16", backend="torch")
    assert (compiled - plain).abs().max() <= 2e-2 * plain.abs().max()
    assert cache.bytes_after_compress == cache.plan.compressed_bytes


# ---- an artifact only on its own model; run's arguments (issue 12, items 2 and 5) ----------------

@pytest.fixture(scope="module")
def kivi_artifacts(tmp_path_factory):
    from kvpolicy.compiler.artifact import compile_policy
    from kvpolicy.models import PRESETS
    root = tmp_path_factory.mktemp("artifacts")
    for name in ("qwen2.5-7b", "smollm2-135m"):
        compile_policy(load_policy(POLICIES / "kivi.kvp"), PRESETS[name], root / name)
    return root / "qwen2.5-7b", root / "smollm2-135m"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_an_artifact_is_used_only_on_the_model_it_was_compiled_for(smol, kivi_artifacts,
                                                                   backend):
    import kvpolicy
    from kvpolicy.compiler.artifact import ArtifactError
    model, tokenizer = smol
    qwen, _ = kivi_artifacts
    for policy in (qwen, kvpolicy.load(qwen)):
        with pytest.raises(ArtifactError) as caught:
            generate(model, tokenizer, "Hello", policy, max_new_tokens=1, backend=backend)
        message = str(caught.value)
        for difference in ("num_layers 28, but the model", "num_q_heads 28", "num_kv_heads 4",
                           "head_dim 128"):
            assert difference in message, message


def test_an_artifact_for_the_model_runs_like_its_policy(smol, kivi_artifacts):
    model, tokenizer = smol
    _, own = kivi_artifacts
    ids = ids_of(tokenizer, PROMPT)
    from_artifact = generate(model, tokenizer, ids, own, max_new_tokens=4, backend="torch")
    from_file = generate(model, tokenizer, ids, POLICIES / "kivi.kvp", max_new_tokens=4,
                         backend="torch")
    assert from_artifact.token_ids == from_file.token_ids
    assert from_artifact.measured_bytes_after_compress == from_artifact.planned_bytes


def test_run_takes_an_artifact_and_runs_the_baseline_beside_it(kivi_artifacts):
    qwen, own = kivi_artifacts
    result = run_cli("run", str(own), "--prompt", "The capital of France is",
                     "--max-new-tokens", "4", "--baseline")
    assert result.returncode == 0, result.stderr
    assert "policy kivi;" in result.stdout
    assert "policy baseline (uncompressed, 16-bit)" in result.stdout
    assert "the same size as the uncompressed cache" in result.stdout  # not "1.00x smaller"
    assert "written for" not in result.stderr  # kivi names no model
    refused = run_cli("run", str(qwen), "--prompt", "The capital of France is")
    assert refused.returncode == 1 and "compiled for qwen2.5-7b with num_layers 28" in \
        refused.stderr
    assert "Loading weights" not in refused.stderr  # refused before the weights are read


def test_the_written_for_note_only_when_the_models_differ(write_policy):
    path = write_policy('policy own { model "smollm2-135m"; keep window 32; keys int4 }\n')
    result = run_cli("run", str(path), "--prompt", "The capital of France is",
                     "--max-new-tokens", "2")
    assert result.returncode == 0, result.stderr
    assert "written for" not in result.stderr

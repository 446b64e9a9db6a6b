"""`adapt heads "FILE"`: static per-(layer, KV head) budgets from a calibration file — the file,
the language, the exact plan, the whole-prompt runtime, the engines that refuse it, and
`kvpolicy calibrate`."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import ROOT, run_cli
from kvpolicy import heads as head_file
from kvpolicy.diagnostics import PolicyError
from kvpolicy.eval.prompts import EvalPolicy
from kvpolicy.lang.ir import policy_from_json, policy_to_json
from kvpolicy.lang.lower import check_file
from kvpolicy.models import PRESETS, ModelShape
from kvpolicy.plan.pages import UnsupportedConfiguration, page_format, paged_refusals
from kvpolicy.plan.planner import make_plan
from kvpolicy.store.whole import compress as compressor

SMOL = PRESETS["smollm2-135m"]
MODEL = {"name": "smollm2-135m", "num_layers": SMOL.num_layers, "num_kv_heads": SMOL.num_kv_heads}
POLICY = """policy p {
    keep sinks 4
    keep window 64
    retain 40%
    score recent
    adapt heads "heads.json"
    keys   int4 group 64 per channel
    values int3 group 64 per token
}
"""


def smol_weights(seed: int = 0) -> list[list[float]]:
    generator = torch.Generator().manual_seed(seed)
    weights = torch.rand(SMOL.num_layers, SMOL.num_kv_heads, generator=generator) ** 3
    weights[3] = 0.0  # a layer calibration found nothing in
    return weights.tolist()


def write_policy(tmp_path, text=POLICY, weights=None, model=MODEL):
    head_file.write_weights(tmp_path / "heads.json", smol_weights() if weights is None
                            else weights, model, {"statistic": "test"})
    path = tmp_path / "p.kvp"
    path.write_text(text)
    return path


def checked(path):
    result = check_file(path)
    assert not result.errors, [e.render() for e in result.errors]
    return result.policy


# ---- the file and the language ------------------------------------------------------------------

def test_the_weights_become_part_of_the_policy(tmp_path):
    policy = checked(write_policy(tmp_path))
    assert policy.adapt.rule == "heads" and policy.adapt.static
    assert policy.adapt.head_weights == tuple(tuple(round(w, 6) for w in row)
                                              for row in smol_weights())
    again = policy_from_json(json.loads(json.dumps(policy_to_json(policy))))
    assert again == policy  # artifacts store the weights, not the file's name
    (tmp_path / "heads.json").unlink()
    assert make_plan(again, SMOL, 4096).compressed_bytes == \
        make_plan(policy, SMOL, 4096).compressed_bytes  # the file is no longer needed
    other = checked(write_policy(tmp_path, weights=smol_weights(seed=1)))
    assert EvalPolicy("a", other, "").sha256 != EvalPolicy("a", policy, "").sha256


def test_fmt_keeps_the_statement(tmp_path):
    path = write_policy(tmp_path, POLICY.replace("    adapt heads", "  adapt   heads"))
    out = run_cli("fmt", "--stdout", str(path))
    assert out.returncode == 0 and '    adapt heads "heads.json"\n' in out.stdout


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("{not json", "it is not JSON (line 1, column 2"),
    ('{"kvpolicy": "something-else"}', "not a head-weights file"),
    ('{"kvpolicy": "head-weights", "version": 7, "weights": [[1]]}', "version 7"),
    ('{"kvpolicy": "head-weights", "version": 1, "weights": []}', "list of 1 to"),
    ('{"kvpolicy": "head-weights", "version": 1, "weights": [[1, 2], [3]]}',
     '"weights"[1] has 1 KV heads, layer 0 has 2'),
    ('{"kvpolicy": "head-weights", "version": 1, "weights": [[1, -2]]}',
     '"weights"[0][1] is -2'),
    ('{"kvpolicy": "head-weights", "version": 1, "weights": [[1, NaN]]}', "is nan"),
    ('{"kvpolicy": "head-weights", "version": 1, "weights": [[true]]}', "is True"),
])
def test_a_bad_weights_file_is_a_located_error(tmp_path, content, message):
    path = tmp_path / "p.kvp"
    path.write_text(POLICY)
    if content is not None:
        (tmp_path / "heads.json").write_text(content)
    out = run_cli("check", str(path))
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert f"{path}:6:17: error: cannot use the head-weights file 'heads.json': " in out.stderr
    assert message in out.stderr, out.stderr


def test_a_directory_or_an_empty_name_is_refused(tmp_path):
    (tmp_path / "heads.json").mkdir()
    path = tmp_path / "p.kvp"
    path.write_text(POLICY)
    assert "is a directory" in check_file(path).errors[0].render()
    path.write_text(POLICY.replace('"heads.json"', '""'))
    assert "needs the path of a head-weights file" in check_file(path).errors[0].render()


def test_weights_for_another_model_shape_fail_at_plan_time(tmp_path):
    policy = checked(write_policy(tmp_path, weights=[[1.0, 2.0]] * 4,
                                  model={"name": "x", "num_layers": 4, "num_kv_heads": 2}))
    with pytest.raises(PolicyError) as info:
        make_plan(policy, SMOL, 4096)
    text = info.value.render()
    assert ":6:5: error: the head weights of 'heads.json' are for 4 layers of 2 KV heads; " \
           "smollm2-135m has 30 layers of 3 KV heads" in text
    out = run_cli("plan", str(tmp_path / "p.kvp"), "--model", "smollm2-135m")
    assert out.returncode != 0 and "Traceback" not in out.stderr and "4 layers" in out.stderr


# ---- the plan: static, proportional, exact ------------------------------------------------------

@pytest.mark.parametrize("context", [300, 1000, 4096, 4111])
def test_budgets_follow_the_weights_and_keep_the_pools_total(tmp_path, context):
    policy = checked(write_policy(tmp_path))
    plan = make_plan(policy, SMOL, context)
    uniform = make_plan(policy.__class__(**{**policy.__dict__, "adapt": None}), SMOL, context)
    h = SMOL.num_kv_heads
    total = sum(sum(layer.selected_by_head(h)) for layer in plan.layers)
    assert total == sum(layer.selected * h for layer in uniform.layers)  # the pool's units
    weights = policy.adapt.head_weights
    for layer in plan.layers:
        unit, middle = layer.token_unit, context - layer.sinks - layer.window
        counts = layer.selected_by_head(h)
        assert all(n % unit == 0 and 0 <= n <= unit * (middle // unit) for n in counts)
        assert layer.selected == max(counts)
        assert layer.bytes == sum(t.nbytes for t in layer.tensors)
    cells = [(weights[layer.layer][j], layer.selected_by_head(h)[j], layer)
             for layer in plan.layers for j in range(h)]
    unit = plan.layers[0].token_unit
    for w1, n1, l1 in cells:  # a heavier head never keeps less, but for rounding and its cap
        for w2, n2, l2 in cells:
            full2 = unit * ((context - l2.sinks - l2.window) // unit)
            if w1 > w2 and n2 < full2:
                assert n1 >= n2 - unit, (w1, n1, w2, n2)
    assert plan.layers[3].selected_by_head(h) == (0,) * h or total == sum(
        unit * ((context - l.sinks - l.window) // unit) * h for l in plan.layers)


def test_plan_bytes_count_each_heads_blocks(tmp_path):
    policy = checked(write_policy(tmp_path))
    plan = make_plan(policy, SMOL, 4096)
    layer = next(l for l in plan.layers if len(set(l.selected_by_head(3))) > 1)
    body = next(t for t in layer.tensors if t.name == "body.blocks")
    blocks = sum(-(-n // layer.body_layout.tokens) for n in layer.selected_by_head(3))
    assert body.shape == (blocks, layer.body_layout.nbytes)
    assert not any(t.name == "selected.head_counts" for t in layer.tensors)  # the plan knows
    out = json.loads(run_cli("plan", str(tmp_path / "p.kvp"), "--model", "smollm2-135m",
                             "--context", "4096", "--json").stdout)
    assert out["compressed_bytes"] == plan.compressed_bytes
    assert out["layers"][layer.layer]["selected_by_head"] == list(layer.selected_by_head(3))
    assert out["adaptive"]["rule"] == "heads"
    table = run_cli("plan", str(tmp_path / "p.kvp"), "--model", "smollm2-135m").stdout
    assert "head budgets (adapt heads: the calibration's weights, held in the policy)" in table


def test_all_zero_weights_share_equally(tmp_path):
    policy = checked(write_policy(tmp_path, weights=[[0.0] * 3] * SMOL.num_layers))
    plan = make_plan(policy, SMOL, 4096)
    counts = [n for layer in plan.layers for n in layer.selected_by_head(3)]
    assert max(counts) - min(counts) <= plan.layers[0].token_unit


# ---- the runtime keeps what the plan says ----------------------------------------------------

def test_compression_keeps_each_heads_planned_tokens_and_bytes(tmp_path):
    tiny = ModelShape("tiny", num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=64,
                      max_context=512, kv_dtype="float32")
    policy = checked(write_policy(tmp_path, weights=[[5.0, 1.0], [0.0, 2.0]],
                                  model={"name": "tiny", "num_layers": 2, "num_kv_heads": 2}))
    plan = make_plan(policy, tiny, 400)
    torch.manual_seed(0)
    prefill = [compressor.PrefillLayer(keys=torch.randn(1, 2, 400, 64),
                                       values=torch.randn(1, 2, 400, 64),
                                       queries=torch.randn(1, 4, 32, 64), scaling=0.125)
               for _ in range(2)]
    layers = compressor.compress(plan, prefill)
    for layer, plan_layer in zip(layers, plan.layers):
        assert layer.body_count[0].tolist() == list(plan_layer.selected_by_head(2))
        assert compressor.measured_bytes(layer, plan_layer, adaptive_heads=False) == \
            plan_layer.bytes
    assert plan.layers[1].selected_by_head(2)[0] == 0 and plan.layers[0].selected_by_head(2)[0] \
        > plan.layers[0].selected_by_head(2)[1]
    # score recent: a head keeps its most recent middle tokens
    n = plan.layers[0].selected_by_head(2)[0]
    kept = layers[0].body_blocks  # the positions of head 0's tokens
    from kvpolicy.kernels import reference as R
    _, _, positions = R.unpack_blocks(kept[:n // plan.layers[0].body_layout.tokens],
                                      plan.layers[0].body_layout, n)
    assert positions.tolist() == list(range(400 - 64 - n, 400 - 64))


# ---- per-head pages (the paged store, vLLM) ---------------------------------------------------

def test_pages_split_each_pools_block_units_by_the_weights(tmp_path):
    """The plan's rule at one sealed block: the evicting layers keep retain x their block units
    in all (rounded up once), each (layer, KV head) its weight's share in whole units, none above
    the block; a layer calibration found nothing in keeps none; bytes are each head's page."""
    policy = checked(write_policy(tmp_path))
    assert not paged_refusals(policy)
    fmt = page_format(policy, SMOL, 256)
    unit, heads, layers = 64, SMOL.num_kv_heads, SMOL.num_layers
    counts = [[page.selected for page in fmt.pages_of(layer)] for layer in range(layers)]
    assert sum(map(sum, counts)) == unit * 144  # 40% of 30 layers x 3 heads x 4 units
    assert all(n % unit == 0 and 0 <= n <= 256 for row in counts for n in row)
    assert counts[3] == [0, 0, 0]  # all-zero weights: nothing kept of sealed blocks
    weights = smol_weights()
    cells = sorted((w, -layer * heads - h, counts[layer][h]) for layer, row in enumerate(weights)
                   for h, w in enumerate(row))
    kept = [n for *_, n in cells]
    assert kept == sorted(kept)  # more weight never keeps fewer tokens
    assert max(kept) == 256 and min(kept) == 0
    # one page per head: a layer's pages of a block are its heads' pages, in head order
    for layer in range(layers):
        groups = fmt.head_groups(layer, heads)
        assert [g.first for g in groups] == sorted(g.first for g in groups)
        assert sum(g.count for g in groups) == heads
        assert [g.page.selected for g in groups for _ in range(g.count)] == counts[layer]
        assert fmt.layer_run(layer, heads) == sum(p.nbytes for p in fmt.pages_of(layer))
        assert fmt.layers[layer].selected == max(counts[layer])  # the widest head's
    total = sum(fmt.layer_run(layer, heads) for layer in range(layers))
    assert fmt.page_bytes == -(-(-(-total // (layers * heads))) // 16) * 16
    assert fmt.padding_bytes == layers * heads * fmt.page_bytes - total
    assert fmt.to_json()["selected_tokens_per_block_by_head"] == counts


def test_a_rank_reads_only_its_share_of_the_heads_pages(tmp_path):
    fmt = page_format(checked(write_policy(tmp_path)), SMOL, 128)
    with pytest.raises(UnsupportedConfiguration, match="was not taken for its tensor-parallel"):
        fmt.head_groups(0, 1)  # the one-process pages, read by a worker of one head
    share = fmt.for_worker(3, [(0, SMOL.num_layers)], 0, 2)
    assert [g.page for g in share.head_groups(0, 1)] == [fmt.pages_of(0)[2]]
    kivi = page_format(check_file(ROOT / "policies" / "kivi.kvp").policy, SMOL, 32)
    assert kivi.layer_offset(2, 1) * 3 == kivi.layer_offset(2, 3)  # uniform pages split


def test_an_artifact_of_it_loads_with_its_page_plans(tmp_path):
    from kvpolicy.compiler.artifact import compile_policy, load
    policy = checked(write_policy(tmp_path))
    compile_policy(policy, SMOL, tmp_path / "art")
    (tmp_path / "heads.json").unlink()  # the artifact holds the weights
    compiled = load(tmp_path / "art")  # verified: recompiling its manifest's policy agrees
    assert compiled.layers[0].paged_decode is not None
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["pages"]["128"]["selected_tokens_per_block_by_head"] == [
        [p.selected for p in page_format(policy, SMOL, 128).pages_of(layer)]
        for layer in range(SMOL.num_layers)]


def test_vllm_settings_load_it_one_process_and_per_tensor_parallel_rank(tmp_path, monkeypatch):
    """vLLM's start-up (no engine needed), page layout: the artifact loads with per-head pages; a
    worker that holds some of the heads (tensor parallelism) holds its heads' pages, at the page
    size of the rank whose heads keep the most."""
    monkeypatch.setenv("KVPOLICY_LAYOUT", "pages")
    from types import SimpleNamespace

    from kvpolicy.compiler.artifact import compile_policy
    from kvpolicy.engines.vllm.settings import load_settings
    from test_vllm_paged import engine_config
    compile_policy(checked(write_policy(tmp_path)), SMOL, tmp_path / "art")
    config = engine_config(block_size=256)
    settings = load_settings(str(tmp_path / "art"), config)
    assert settings.page_format.head_pages
    text = settings.describe()
    assert "tokens per layer and KV head" in text and "note: adapt heads" in text
    config.parallel_config = SimpleNamespace(tensor_parallel_size=3)
    rank = load_settings(str(tmp_path / "art"), config).page_format  # rank 0 of 3
    assert rank.kv_heads == 1 and rank.head_pages == tuple(
        heads[:1] for heads in settings.page_format.head_pages)
    assert rank.page_bytes == max(settings.page_format._share(3, r, (0, SMOL.num_layers))
                                  .page_bytes for r in range(3))


KEYNORM_GUARDS = """policy p {
    keep sinks 4
    keep window 48
    retain 50%
    score keynorm
    adapt heads "heads.json"
    keys   int4 group 16 per channel
    values int4 group 16 per token
    guard 50% of retained at int8 by score
}
"""


def distinct_head_pages(fmt) -> int:
    """The first layer whose three KV heads keep three different counts, one of them none."""
    for layer in range(len(fmt.layers)):
        counts = [page.selected for page in fmt.pages_of(layer)]
        if len(set(counts)) == 3 and 0 in counts:
            return layer
    raise AssertionError("no such layer")


@pytest.mark.parametrize("kind", ["torch", "cpu"])
def test_each_head_keeps_its_own_share_step_by_step(tmp_path, kind):
    """Two interleaved requests (a prompt, then one token per step) over shuffled blocks in a
    layer whose heads keep 3 different counts of every sealed 64-token block (one keeps none):
    every output is attention over each head's own kept tokens — the rule stated per head in
    test_vllm_paged — through the store's PyTorch path and through the compiled C kernels."""
    from kvpolicy.kernels import cpu
    from test_store_kernels import store_kernels
    from test_vllm_paged import FakeEngine, expected_with_retention, run_interleaved
    if kind == "cpu" and cpu.compiler() is None:
        pytest.skip("no C compiler")
    policy = checked(write_policy(tmp_path, KEYNORM_GUARDS))
    fmt = page_format(policy, SMOL, 64)
    layer = distinct_head_pages(fmt)
    assert len(fmt.head_groups(layer, 3)) == 3
    kernels = None if kind == "torch" else store_kernels(policy, tmp_path, layer, kind="cpu")
    torch.manual_seed(layer)
    engine = FakeEngine(fmt, layer=layer, dtype=torch.bfloat16)  # staged as an engine stages
    step = engine.step
    engine.step = lambda chunks: step(chunks, kernels=kernels)
    heads, d, q_heads = 3, SMOL.head_dim, 9
    lengths = {"a": (150, 300), "b": (70, 230)}
    rows = {"a": [12, 40, 3, 27, 8], "b": [5, 60, 19, 2]}
    data = {r: tuple(x.bfloat16().float() for x in (  # exact in the bfloat16 staging
        torch.randn(n, heads, d) * torch.rand(n, heads, 1) * 3, torch.randn(n, heads, d),
        torch.randn(n, q_heads, d))) for r, (_, n) in lengths.items()}
    pos = run_interleaved(
        engine, lengths, rows, data, lambda r, step, pos: r == "a" or pos["a"] >= 160,
        lambda r, q, start, end: expected_with_retention(fmt, data[r][0], data[r][1], q, start,
                                                         end, 0.125, lengths[r][0], layer),
        atol=3e-5 if kind == "torch" else 1e-3)
    assert pos == {"a": 300, "b": 230}
    # the other layers' pages of the shuffled blocks were never written
    others = [view for i, view in enumerate(engine.cache.unbind(1)) if i != layer]
    assert all(not view.any() for view in others)


# ---- kvpolicy calibrate -------------------------------------------------------------------------

def test_head_shares_follow_the_scores():
    from kvpolicy.tune.calibrate import head_shares
    torch.manual_seed(0)
    scores = [torch.rand(2, 100) * 0.1 for _ in range(3)]
    scores[1][0, 10:60] = 1.0  # layer 1, head 0 finds what the copy needs
    shares = head_shares(scores, sinks=4, window=8, keep=0.25)
    assert shares.shape == (3, 2) and abs(float(shares.sum()) - 1) < 1e-9
    assert float(shares[1, 0]) == max(shares.flatten().tolist())
    middle = 3 * 2 * (100 - 4 - 8)
    exactly = head_shares(scores, sinks=4, window=8, keep=50 / middle)  # its 50 tokens only
    assert exactly[1, 0] == 1 and float(exactly.sum()) == 1
    with pytest.raises(ValueError, match="no middle"):
        head_shares([torch.rand(2, 10)], sinks=4, window=8, keep=0.5)


@pytest.mark.parametrize("args, message", [
    (["--keep", "0"], "--keep 0: between 0 and 1"),
    (["--keep", "nan"], "--keep nan"),
    (["--samples", "0"], "--samples 0: at least 1"),
    (["--tasks", "ppl"], "--tasks 'ppl'"),
    (["--context", "10"], "--context 10: at least 256"),
])
def test_calibrate_refuses_bad_arguments_before_loading_anything(tmp_path, args, message):
    out = run_cli("calibrate", "-o", str(tmp_path / "h.json"), *args)
    assert out.returncode != 0 and message in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "h.json").exists()


def test_calibrate_refuses_a_directory_as_its_output(tmp_path):
    out = run_cli("calibrate", "-o", str(tmp_path))
    assert out.returncode != 0 and "is a directory" in out.stderr


@pytest.mark.slow
def test_calibrate_writes_weights_a_policy_can_use(tmp_path):
    out = run_cli("calibrate", "-o", str(tmp_path / "heads.json"), "--tasks", "niah_single",
                  "--samples", "1", "--context", "400", "--no-progress")
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "heads.json").read_text())
    assert data["calibration"]["seed"] == 1000 and data["command"].startswith("kvpolicy calibrate")
    weights = head_file.read_weights(tmp_path / "heads.json")
    assert len(weights) == SMOL.num_layers and len(weights[0]) == SMOL.num_kv_heads
    assert abs(sum(map(sum, weights)) - 1) < 1e-4
    policy = checked(write_policy(tmp_path, weights=weights))  # usable as written
    assert make_plan(policy, SMOL, 4096).compression_ratio > 1


def test_policies_without_head_weights_keep_their_hashes():
    """The IR gained head_weights after policies were measured: a policy without them serializes
    as before (no key), so committed runs' lines (keyed by hash) still match."""
    from kvpolicy.lang.lower import check_source
    from kvpolicy.diagnostics import Source
    policy = check_source(Source("t.kvp", "policy p { retain 50%\n score reconstruct\n"
                                          " adapt threshold }")).policy
    data = policy_to_json(policy)
    assert "head_weights" not in data["adapt"] and data["adapt"]["rule"] == "threshold"
    assert policy_from_json(data) == policy

"""The store's compiled path against its PyTorch path, on paged inputs — the Triton kernels in
Triton's interpreter, and the C kernel CPU engines run (kind "cpu"): requests in shuffled physical blocks, pages sealed by the PyTorch path, and at every decode step
the same state stepped twice — once by the paged decode kernel (pages read through the block
table, staged blocks, the new token; attention mass from the launch) and the compiled pack
kernels, once by PyTorch. Outputs and attention mass agree to fp16-dot tolerance; pages sealed
by the pack kernels are bit-identical when selection does not depend on the kernel's mass."""

from __future__ import annotations

import copy
import dataclasses
import functools

import pytest
import torch

from conftest import POLICIES
from kvpolicy import load_policy
from kvpolicy.compiler.codegen import render_cpu
from kvpolicy.compiler.loader import render_and_import
from kvpolicy.compiler.specs import specs_for
from kvpolicy.plan import pages
from kvpolicy.plan.planner import make_plan
from kvpolicy.kernels import cpu, launch
from kvpolicy.kernels import bound
from kvpolicy.kernels import reference as R
from kvpolicy.kernels.contract import PagedTables
from test_vllm_paged import RETAINING, SMOL, FakeEngine


def store_kernels(policy, directory, layer=0, num_splits=2, kind="triton") -> bound.StoreKernels:
    """The kernels specs_for gives the layer, as `kvpolicy.load` + `bound.kernels_for` give them:
    kind "triton" (rendered and imported; the interpreter runs them here) or "cpu" (the same
    specs in C, compiled)."""
    compiled = specs_for(make_plan(policy, SMOL, 4096))
    by_uri = {spec.uri: spec for spec in compiled.specs}
    roles = vars(compiled.layers[layer])
    if kind == "cpu":
        library = cpu.build(render_cpu(by_uri[roles["paged_decode"]]))
        packs = {roles[role]: render_cpu(by_uri[roles[role]])
                 for role in ("pack_page_body", "pack_page_guard") if roles[role] is not None}
        return bound.StoreKernels(decode=functools.partial(cpu.paged_decode, library),
                                  packer=cpu.packer(packs))

    def module(role):
        uri = roles[role]
        return None if uri is None else render_and_import(by_uri[uri], directory)
    packs = {roles[role]: module(role) for role in ("pack_page_body", "pack_page_guard")
             if roles[role] is not None}
    return bound.StoreKernels(
        decode=functools.partial(launch.paged_decode, module("paged_decode"), module("combine"),
                                 num_splits=num_splits),
        packer=launch.packer(packs))


KINDS = ["triton", pytest.param("cpu", marks=pytest.mark.skipif(
    cpu.compiler() is None, reason="no C compiler"))]


@pytest.mark.parametrize("reduce", ["mean", "max", "sum"])
def test_paged_decode_mass_is_each_staged_tokens_softmax_weight(tmp_path, reduce):
    """The launch alone, staged blocks and the new token only: the output is softmax attention
    over them, and the mass of each staged token and of the new one is its softmax weight,
    reduced over the KV group's query heads as the policy's gqa rule says."""
    kernels = store_kernels(load_policy(POLICIES / "kivi.kvp"), tmp_path)
    decode = kernels.decode
    torch.manual_seed(9)
    heads, d, bs, group = 3, 64, 32, 3
    staging = torch.randn(5, heads, bs, 2, d).to(torch.bfloat16)
    staged = [[(1, 32), (3, 10)], [(4, 20)]]
    q = torch.randn(2, heads * group, d)
    new_k, new_v = torch.randn(2, heads, d), torch.randn(2, heads, d)

    def table(i):
        return torch.tensor([[row[j][i] if j < len(row) else 0 for j in range(2)]
                             for row in staged], dtype=torch.int32)
    none = torch.zeros(2, dtype=torch.int32)
    tables = PagedTables.pages(torch.zeros(2, 0, dtype=torch.int32), none, none, 0, 32, 0,
                               table(0), table(1), torch.tensor([2, 1], dtype=torch.int32))
    out, mass = decode(q, new_k, new_v, torch.zeros(1, heads, 1536, dtype=torch.uint8), tables,
                       staging, 0.125, mass_reduce=reduce)
    for r, row in enumerate(staged):
        keys = torch.cat([staging[slot, :, :n, 0].float() for slot, n in row]
                         + [new_k[r][:, None]], 1)  # [H, n, D]
        values = torch.cat([staging[slot, :, :n, 1].float() for slot, n in row]
                           + [new_v[r][:, None]], 1)
        weights = torch.softmax(torch.einsum("hgd,hnd->hgn", q[r].reshape(heads, group, d),
                                             keys) * 0.125, -1)
        want_out = torch.einsum("hgn,hnd->hgd", weights, values).reshape(heads * group, d)
        torch.testing.assert_close(out[r], want_out, atol=2e-2, rtol=2e-2)
        want_mass = {"mean": weights.mean(1), "max": weights.amax(1), "sum": weights.sum(1)}[reduce]
        columns = [k * bs + t for k, (_, n) in enumerate(row) for t in range(n)] + [2 * bs]
        torch.testing.assert_close(mass[r][:, columns], want_mass, atol=2e-3, rtol=2e-2)


@pytest.mark.parametrize("kind", KINDS)
def test_tables_of_each_kv_head_read_what_that_heads_own_launch_reads(tmp_path, kind):
    """Tables [b, H, width] (each KV head's own micro-pages and staged runs, the stream plan's
    layout): head h of one launch attends exactly what a launch with head h's row shared by
    every head attends."""
    policy = load_policy(POLICIES / "kivi.kvp")
    decode = store_kernels(policy, tmp_path, kind=kind).decode
    body = make_plan(policy, SMOL, 4096).layers[0].page_layouts[1]
    torch.manual_seed(4)
    heads, d, group, blocks = 3, 64, 3, 6
    pages = torch.zeros(blocks, heads, body.nbytes, dtype=torch.uint8)
    for block in range(blocks):
        for h in range(heads):
            keys, values = torch.randn(2, body.tokens, d).to(torch.bfloat16)
            pages[block, h] = R.pack_blocks(keys, values, None, body)[0]
    staging = torch.randn(4, heads, 32, 2, d).to(torch.bfloat16)
    rows = [([4, 1], body.tokens, [(0, 32), (2, 7)]), ([5], 16, []), ([], 0, [(3, 30)])]
    q = torch.randn(1, heads * group, d)
    new_k, new_v = torch.randn(1, heads, d), torch.randn(1, heads, d)

    def tables(per_head: list) -> PagedTables:
        """[1, len(per_head), ...]: one request, a row per KV head; one row: [1, ...], shared."""
        def table(values):
            return torch.tensor([v + [0] * (2 - len(v)) for v in values], dtype=torch.int32)

        def count(values):
            return torch.tensor(values, dtype=torch.int32)
        shape = (lambda t: t[None]) if len(per_head) > 1 else (lambda t: t)
        return PagedTables.pages(
            shape(table([r[0] for r in per_head])), shape(count([len(r[0]) for r in per_head])),
            shape(count([r[1] for r in per_head])), 0, body.tokens, 0,
            shape(table([[s for s, _ in r[2]] for r in per_head])),
            shape(table([[n for _, n in r[2]] for r in per_head])),
            shape(count([len(r[2]) for r in per_head])))
    out, mass = decode(q, new_k, new_v, pages, tables(rows), staging, 0.125, mass_reduce="sum")
    for h, row in enumerate(rows):
        alone, alone_mass = decode(q, new_k, new_v, pages, tables([row]), staging, 0.125,
                                   mass_reduce="sum")
        part = slice(h * group, (h + 1) * group)
        torch.testing.assert_close(out[0, part], alone[0, part], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mass[0, h], alone_mass[0, h], atol=1e-6, rtol=1e-5)
    assert (out[0, :group] - alone[0, :group]).abs().max() > 1e-2  # the rows differ


def twin(engine: FakeEngine) -> FakeEngine:
    other = copy.copy(engine)
    other.cache = engine.cache.clone()
    other.pages = other.cache[:, engine.layer]
    other.staging = engine.staging.clone()
    other.mass = None if engine.mass is None else engine.mass.clone()
    other.table = copy.deepcopy(engine.table)
    other.spilled = copy.deepcopy(engine.spilled)
    return other


def run_both(fmt, kernels, prompts, decode_steps, rows, seed, compare_pages):
    """Prefill every request (PyTorch: more than one new token), then decode steps, each run by
    the kernels on a twin of the state and by PyTorch on the state itself."""
    torch.manual_seed(seed)
    heads, d = fmt.kv_heads, fmt.head_dim
    engine = FakeEngine(fmt, dtype=torch.bfloat16)
    total = {r: n + decode_steps for r, n in prompts.items()}
    data = {r: (torch.randn(n, heads, d) * torch.rand(n, heads, 1) * 3, torch.randn(n, heads, d),
                torch.randn(n, 9, d)) for r, n in total.items()}
    engine.step([(rows[r], 0, data[r][2][:n], data[r][0][:n], data[r][1][:n])
                 for r, n in prompts.items()])
    sealed_steps = 0
    for t in range(decode_steps):
        chunks = []
        for r, n in prompts.items():
            k, v, q = (x[n + t:n + t + 1] for x in data[r])
            chunks.append((rows[r], n + t, q, k, v))
        compiled = twin(engine)
        before = engine.cache.clone()
        got = compiled.step(chunks, kernels=kernels)
        want = engine.step(chunks)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=2e-2, rtol=2e-2)
        if engine.mass is not None:
            torch.testing.assert_close(compiled.mass, engine.mass, atol=2e-3, rtol=2e-2)
        if not torch.equal(before, engine.cache):
            sealed_steps += 1
            if compare_pages:
                assert torch.equal(compiled.cache, engine.cache)
    return sealed_steps


@pytest.mark.parametrize("kind", KINDS)
def test_retention_with_guards_pages_and_a_straddling_seal(write_policy, tmp_path, kind):
    """Half of each 64-token block kept (int8 guards, int4 body), window 0: decode steps cross
    block boundaries, so a step seals the block its own token is in (read from staging then)."""
    policy = load_policy(write_policy(RETAINING.format(score="keynorm", window=0, sinks=0)))
    fmt = pages.page_format(policy, SMOL, 64)
    kernels = store_kernels(policy, tmp_path, kind=kind)
    sealed = run_both(fmt, kernels, {"a": 190, "b": 125}, 4, {"a": [12, 40, 3, 27],
                                                               "b": [5, 60, 19]}, 0, True)
    assert sealed == 2  # a's block 2 at 192 tokens (step 1), b's block 1 at 128 (step 2)


@pytest.mark.parametrize("kind", KINDS)
def test_snapkv_mass_from_the_kernel_with_sinks_and_a_window(write_policy, tmp_path, kind):
    """snapkv: the launch's attention mass (mean over the KV group) is what PyTorch adds to the
    staged tokens; the sinks' block stays staged beside sealed pages."""
    policy = load_policy(write_policy(RETAINING.format(score="snapkv", window=48, sinks=4)))
    fmt = pages.page_format(policy, SMOL, 64)
    assert fmt.needs_mass and fmt.sink_blocks == 1
    kernels = store_kernels(policy, tmp_path, kind=kind)
    sealed = run_both(fmt, kernels, {"a": 237, "b": 150}, 3, {"a": [9, 33, 1, 50, 22],
                                                              "b": [4, 17, 61]}, 1, False)
    assert sealed == 1  # a's block 2 at 240 tokens


@pytest.mark.parametrize("kind", KINDS)
def test_every_token_kept_in_order_reads_the_last_page_up_to_the_new_token(tmp_path, kind):
    """KIVI with window 0: a block seals when its last token arrives, so the step's own token is
    in a sealed page whose body the kernel reads only up to it."""
    policy = load_policy(POLICIES / "kivi.kvp")
    fmt = dataclasses.replace(pages.page_format(policy, SMOL, 32), window=0)
    kernels = store_kernels(policy, tmp_path, kind=kind)
    sealed = run_both(fmt, kernels, {"a": 94, "b": 40}, 3, {"a": [7, 2, 30, 15], "b": [11, 3]}, 2,
                      True)
    assert sealed == 1  # a's block 2 at 96 tokens


# ---- through a real model: the HF paged cache with backend="triton" -------------------------------

SNAPKV_GUARDS = """policy snapkv_guards {
    keep sinks 4
    keep window 32
    retain 50%
    score snapkv(observe = 16, pool = max 7)
    keys   int4 group 32 per channel
    values int2 group 32 per token
    guard 50% of retained at int8 by score
}"""


@pytest.mark.slow
def test_smollm2_decodes_the_same_tokens_through_the_kernels(write_policy):
    """SmolLM2 with a snapkv policy that keeps half of what leaves its window (32-token blocks,
    the stream layout): the paged cache with the compiled kernels (decode steps in the paged decode kernel, its attention mass
    choosing what seals, pages packed by the pack kernels) decodes the same greedy tokens as the
    PyTorch path, and so does the C kernel (backend "cpu"); all seal the same number of blocks in
    every layer."""
    from kvpolicy.engines.hf import generate, load_model
    model, tokenizer = load_model()
    policy = write_policy(SNAPKV_GUARDS)
    words = ("The lighthouse keeper logged each ship, its cargo and the hour it docked. ")
    ids = tokenizer(words * 20, return_tensors="pt")["input_ids"][:, :125]  # block 2 seals at 128
    runs = {backend: generate(model, tokenizer, ids, policy, max_new_tokens=4, block_size=32,
                              backend=backend, stop_at_eos=False)
            for backend in ("torch", "triton", "cpu")}
    assert all(run.cache.backend == backend for backend, run in runs.items())
    assert runs["triton"].token_ids == runs["torch"].token_ids == runs["cpu"].token_ids
    # the stream layout: blocks 0-2 have left the 32-token window of 128 tokens (125 + 3), the
    # last of them in a decode step
    assert all(run.cache.sealed_blocks == [3] * 30 for run in runs.values())
    assert runs["triton"].cache.nbytes() == runs["torch"].cache.nbytes() == \
        runs["cpu"].cache.nbytes()

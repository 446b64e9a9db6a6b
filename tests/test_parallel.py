"""Past one process: how the page plan splits over a parallel vLLM engine's workers — a share of
every layer's KV heads per tensor-parallel rank, a run of layers per pipeline stage — without
vLLM (`PageFormat.for_worker`, the store over a stage's cache, the start-up settings). The engine
runs themselves are in test_vllm_parallel.py."""

from __future__ import annotations

import pytest
import torch

from conftest import POLICIES
from kvpolicy import load_policy
from kvpolicy.compiler.artifact import compile_policy
from kvpolicy.engines.vllm.settings import WorkerShare, load_settings
from kvpolicy.models import resolve_model
from kvpolicy.plan import pages
from kvpolicy.kernels import reference as R
from kvpolicy.store import paged
from test_vllm_paged import engine_config

SMOL = resolve_model("smollm2-135m")  # 30 layers, 3 KV heads
HALVES = [(0, 15), (15, 30)]


def mixed(write_policy):
    """4-bit keys in layers 0-1, 2-bit elsewhere: the first pipeline stage's pages are larger."""
    return load_policy(write_policy("""policy mixed {
        keys int2 group 32 per channel
        values int2 group 32 per token
        layers 0..1 { keys int4 group 32 per channel }
    }"""))


def test_a_tensor_parallel_rank_holds_its_share_of_the_heads_at_the_same_page_size():
    fmt = pages.page_format(load_policy(POLICIES / "kivi.kvp"), SMOL, 32)
    rank = fmt.for_worker(3, [(0, 30)], 0)
    assert rank.kv_heads == 1 and rank.page_bytes == fmt.page_bytes
    assert rank.capacity_ratio == fmt.capacity_ratio
    assert rank.staging_bytes(7) * 3 == fmt.staging_bytes(7)
    assert rank.held_bytes(1000) * 3 == fmt.held_bytes(1000)
    assert rank.head_groups(4, 1)[0].count == 1


def test_pipeline_stages_hold_their_layers_at_the_largest_stages_page(write_policy):
    fmt = pages.page_format(mixed(write_policy), SMOL, 32)
    first, second = (fmt.for_worker(1, HALVES, stage) for stage in (0, 1))
    assert list(first.held) == list(range(15)) and list(second.held) == list(range(15, 30))
    big, small = fmt.layer_bytes(0), fmt.layer_bytes(5)
    stage_mean = -(-(2 * big + 13 * small) // 15)
    assert first.page_bytes == second.page_bytes == -(-stage_mean // 16) * 16 > fmt.page_bytes
    assert second.padding_bytes == 3 * 15 * second.page_bytes - 3 * 15 * small
    assert second.layer_offset(15, 3) == 0 and second.layer_offset(16, 3) == 3 * small
    assert first.staging_bytes(2) + second.staging_bytes(2) == fmt.staging_bytes(2)


def stage_cache(fmt, num_blocks):
    """The cache vLLM allocates on one pipeline stage: its layers' pages of a block side by side
    (BLHNC), and each layer's view [num_blocks, H, 1, page_bytes], by model layer."""
    cache = torch.zeros(num_blocks, len(fmt.held), fmt.kv_heads, 1, fmt.page_bytes,
                        dtype=torch.uint8)
    return cache, {layer: cache[:, i] for i, layer in enumerate(fmt.held)}


@pytest.mark.parametrize("stage", [0, 1])
def test_a_stage_seals_its_layers_into_its_own_cache(write_policy, stage):
    """Every held layer's sealed pages land inside the stage's block run, each where its own
    layout says, none over another's: read back bit-exact against the reference packing."""
    fmt = pages.page_format(mixed(write_policy), SMOL, 32).for_worker(1, HALVES, stage)
    torch.manual_seed(stage)
    cache, views = stage_cache(fmt, 5)
    staging = {layer: torch.randn(2, 3, 32, 2, 64) for layer in fmt.held}
    for layer in fmt.held:
        paged.seal_blocks(views[layer], staging[layer], torch.tensor([3, 1]),
                          torch.tensor([0, 1]), fmt, layer)
    for layer in fmt.held:
        held = paged.layer_pages(views[layer], fmt, layer)
        for block, slot in ((3, 0), (1, 1)):
            for h in range(3):
                s = staging[layer][slot, h]
                want = R.pack_blocks(s[:, 0], s[:, 1], None, fmt.layers[layer].body)
                assert torch.equal(held[block, h], want.reshape(-1)), (layer, block, h)
    assert cache[[0, 2, 4]].count_nonzero() == 0


def test_a_rank_holds_its_own_heads_pages_padded_to_the_largest_ranks():
    """adapt heads under tensor parallelism: each rank's share is its KV heads' own pages, at
    the page size of the rank whose heads keep the most (the others pad)."""
    fmt = pages.page_format(load_policy(POLICIES / "heads_8x_keep30.kvp"), SMOL, 64)
    shares = [fmt.for_worker(3, [(0, 30)], 0, rank) for rank in range(3)]
    means = [share._share(3, rank, (0, 30)).page_bytes for rank, share in enumerate(shares)]
    assert len(set(means)) > 1  # the calibration gives the heads different budgets
    for rank, share in enumerate(shares):
        assert share.kv_heads == 1 and share.page_bytes == max(means)
        assert [share.pages_of(layer) for layer in range(30)] == \
            [fmt.pages_of(layer)[rank:rank + 1] for layer in range(30)]
        own = sum(page.nbytes for layer in range(30) for page in share.pages_of(layer))
        assert share.padding_bytes == 30 * share.page_bytes - own
    # what the ranks hold together is the one-process page, padded: never less
    assert sum(share.held_bytes(4096) for share in shares) >= fmt.held_bytes(4096)


def test_each_rank_seals_its_heads_as_the_one_process_store_does():
    """Per-head pages sealed by each rank's share of the format, over its head's staging, are
    bit-identical to the same head's pages sealed by the one-process format."""
    fmt = pages.page_format(load_policy(POLICIES / "heads_8x_keep30.kvp"), SMOL, 64)
    torch.manual_seed(0)
    staging = {layer: torch.randn(2, 3, 64, 2, 64) for layer in range(30)}
    blocks, slots = torch.tensor([3, 1]), torch.tensor([0, 1])
    _, whole = stage_cache(fmt, 5)
    for layer in range(30):
        paged.seal_blocks(whole[layer], staging[layer], blocks, slots, fmt, layer)
    for rank in range(3):
        share = fmt.for_worker(3, [(0, 30)], 0, rank)
        _, views = stage_cache(share, 5)
        for layer in range(30):
            paged.seal_blocks(views[layer], staging[layer][:, rank:rank + 1], blocks, slots,
                              share, layer)
            mine = share.head_groups(layer, 1)[0]
            theirs = next(g for g in fmt.head_groups(layer, 3) if rank in range(g.first,
                                                                              g.first + g.count))
            got = paged.group_pages(views[layer], share, mine)[blocks, 0]
            want = paged.group_pages(whole[layer], fmt, theirs)[blocks, rank - theirs.first]
            assert torch.equal(got, want), (rank, layer)


def test_splits_that_cannot_hold_the_pages_are_refused(write_policy):
    kivi = pages.page_format(load_policy(POLICIES / "kivi.kvp"), SMOL, 32)
    with pytest.raises(pages.UnsupportedConfiguration, match="3 KV heads do not split over 2"):
        kivi.for_worker(2, [(0, 30)], 0)
    with pytest.raises(pages.UnsupportedConfiguration, match="do not cover"):
        kivi.for_worker(1, [(0, 14), (15, 30)], 0)
    heads = pages.page_format(load_policy(POLICIES / "heads_8x_keep30.kvp"), SMOL, 64)
    with pytest.raises(pages.UnsupportedConfiguration, match="was not taken for its tensor"):
        heads.head_groups(0, 1)  # the one-process format read by a one-head worker


def test_start_up_says_what_each_worker_holds(tmp_path):
    compile_policy(load_policy(POLICIES / "kivi.kvp"), SMOL, tmp_path / "kivi")
    config = engine_config()
    alone = load_settings(str(tmp_path / "kivi"), config)
    rank = load_settings(str(tmp_path / "kivi"), config,
                         WorkerShare(tensor_rank=2, tensor_size=3, pipeline_rank=1,
                                     stages=tuple(HALVES)))
    assert rank.page_format.kv_heads == 1 and list(rank.page_format.held) == list(range(15, 30))
    assert rank.staging_bytes * 3 * 2 == alone.staging_bytes  # a third of the heads, half the layers
    text = rank.describe()
    assert "worker 2/3 (tensor-parallel) of stage 1/2 (pipeline): KV head 2 of 3, layers 15-29 " \
           "of 30" in text, text
    assert "worker" not in alone.describe()

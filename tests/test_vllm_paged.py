"""The vLLM backend's compute and bookkeeping as plain functions (no vLLM needed): page format,
staging table, write (stage + seal), and attention over sealed pages and staged blocks, against
an independent statement of the rule and the PyTorch reference."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import POLICIES
from kvpolicy import load_policy
from kvpolicy.compiler.artifact import compile_policy
from kvpolicy.integrations.vllm import paged
from kvpolicy.integrations.vllm.settings import load_settings
from kvpolicy.integrations.vllm.staging import RequestStep, StagingFull, StagingTable
from kvpolicy.models import resolve_model as get_model
from kvpolicy.runtime import reference as R

SMOL = get_model("smollm2-135m")


def kivi_format(block_size=32, window=None):
    policy = load_policy(POLICIES / "kivi.kvp")
    fmt = paged.page_format(policy, SMOL, block_size)
    return fmt if window is None else paged.PageFormat(**{**vars(fmt), "window": window})


def test_kivi_page_is_the_format_block_and_the_ratio_is_exact():
    fmt = kivi_format()
    layout = fmt.layouts[0]
    assert layout.tokens == 32 and not layout.positions
    # int2 codes: 32 tokens x 4 words x 4 B, keys and values; fp16 scale + zero per group
    assert fmt.page_bytes == 2 * 512 + 4 * 128 == layout.nbytes
    assert fmt.baseline_page_bytes == 32 * 2 * 64 * 2
    assert fmt.capacity_ratio == pytest.approx(8192 / 1536)
    assert fmt.padding_bytes == 0
    assert kivi_format(block_size=64).page_bytes == 2 * layout.nbytes


def test_unsupported_policies_list_every_reason():
    with pytest.raises(paged.UnsupportedConfiguration) as info:
        paged.page_format(load_policy(POLICIES / "aggressive.kvp"), SMOL, 30)
    text = str(info.value)
    for words in ("evicts tokens", "keep sinks 4", "guard tokens", "cluster evicted",
                  "not a multiple"):
        assert words in text, text


def test_per_layer_formats_pad_to_the_largest_page(write_policy):
    policy = load_policy(write_policy("""policy mixed {
        keys int2 group 32 per channel
        values int2 group 32 per token
        layers 0..1 { keys int4 group 32 per channel }
    }"""))
    fmt = paged.page_format(policy, SMOL, 32)
    small, big = fmt.layer_bytes(5), fmt.layer_bytes(0)
    assert big == fmt.page_bytes > small
    assert fmt.padding_bytes == SMOL.num_kv_heads * (SMOL.num_layers - 2) * (big - small)


# ---- the staging table ------------------------------------------------------------------------

def test_table_seals_blocks_as_they_leave_the_window_and_frees_their_slots():
    table = StagingTable(slots=8, block_size=32, window=64)
    blocks = [7, 3, 9, 1, 4, 6]
    step = table.plan([RequestStep(blocks, 0, 100)])  # blocks 0..3 written; 0 leaves (32+64 ≤ 100)
    assert step.seal_blocks == [7]
    assert len(step.request_slots[0]) == 4 and -1 not in step.request_slots[0]
    assert 7 not in table.slot_of_block and len(table.free) == 8 - 3
    for end in range(101, 129):
        step = table.plan([RequestStep(blocks, end - 1, end)])
        assert step.seal_blocks == ([3] if end == 128 else [])
    assert step.request_slots[0][0] == -1  # sealed earlier


def test_table_starts_fresh_for_a_new_request_on_reused_blocks():
    table = StagingTable(slots=4, block_size=16, window=0)
    table.plan([RequestStep([5, 6], 0, 20)])  # block 5 sealed at once, 6 staged (4 tokens)
    assert set(table.slot_of_block) == {6}
    step = table.plan([RequestStep([6, 5], 0, 3)])  # a new request reuses block 6
    assert step.seal_blocks == [] and set(table.slot_of_block) == {6}


def test_table_reclaims_idle_slots_but_never_a_running_requests():
    table = StagingTable(slots=2, block_size=16, window=32)
    table.plan([RequestStep([1], 0, 10)])  # request A: block 1
    table.plan([RequestStep([2], 0, 10)])  # request B: block 2 (A not scheduled)
    # request C needs a slot: A's block is idle longest and not in this step: reclaimed
    table.plan([RequestStep([3], 0, 10)])
    assert set(table.slot_of_block) == {2, 3}
    with pytest.raises(StagingFull, match="lost its staged tokens"):
        table.plan([RequestStep([1], 10, 11)])  # A comes back: its window is gone, loudly
    table = StagingTable(slots=1, block_size=16, window=32)
    with pytest.raises(StagingFull, match="KVPOLICY_STAGING_BLOCKS"):
        table.plan([RequestStep([1], 0, 10), RequestStep([2], 0, 10)])


# ---- write and attend, simulated engine steps ------------------------------------------------

class FakeEngine:
    """Drives the plain functions the way the backend does, over shuffled physical blocks."""

    def __init__(self, fmt, num_blocks=64, slots=32, dtype=torch.float32):
        self.fmt = fmt
        heads, d = fmt.kv_heads, fmt.head_dim
        self.pages = torch.zeros(num_blocks, heads, 1, fmt.page_bytes, dtype=torch.uint8)
        self.staging = torch.zeros(slots, heads, fmt.block_size, 2, d, dtype=dtype)
        self.table = StagingTable(slots, fmt.block_size, fmt.window)

    def step(self, chunks, layer=0, scale=0.125):
        """chunks: [(block_row, start, query [m, Hq, D], keys [m, H, D], values [m, H, D])]."""
        bs = self.fmt.block_size
        step = self.table.plan([RequestStep(row, start, start + len(k))
                                for row, start, _, k, _ in chunks])
        slots, offsets = [], []
        for row, start, _, k, _ in chunks:
            for pos in range(start, start + len(k)):
                slots.append(step.stage_of_block[row[pos // bs]])
                offsets.append(pos % bs)
        keys = torch.cat([k for *_, k, _ in chunks])
        values = torch.cat([v for *_, v in chunks])
        paged.stage_tokens(self.staging, keys, values, torch.tensor(slots), torch.tensor(offsets))
        paged.seal_blocks(self.pages, self.staging, torch.tensor(step.seal_blocks),
                          torch.tensor(step.seal_slots), self.fmt, layer)
        outs = []
        for i, (row, start, q, k, v) in enumerate(chunks):
            end = start + len(k)
            pk, pv = paged.cached_tokens(self.pages, self.staging, row, step.request_slots[i],
                                         start, end, self.fmt, layer)
            outs.append(paged.attend(q, pk, pv, k, v, scale))
        return outs


def quantized_blocks(fmt, keys, values):
    """Every whole block of a sequence [T, H, D] through the reference's pack and unpack."""
    bs, layout = fmt.block_size, fmt.layouts[0]
    k_q, v_q = keys.clone().float(), values.clone().float()
    for j in range(keys.shape[0] // bs):
        for h in range(keys.shape[1]):
            part = slice(j * bs, (j + 1) * bs)
            blocks = R.pack_blocks(keys[part, h], values[part, h], None, layout)
            k_q[part, h], v_q[part, h], _ = R.unpack_blocks(blocks, layout, bs)
    return k_q, v_q


def expected_attention(fmt, keys, values, quantized, query, start, end, scale):
    """The rule stated independently: tokens of blocks sealed at `end` are their whole block's
    quantize-dequantize; the rest, and the chunk itself, are exact."""
    bs = fmt.block_size
    sealed = sum(bs for j in range(end // bs) if fmt.sealed(j, end))
    k_hat = torch.cat([quantized[0][:sealed], keys[sealed:end].float()])
    v_hat = torch.cat([quantized[1][:sealed], values[sealed:end].float()])
    k_hat[start:end], v_hat[start:end] = keys[start:end].float(), values[start:end].float()
    group = query.shape[1] // keys.shape[1]
    kk = k_hat.transpose(0, 1).repeat_interleave(group, 0)
    vv = v_hat.transpose(0, 1).repeat_interleave(group, 0)
    mask = torch.ones(end - start, end, dtype=torch.bool).tril(start)
    return torch.nn.functional.scaled_dot_product_attention(
        query.float().transpose(0, 1), kk, vv, attn_mask=mask, scale=scale).transpose(0, 1)


@pytest.mark.parametrize("window", [0, 40, 64])
def test_two_interleaved_requests_match_the_rule_step_by_step(window):
    torch.manual_seed(window)
    fmt = kivi_format(window=window)
    heads, d, q_heads = fmt.kv_heads, fmt.head_dim, 9
    engine = FakeEngine(fmt)
    lengths = {"a": (70, 150), "b": (33, 120)}  # prompt, final length
    rows = {"a": [12, 40, 3, 27, 8, 51], "b": [5, 60, 19, 2]}
    data = {r: (torch.randn(n, heads, d) * 2, torch.randn(n, heads, d), torch.randn(n, q_heads, d))
            for r, (_, n) in lengths.items()}
    quantized = {r: quantized_blocks(fmt, k, v) for r, (k, v, _) in data.items()}
    pos = {r: 0 for r in lengths}
    for step in range(200):
        chunks, names = [], []
        for r, (prompt, final) in lengths.items():
            if pos[r] >= final or (r == "b" and step < 3):  # b arrives later
                continue
            size = prompt if pos[r] == 0 else 1
            k, v, q = (t[pos[r]:pos[r] + size] for t in data[r])
            chunks.append((rows[r], pos[r], q, k, v))
            names.append(r)
        if not chunks:
            break
        outs = engine.step(chunks)
        for r, out, (_, start, q, k, _) in zip(names, outs, chunks):
            want = expected_attention(fmt, data[r][0], data[r][1], quantized[r], q, start,
                                      start + len(k), 0.125)
            torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-5)
            pos[r] += len(k)
    assert pos == {"a": 150, "b": 120}


def test_sealed_pages_hold_exactly_the_reference_bytes():
    torch.manual_seed(1)
    fmt = kivi_format(window=0)
    engine = FakeEngine(fmt)
    keys, values = torch.randn(64, 3, 64), torch.randn(64, 3, 64)
    engine.step([([9, 4], 0, torch.randn(64, 9, 64), keys, values)])
    for j, block in enumerate([9, 4]):
        for h in range(3):
            want = R.pack_blocks(keys[j * 32:(j + 1) * 32, h], values[j * 32:(j + 1) * 32, h],
                                 None, fmt.layouts[0])
            assert torch.equal(engine.pages[block, h, 0], want.reshape(-1))


# ---- start-up checks ---------------------------------------------------------------------------

def engine_config(model=SMOL, dtype="torch.bfloat16", block_size=32, prefix_caching=False):
    hf = {"num_hidden_layers": model.num_layers, "num_attention_heads": model.num_q_heads,
          "num_key_value_heads": model.num_kv_heads, "head_dim": model.head_dim}
    return SimpleNamespace(
        model_config=SimpleNamespace(dtype=dtype, model="test-model",
                                     hf_config=SimpleNamespace(to_dict=lambda: hf)),
        cache_config=SimpleNamespace(block_size=block_size, enable_prefix_caching=prefix_caching),
        scheduler_config=SimpleNamespace(max_num_seqs=4, max_num_batched_tokens=256),
        speculative_config=None)


@pytest.fixture
def kivi_artifact(tmp_path):
    out = tmp_path / "kivi"
    compile_policy(load_policy(POLICIES / "kivi.kvp"), SMOL, out)
    return out


def test_settings_for_a_supported_configuration(kivi_artifact):
    s = load_settings(str(kivi_artifact), engine_config())
    assert s.policy.name == "kivi" and s.page_format.page_bytes == 1536
    assert s.staging_blocks == 4 * (4 + 2) + 8
    assert "5.33x" in s.describe()


def test_settings_refuse_with_every_reason(kivi_artifact):
    other = get_model("qwen2.5-7b")
    with pytest.raises(paged.UnsupportedConfiguration) as info:
        load_settings(str(kivi_artifact), engine_config(model=other, block_size=24,
                                                        prefix_caching=True))
    text = str(info.value)
    for words in ("num_layers 30", "num_kv_heads 3", "head_dim 64", "prefix caching",
                  "block size 24"):
        assert words in text, text


def test_settings_refuse_a_tampered_artifact(kivi_artifact):
    kernel = next((kivi_artifact / "kernels").rglob("*.py"))
    data = bytearray(kernel.read_bytes())
    data[10] ^= 1
    kernel.write_bytes(bytes(data))
    with pytest.raises(paged.UnsupportedConfiguration, match="was modified"):
        load_settings(str(kivi_artifact), engine_config())
    with pytest.raises(paged.UnsupportedConfiguration, match="KVPOLICY_ARTIFACT is not set"):
        load_settings("", engine_config())

"""Generate through vLLM with a compiled policy's packed pages, and compare vLLM's KV capacity
with the 16-bit baseline in the same KV memory.

    kvpolicy compile policies/kivi.kvp --model smollm2-135m -o build/kivi
    KVPOLICY_ARTIFACT=build/kivi python examples/vllm_offline.py

Each configuration runs in its own process (vLLM loads plugins once per process, and the
baseline must not see the plugin). By default the prompt is one needle-in-a-haystack prompt long
enough for the artifact's policy to seal blocks into packed pages — its sinks and window plus
four blocks and a margin, at least 1,000 tokens (--max-model-len grows to fit it) — so what the
run shows was read back from packed pages, and it prints how many blocks were sealed. Options:
--model DIR (default: the embedded SmolLM2-135M safetensors copy), --kv-bytes (fixed KV-cache
memory, default 256 MiB: the plugin pays its staging out of it), --max-tokens, --dtype,
--block-size, --max-model-len, --needle TOKENS (another length), --depth, --short (four short
prompts instead, which stay in the full-precision window: no block is sealed), --prompts-json (a file with a list of token-id lists):

    kvpolicy compile policies/aggressive.kvp --model smollm2-135m -o build/aggressive
    KVPOLICY_ARTIFACT=build/aggressive python examples/vllm_offline.py --block-size 256 \
        --max-model-len 4096 --kv-bytes 536870912 --needle 3000 --depth 0.25
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from kvpolicy.engines.vllm.offline import EngineFailed, EngineRun, generate

PROMPTS = [
    "The three primary colors are",
    "Write one sentence about the sea:",
    "List the first five prime numbers:",
    "A haiku about autumn leaves:",
]


def needle_prompt(args) -> tuple[list[int], str]:
    """One chat-formatted needle prompt's token ids, and the expected answer."""
    from kvpolicy.eval.haystack import needle_sample
    from kvpolicy.engines.hf.generation import encode
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    needle = needle_sample(tokenizer, args.needle, args.depth, seed=0)
    ids = encode(tokenizer, needle.context + "\n" + needle.question)[0].tolist()
    print(f"needle prompt: {len(ids):,} tokens, needle at depth {args.depth:g}; the answer is "
          f"{needle.answer}")
    return ids, needle.answer


def sealing_length(artifact: str, block_size: int) -> int:
    """A prompt length (tokens) at which the artifact's policy seals at least four blocks."""
    from kvpolicy.compiler.artifact import verify
    from kvpolicy.lang.ir import policy_from_json
    policy = policy_from_json(verify(artifact)["policy"]["ir"])
    return max(1000, policy.sinks + policy.window + 4 * block_size + 200)


def run(artifact: str | None, prompts: list[list[int]], args) -> EngineRun:
    """One configuration in a fresh vLLM engine process (kvpolicy.engines.vllm.offline)."""
    try:
        return generate(prompts, args.model, artifact, max_tokens=args.max_tokens,
                        dtype=args.dtype, block_size=args.block_size,
                        max_model_len=args.max_model_len, kv_cache_memory_bytes=args.kv_bytes,
                        max_num_seqs=len(prompts), compile=args.compile)
    except EngineFailed as exc:
        sys.stderr.write(exc.stderr)
        raise SystemExit(f"vllm_offline: {exc}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--kv-bytes", type=int, default=256 << 20,
                        help="the KV memory of both runs; the plugin pays its full-precision "
                             "staging out of it (default 256 MiB)")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--compile", action="store_true",
                        help="let vLLM torch.compile the model (minutes on a small CPU)")
    parser.add_argument("--prompts-json", default=None)
    parser.add_argument("--needle", type=int, default=None, metavar="TOKENS")
    parser.add_argument("--short", action="store_true",
                        help="four short prompts (they never leave the window: nothing sealed)")
    parser.add_argument("--depth", type=float, default=0.5, help="where the needle sits (0..1)")
    args = parser.parse_args()
    if args.model is None:
        from kvpolicy.engines.hf.model import default_model_dir
        args.model = str(default_model_dir())
    artifact = os.environ.get("KVPOLICY_ARTIFACT")
    if not artifact:
        raise SystemExit("set KVPOLICY_ARTIFACT to a compiled policy (kvpolicy compile "
                         "policies/kivi.kvp --model smollm2-135m -o build/kivi)")
    answer = None
    if args.needle is None and not args.short and args.prompts_json is None:
        args.needle = sealing_length(artifact, args.block_size)
        needed = -(-(args.needle + args.max_tokens + 256) // args.block_size) * args.block_size
        args.max_model_len = max(args.max_model_len, needed)
    if args.needle is not None:
        ids, answer = needle_prompt(args)
        prompts = [ids]
    elif args.prompts_json is not None:
        with open(args.prompts_json, encoding="utf-8") as f:
            prompts = json.load(f)
    else:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        prompts = [tokenizer(text)["input_ids"] for text in PROMPTS]
    baseline = run(None, prompts, args)
    policy = run(artifact, prompts, args)
    if answer is None:
        for prompt, text in zip(PROMPTS if args.prompts_json is None else prompts, policy.texts):
            print(f"{prompt!r} -> {text!r}")
    else:
        for name, result in (("baseline", baseline), (artifact, policy)):
            text = result.texts[0]
            found = "found" if answer in text else "NOT found"
            print(f"{name}: {text!r} (needle {found})")
    sealed = policy.sealed_blocks
    print(f"blocks sealed into packed pages (per layer, all requests): "
          f"{max(sealed) if sealed else 0}")
    ratio = policy.capacity_tokens / baseline.capacity_tokens
    print(f"\nvLLM KV capacity in {args.kv_bytes:,} bytes (measured, as vLLM reports it; the "
          f"plugin's staging paid out of the same memory): baseline "
          f"{baseline.capacity_tokens:,} tokens, {artifact} {policy.capacity_tokens:,} tokens "
          f"({ratio:.2f}x)")


if __name__ == "__main__":
    main()

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
memory, default 64 MiB), --max-tokens, --dtype, --block-size, --max-model-len, --needle TOKENS
(another length), --depth, --short (four short prompts instead, which stay in the full-precision
window: no block is sealed), --prompts-json (a file with a list of token-id lists):

    kvpolicy compile policies/aggressive.kvp --model smollm2-135m -o build/aggressive
    KVPOLICY_ARTIFACT=build/aggressive python examples/vllm_offline.py --block-size 256 \
        --max-model-len 4096 --kv-bytes 134217728 --needle 3000 --depth 0.25
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

PROMPTS = [
    "The three primary colors are",
    "Write one sentence about the sea:",
    "List the first five prime numbers:",
    "A haiku about autumn leaves:",
]


def engine_run(args) -> dict:
    """One configuration, in this process: greedy generations and the capacity vLLM reports."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    prompts = PROMPTS
    if args.prompts_json:  # a list of token-id lists (tests feed both runtimes the same ids)
        with open(args.prompts_json, encoding="utf-8") as f:
            prompts = [{"prompt_token_ids": ids} for ids in json.load(f)]
    llm = LLM(model=args.model, dtype=args.dtype, block_size=args.block_size,
              max_model_len=args.max_model_len, max_num_seqs=8,
              max_num_batched_tokens=args.max_model_len,
              enable_prefix_caching=False, kv_cache_memory_bytes=args.kv_bytes, seed=0,
              enforce_eager=not args.compile)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=args.max_tokens,
                                                   ignore_eos=True))
    cache = llm.llm_engine.vllm_config.cache_config
    backend = sys.modules.get("kvpolicy.integrations.vllm.backend")  # loaded by vLLM, if at all
    sealed = dict(backend.SEALED_BLOCKS) if backend else {}
    return {"sealed_blocks_per_layer": [sealed.get(i, 0) for i in range(len(sealed))],
            "artifact": os.environ.get("KVPOLICY_ARTIFACT") or None,
            "kv_cache_memory_bytes": args.kv_bytes, "block_size": args.block_size,
            "dtype": args.dtype, "num_blocks": cache.num_gpu_blocks,
            "capacity_tokens": cache.num_gpu_blocks * args.block_size,
            "outputs": [o.outputs[0].text for o in outputs],
            "token_ids": [list(o.outputs[0].token_ids) for o in outputs]}


def needle_prompt(args) -> tuple[str, str]:
    """Writes one chat-formatted needle prompt's token ids to a file; → (path, expected answer)."""
    import tempfile

    from kvpolicy.eval.haystack import needle_sample
    from kvpolicy.hf.generation import encode
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    needle = needle_sample(tokenizer, args.needle, args.depth, seed=0)
    ids = encode(tokenizer, needle.context + "\n" + needle.question)[0].tolist()
    handle, path = tempfile.mkstemp(suffix=".json")
    with os.fdopen(handle, "w", encoding="utf-8") as f:
        json.dump([ids], f)
    print(f"needle prompt: {len(ids):,} tokens, needle at depth {args.depth:g}; the answer is "
          f"{needle.answer}")
    return path, needle.answer


def sealing_length(artifact: str, block_size: int) -> int:
    """A prompt length (tokens) at which the artifact's policy seals at least four blocks."""
    from kvpolicy.compiler.artifact import verify
    from kvpolicy.lang.ir import policy_from_json
    policy = policy_from_json(verify(artifact)["policy"]["ir"])
    return max(1000, policy.sinks + policy.window + 4 * block_size + 200)


def run_in_subprocess(artifact: str | None, args) -> dict:
    env = dict(os.environ)
    env.pop("KVPOLICY_ARTIFACT", None)
    if artifact:
        env["KVPOLICY_ARTIFACT"] = artifact
    command = [sys.executable, __file__, "--worker", "--model", args.model,
               "--kv-bytes", str(args.kv_bytes), "--max-tokens", str(args.max_tokens),
               "--block-size", str(args.block_size), "--dtype", args.dtype,
               "--max-model-len", str(args.max_model_len)]
    if args.compile:
        command.append("--compile")
    if args.prompts_json:
        command += ["--prompts-json", args.prompts_json]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"vllm_offline: the {'policy' if artifact else 'baseline'} run failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--kv-bytes", type=int, default=64 << 20)
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
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        from kvpolicy.hf.model import default_model_dir
        args.model = str(default_model_dir())
    if args.worker:
        print(json.dumps(engine_run(args)))
        return
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
        args.prompts_json, answer = needle_prompt(args)
    baseline = run_in_subprocess(None, args)
    policy = run_in_subprocess(artifact, args)
    if answer is None:
        for prompt, text in zip(PROMPTS, policy["outputs"]):
            print(f"{prompt!r} -> {text!r}")
    else:
        for name, run in (("baseline", baseline), (artifact, policy)):
            text = run["outputs"][0]
            found = "found" if answer in text else "NOT found"
            print(f"{name}: {text!r} (needle {found})")
    sealed = policy["sealed_blocks_per_layer"]
    print(f"blocks sealed into packed pages (per layer, all requests): "
          f"{max(sealed) if sealed else 0}")
    ratio = policy["capacity_tokens"] / baseline["capacity_tokens"]
    print(f"\nvLLM KV capacity in {args.kv_bytes:,} bytes (measured, as vLLM reports it): "
          f"baseline {baseline['capacity_tokens']:,} tokens, {artifact} "
          f"{policy['capacity_tokens']:,} tokens ({ratio:.2f}x)")


if __name__ == "__main__":
    main()

"""Baseline of `pg2 bench decode`: greedy decoding with transformers' PaliGemma `generate`
(eager attention, so Gemma 2's soft-caps apply as in pg2; its default KV cache) on the
checkpoint and prompts pg2 wrote.

Usage: python3 decode_baseline.py DIR SETTINGS_JSON
DIR holds config.json, model.safetensors and inputs.safetensors; SETTINGS_JSON gives
new_tokens, runs, threads, device and eos_id (an id the model never generates, so every
run makes exactly new_tokens tokens). Prints one JSON object: tokens_per_s, first_token_ms
(a one-token run: vision tower and prefill), later_tokens_per_s, peak_rss_mb and the last
run's generated tokens.
"""
import json
import resource
import sys
import time

import torch
from safetensors.torch import load_file
from transformers import PaliGemmaForConditionalGeneration


def main():
    folder, settings = sys.argv[1], json.loads(sys.argv[2])
    torch.set_num_threads(settings["threads"])
    device = torch.device(settings["device"])
    model = PaliGemmaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    model.to(device).eval()
    # token_type_ids (all 0) make the prompt bidirectional, as the processor's output does.
    prompts = {k: v.to(device) for k, v in load_file(f"{folder}/inputs.safetensors").items()}
    new_tokens = settings["new_tokens"]

    def run(max_new_tokens):
        with torch.inference_mode():
            out = model.generate(**prompts, do_sample=False, max_new_tokens=max_new_tokens,
                                 eos_token_id=settings["eos_id"], pad_token_id=0)
        return out[:, prompts["input_ids"].shape[1]:].tolist()  # waits for the device

    def timed(max_new_tokens):
        """Seconds per run after one warm-up run, and the last run's tokens."""
        tokens = run(max_new_tokens)
        start = time.perf_counter()
        for _ in range(settings["runs"]):
            tokens = run(max_new_tokens)
        return (time.perf_counter() - start) / settings["runs"], tokens

    first_s, _ = timed(1)
    total_s, tokens = timed(new_tokens)
    generated = sum(len(t) for t in tokens)
    # As pg2's side: the tokens after the first over the time beyond a one-token run.
    later = len(tokens) * (new_tokens - 1) / (total_s - first_s) if new_tokens > 1 and total_s > first_s else None
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    print(json.dumps({"tokens_per_s": generated / total_s, "first_token_ms": first_s * 1e3,
                      "later_tokens_per_s": later, "peak_rss_mb": peak_kb / 1024, "tokens": tokens}))


if __name__ == "__main__":
    main()

"""Baseline of `pg2 bench train`: the same training step with transformers' PaliGemma
(eager attention, so Gemma 2's soft-caps apply as in pg2), gradient clipping to norm 1 and
torch.optim.AdamW (fused),
on the checkpoint and batch pg2 wrote.

Usage: python3 train_baseline.py DIR SETTINGS_JSON
DIR holds config.json, model.safetensors and inputs.safetensors; SETTINGS_JSON gives
steps, threads, device, lr, weight_decay and recompute (gradient checkpointing). Prints one JSON object: steps_per_s,
first_loss (the warm-up step's, on the initial weights), last_loss, peak_rss_mb.
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
    model.to(device).train()
    if settings["recompute"]:
        model.gradient_checkpointing_enable()
    batch = {k: v.to(device) for k, v in load_file(f"{folder}/inputs.safetensors").items()}
    # The loss covers the target tokens (token type 1), as the processor's labels do.
    labels = batch["input_ids"].masked_fill(batch["token_type_ids"] == 0, -100)
    # Weight decay where pg2 applies it: kernels (the patch-embedding convolution too), not
    # embeddings, norms or biases.
    def is_kernel(name, p):
        return p.dim() > 1 and ("embed" not in name or name.endswith("patch_embedding.weight"))

    decayed = [p for n, p in model.named_parameters() if is_kernel(n, p)]
    others = [p for n, p in model.named_parameters() if not is_kernel(n, p)]
    optimizer = torch.optim.AdamW(
        [{"params": decayed, "weight_decay": settings["weight_decay"]}, {"params": others, "weight_decay": 0.0}],
        lr=settings["lr"], betas=(0.9, 0.999), eps=1e-8,
        fused=True,  # torch's fastest AdamW on the CPU and on CUDA (one kernel per tensor)
    )

    def step():
        loss = model(**batch, labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()  # waits for the device, as pg2 reading its loss

    first = step()
    start = time.perf_counter()
    last = first
    for _ in range(settings["steps"]):
        last = step()
    elapsed = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    print(json.dumps({"steps_per_s": settings["steps"] / elapsed, "first_loss": first, "last_loss": last,
                      "peak_rss_mb": peak_kb / 1024}))


if __name__ == "__main__":
    main()

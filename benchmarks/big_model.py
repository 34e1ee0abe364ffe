"""A 1.1 B-parameter model on this machine: peak memory and the two-stage checkup's time.

Builds, once, a randomly initialised Llama with TinyLlama-1.1B's shape (22 blocks, hidden 2048,
MLP 5632, 32 heads / 4 KV heads, untied head) and the sample's tokenizer (vocabulary 49,152, so
1.16 B parameters), saved as a float32 safetensors folder in the user cache. Then, in a fresh
process: load it, reset the peak-memory counter, run the two-stage linear-scope checkup of
int4-g32-asym on 1024 evaluation tokens (knowledge probes on bleeding probes, the default), and
print the wall time and the peak resident memory against the model's float32 size. Random
weights make the figures about cost, not about quality.
Usage: python benchmarks/big_model.py [--tokens 1024] [--modify int4-g32-asym]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False)


def model_folder() -> Path:
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("modeldoctor")) / "models" / "random-llama-1.1b"


def build(folder: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from modeldoctor.model.sample import ensure_sample

    tokenizer = AutoTokenizer.from_pretrained(ensure_sample(lambda m: print(m, file=sys.stderr)))
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **SHAPE)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(args) -> None:
    from modeldoctor.checkup.plan import CheckupPlan
    from modeldoctor.checkup.run import checkup
    from modeldoctor.data import DataSpec
    from modeldoctor.session import Session

    began = time.perf_counter()
    session = Session.open(model_folder())
    load_s = time.perf_counter() - began
    fp32_bytes = session.summary.parameters * 4
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on: the checkup's, not the load's
    began = time.perf_counter()
    report = checkup(session, CheckupPlan(modifications=[args.modify], scope="linears"),
                     session.data(DataSpec(tokens=args.tokens, seq_len=256)))
    wall = time.perf_counter() - began
    peak = peak_rss_bytes()
    measured = sum(not p.estimated for p in report.probes)
    print(f"random Llama, TinyLlama-1.1B's shape, {session.summary.parameters / 1e9:.2f} B parameters "
          f"({fp32_bytes / 2**30:.2f} GiB in float32); loaded in {load_s:.0f} s")
    print(f"two-stage linear checkup of {args.modify} on {args.tokens} tokens: {wall:.0f} s wall "
          f"({wall / 60:.1f} min; target <= 15 min), {len(report.probes)} probes, {measured} measured exactly")
    for line in report.findings.get("estimate", {}).items():
        print(f"  {line[0]}: {line[1]}")
    print(f"peak resident memory during the checkup: {peak / 2**30:.2f} GiB = {peak / fp32_bytes:.2f}x the float32 "
          "size (target <= 1.4x)")
    per_probe = [p.seconds for p in report.probes if not p.estimated and p.seconds > 0]
    if per_probe:
        print(f"exact probes: {sum(per_probe) / len(per_probe):.1f} s each on average "
              f"(from {min(per_probe):.1f} to {max(per_probe):.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--modify", default="int4-g32-asym")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # the fresh process
    args = parser.parse_args()
    if args.measure:
        measure(args)
        return
    folder = model_folder()
    if not (folder / "config.json").exists():
        began = time.perf_counter()
        build(folder)
        print(f"[built {folder} in {time.perf_counter() - began:.0f} s]", file=sys.stderr)
    subprocess.run([sys.executable, __file__, "--measure", "--tokens", str(args.tokens), "--modify", args.modify],
                   check=True)


if __name__ == "__main__":
    main()

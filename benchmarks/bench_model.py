"""Forward and forward+backward throughput of nanoseek's model against transformers' on the same
weights and batch, in one run, with the ratio. Both in fp32 (the compute dtype on this CPU).

    python benchmarks/bench_model.py --preset small --batch 8 --seq 256 --repeats 5

Prints the median tokens/s of each side and nanoseek / transformers. The machine is shared and
noisy: the runs interleave the two models so drift hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

import nanoseek
from nanoseek.checkpoint.hf import save_pretrained


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    cfg = nanoseek.get_preset(args.preset, num_nextn_predict_layers=0)
    torch.manual_seed(0)
    ours = nanoseek.Transformer(cfg)
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(ours, d)
        theirs = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
    inputs, labels = x[:, :-1], x[:, 1:]
    n_tokens = inputs.numel()

    def fwd_ours():
        with torch.no_grad():
            ours(inputs)

    def fwd_theirs():
        with torch.no_grad():
            theirs(inputs)

    def train_ours():
        F.cross_entropy(ours(inputs).flatten(0, 1), labels.flatten()).backward()

    def train_theirs():
        F.cross_entropy(theirs(inputs).logits.flatten(0, 1), labels.flatten()).backward()

    print(f"preset {args.preset}, batch {args.batch} x {args.seq} tokens, {torch.get_num_threads()} threads, fp32")
    print(f"{'':22}{'nanoseek tok/s':>16}{'transformers tok/s':>20}{'ratio':>8}")
    for label, a, b, mode in (("forward", fwd_ours, fwd_theirs, "eval"), ("forward+backward", train_ours, train_theirs, "train")):
        for m in (ours, theirs):
            m.train(mode == "train")
        a(), b()  # warm-up
        ta, tb = [], []
        for _ in range(args.repeats):
            ta.append(timed(a))
            tb.append(timed(b))
            ours.zero_grad(set_to_none=True), theirs.zero_grad(set_to_none=True)
        ra, rb = n_tokens / statistics.median(ta), n_tokens / statistics.median(tb)
        print(f"{label:22}{ra:16.0f}{rb:20.0f}{ra / rb:7.2f}x")


if __name__ == "__main__":
    main()

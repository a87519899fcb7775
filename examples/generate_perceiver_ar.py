"""Generate with a Perceiver AR (krasserm perceiver-io's CausalSequenceModel) on the CPU.

    python examples/generate_perceiver_ar.py --prompt 16384 --new-tokens 32

A model of random weights (the benchmark's: 8 latent layers of 512 channels, 512 latents) takes a
batch of two prompts, the second left-padded, and samples new tokens with
perceiver_fast.generation.generate over its preallocated cache. It prints the time per new token
and checks that a second run with the same seed gives the same tokens.
"""

from __future__ import annotations

import argparse
import time

import torch
from perceiver.model.core import CausalSequenceModel, CausalSequenceModelConfig

import perceiver_fast as pf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=4096, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--latents", type=int, default=512, help="max_latents, and the prompt's latents")
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8, help="latent self-attention layers")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = CausalSequenceModelConfig(max_seq_len=args.prompt + args.new_tokens, max_latents=args.latents,
                                       num_channels=args.channels, num_self_attention_layers=args.layers,
                                       cross_attention_dropout=0.0)
    model = CausalSequenceModel(config).eval()
    prompt = torch.randint(0, config.vocab_size, (2, args.prompt))
    pad_mask = torch.zeros(2, args.prompt, dtype=torch.bool)
    pad_mask[1, : args.prompt // 4] = True  # the second prompt is a quarter shorter, padded on the left

    def sample():
        return pf.generation.generate(model, prompt, max_new_tokens=args.new_tokens, num_latents=args.latents,
                                      pad_mask=pad_mask, do_sample=True, top_k=50, top_p=0.95,
                                      generator=torch.Generator().manual_seed(1))

    start = time.perf_counter()
    tokens = sample()
    seconds = time.perf_counter() - start
    assert tokens.shape == (2, args.prompt + args.new_tokens)
    assert torch.equal(sample(), tokens), "the same seed must give the same tokens"
    print(f"{args.new_tokens} new tokens for 2 prompts of {args.prompt} tokens in {seconds:.2f} s (prompt "
          f"forward included); new tokens of row 0: {tokens[0, args.prompt:].tolist()}")


if __name__ == "__main__":
    main()

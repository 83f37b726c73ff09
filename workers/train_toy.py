"""Train the bundled `toy-2l` model: a 2-layer attention-only HookedTransformer with induction heads.

    python -m workers.train_toy --out workers/toy_2l          # 2000 steps, ~8 min on 2 CPU cores

Training data (BOS + 63 tokens per sequence, from `--seed`):
  * 3/4 of sequences tile a random segment of 4..31 tokens (repeated text teaches induction);
  * 1/4 are random tokens with six (A, B) pairs copied to later positions (the seed post's AB...AB).
Tokens come from a skewed distribution (half uniform, half Zipf(1) over a seeded permutation of
ids 4..2047), so tokens are seen at very different rates, as in real text: this is what makes
per-token A and B powers differ.

The model uses LNPre (LayerNorm without weights) and keeps W_pos centred during training, so that
TransformerLens' default processing, applied on loading like `from_pretrained` does, is exact for
it: with shortformer positions (added to the query/key inputs *after* the LayerNorm), folding LN
weights into W_Q/W_K and centring W_pos both change the function (seen here with TL 3.9: a trained
LN model's loss went from 3.9 to 7.1 nats after processing). The script checks this at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from jaxtyping import Float, Int
from safetensors.torch import save_file
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig

FIRST_TOKEN, BOS = 4, 1
CONFIG = dict(
    n_layers=2, d_model=128, n_heads=4, d_head=32, d_vocab=2048, n_ctx=64,
    attn_only=True, act_fn=None, normalization_type="LNPre",
    positional_embedding_type="shortformer", default_prepend_bos=False,
)


def token_distribution(d_vocab: int, gen: torch.Generator, uniform_share: float = 0.5) -> Float[Tensor, " vocab"]:
    """Half uniform, half Zipf(1) over a random order of the ordinary ids (0..3 never drawn)."""
    n = d_vocab - FIRST_TOKEN
    zipf = 1.0 / torch.arange(1, n + 1, dtype=torch.float64)
    zipf = zipf[torch.randperm(n, generator=gen)] / zipf.sum()
    probs = torch.zeros(d_vocab, dtype=torch.float64)
    probs[FIRST_TOKEN:] = uniform_share / n + (1 - uniform_share) * zipf
    return probs.float()


def training_batch(probs: Float[Tensor, " vocab"], batch: int, n_ctx: int, gen: torch.Generator) -> Int[Tensor, "batch n_ctx"]:
    body = n_ctx - 1
    tokens = torch.multinomial(probs, batch * body, replacement=True, generator=gen).view(batch, body)
    n_repeat = batch * 3 // 4
    for i in range(n_repeat):  # tile a random segment
        seg = int(torch.randint(4, 32, (1,), generator=gen))
        tokens[i] = tokens[i, :seg].repeat(math.ceil(body / seg))[:body]
    for i in range(n_repeat, batch):  # six (A, B) pairs copied to later positions
        src = torch.randint(0, body // 2 - 1, (6,), generator=gen)
        dst = torch.randint(body // 2, body - 1, (6,), generator=gen)
        for s, d in zip(src.tolist(), dst.tolist()):
            tokens[i, d : d + 2] = tokens[i, s : s + 2]
    return torch.cat([torch.full((batch, 1), BOS), tokens], dim=1)


def train(out: Path, steps: int, seed: int, batch: int = 64, lr: float = 3e-3) -> None:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    cfg = HookedTransformerConfig(**CONFIG, seed=seed)
    model = HookedTransformer(cfg)
    probs = token_distribution(cfg.d_vocab, gen)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    start, smoothed = time.time(), None
    for step in range(1, steps + 1):
        tokens = training_batch(probs, batch, cfg.n_ctx, gen)
        loss = model(tokens, return_type="loss")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():  # keep W_pos centred: see the module docstring
            model.pos_embed.W_pos -= model.pos_embed.W_pos.mean(-1, keepdim=True)
        smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
        if step % 250 == 0 or step == steps:
            print(f"step {step:5d}  loss {smoothed:.3f}  {time.time() - start:.0f}s", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    config = {k: v for k, v in CONFIG.items()}
    config.update(seed=seed, model_name="toy-2l", induction_sweep={
        "training": dict(steps=steps, batch=batch, lr=lr, uniform_share=0.5, zipf_exponent=1.0)})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    check_processing_is_exact(model, out, probs, gen)
    print(f"saved {out} after {time.time() - start:.0f}s")


@torch.no_grad()
def check_processing_is_exact(model: HookedTransformer, out: Path, probs: Tensor, gen: torch.Generator) -> None:
    from workers.model.hooked import load_model

    tokens = training_batch(probs, 16, model.cfg.n_ctx, gen)
    model.eval()
    loaded = load_model(str(out), "cpu")
    diff = (model(tokens).log_softmax(-1) - loaded(tokens).log_softmax(-1)).abs().max().item()
    print(f"trained vs loaded (processed) log-probs: max |diff| {diff:.1e}")
    assert diff < 1e-3, "default processing changed the model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "toy_2l")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train(args.out, args.steps, args.seed)


if __name__ == "__main__":
    main()

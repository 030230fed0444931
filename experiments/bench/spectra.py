"""Benchmark: batched ``compute_spectra`` vs a Python loop over (layer, head) computing the same metrics.

    python -m experiments.bench.spectra [--tokens 4096] [--sequences 1] [--device cpu] [--repeat 3]

Uses random tensors with the default model's geometry (30 layers, 3 KV heads, 9 query heads,
head_dim 64); singular-value timings do not depend on the data. Prints a markdown table row.
"""

from __future__ import annotations

import time

import torch

from analysis.spectra.compute import DEFAULT_KINDS, compute_spectra, spectrum_metrics
from experiments.common import new_parser


class RandomCapture:
    """Capture-shaped random tensors: get(layer, kind) -> (B, H, T, D)."""

    def __init__(self, layers=30, kv_heads=3, heads=9, tokens=4096, head_dim=64, sequences=1, device="cpu"):
        g = torch.Generator(device=device).manual_seed(0)
        self.layers, self.kinds = list(range(layers)), list(DEFAULT_KINDS)
        self.meta = {"model": "random", "config": {"num_layers": layers, "num_heads": heads,
                                                   "num_kv_heads": kv_heads, "head_dim": head_dim}}
        self.tensors = {(l, k): torch.randn(sequences, heads if k == "query_post_rope" else kv_heads, tokens,
                                            head_dim, generator=g, device=device)
                        for l in self.layers for k in self.kinds}

    def get(self, layer, kind):
        return self.tensors[(layer, kind)]


def loop_spectra(capture, kinds=DEFAULT_KINDS) -> dict:
    """Reference: one svdvals call per (layer, head, kind) over that head's (B, T, D) batch."""
    out = {}
    for kind in kinds:
        for layer in capture.layers:
            x = capture.get(layer, kind)  # (B, H, T, D)
            for h in range(x.shape[1]):
                s = torch.linalg.svdvals(x[:, h])  # (B, D)
                out[(layer, h, kind)] = {k: v.cpu() for k, v in spectrum_metrics(s).items()}
    return out


def svd_batched(capture, kinds=DEFAULT_KINDS) -> None:
    """The plain alternative: one batched svdvals per kind over the stacked (L, H, B, T, D) tensors."""
    for kind in kinds:
        x = torch.stack([capture.get(layer, kind) for layer in capture.layers]).transpose(1, 2)  # (L, H, B, T, D)
        spectrum_metrics(torch.linalg.svdvals(x))


def best_of(fn, repeat: int, device: str) -> float:
    times = []
    for _ in range(repeat):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None) -> int:
    p = new_parser("bench.spectra", __doc__.split("\n\n")[0], raw=False)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--sequences", type=int, default=1, help="sequences (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=3, help="best of N runs (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cap = RandomCapture(tokens=args.tokens, sequences=args.sequences, device=args.device)
    ref = loop_spectra(cap)  # warm-up, and the values to compare against
    res = compute_spectra(cap)
    worst = max(abs(r.rank_90_mean - float(ref[(r.layer, r.head, r.kind)]["rank_90_mean"])) for r in res.heads)
    assert worst == 0, f"batched and loop ranks differ by {worst}"
    t_batch = best_of(lambda: compute_spectra(cap), args.repeat, args.device)
    t_loop = best_of(lambda: loop_spectra(cap), args.repeat, args.device)
    t_svd = best_of(lambda: svd_batched(cap), args.repeat, args.device)
    matrices = len(res.heads) * args.sequences
    print("| device | threads | shape (L x H_kv/H_q x B x T x d) | matrices | compute_spectra (Gram) s "
          "| batched svdvals s | per-head svdvals loop s | loop / compute_spectra |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {args.device} | {torch.get_num_threads()} | 30 x 3/9 x {args.sequences} x {args.tokens} x 64 "
          f"| {matrices} "
          f"| {t_batch:.3f} | {t_svd:.3f} | {t_loop:.3f} | {t_loop / t_batch:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

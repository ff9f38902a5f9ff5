"""One forward and backward of the CUDA op on each kind of input the tensor-core kernels take
(the fused ones: padded right / left, packed with a sequence past their limit, D = 16 .. 128,
G = 1 .. 8 (3, 5, 6, 7: M tiles with idle rows), causal and not, with the sink; the long sequences' forward and dk/dv, the selection
on tensor cores, the one-CTA backward of short sequences): a short driver for compute-sanitizer,
which checks memory accesses and races, not values (python_tests/test_ops_cuda.py checks those).

    compute-sanitizer --tool memcheck python benchmarks/fused_smoke.py
"""
import torch

import blossomrec_cuda

CASES = [  # lengths, N (None: packed), H, KVH, D, causal, select_block
    ([50, 17, 0, 1], 50, 8, 2, 16, True, 16),
    ([200, 33], 200, 8, 1, 64, False, 8),
    ([97, 96, 1], None, 4, 4, 32, True, 16),
    ([1100, 40, 255], None, 6, 2, 64, False, 16),
    ([130, 64], 130, 2, 2, 128, True, 16),
    ([1000, 700], 1000, 8, 2, 16, True, 16),  # D = 16: fused forward and dq over two segments
    ([700, 650], 700, 4, 4, 64, True, 16),  # G = 1: segments sized net of the staged row state
    # M tiles of P = 16 / G positions x G heads with idle rows (G = 3, 5, 6, 7): the forward,
    # dq and dk/dv kernels' row layouts and the dk/dv warps' M-tile lists past 100 tokens
    ([400, 150], 400, 3, 1, 64, True, 16),
    ([300, 121], 300, 5, 1, 64, True, 16),
    ([130, 99], 130, 12, 2, 32, True, 8),
    ([257, 100], 257, 7, 1, 16, False, 16),
    # Past 1024 tokens: the tensor-core dk/dv of long sequences (an empty sequence's padding
    # zeroed there), the tensor-core selection at D = 128 with the sink
    ([1300, 200, 0], 1300, 8, 2, 16, True, 16),
    ([2100, 5], 2100, 4, 1, 128, False, 8),
    ([1100, 3], 1100, 6, 2, 32, False, 16),  # D = 32: the long forward and dq
    # The one-CTA backward of sequences within 64 tokens: G = 8, the sink, power-of-two blocks
    ([64, 33, 1], None, 8, 1, 16, False, 8),
    ([48, 5], 48, 6, 2, 32, True, 16),
]


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    for lengths, N, H, KVH, D, causal, b in CASES:
        packed = N is None
        rows = sum(lengths) + 3 if packed else max(lengths)
        lead = (rows,) if packed else (len(lengths), rows)

        def rnd(*shape):
            return torch.randn(*lead, *shape, device="cuda", generator=g,
                               dtype=torch.bfloat16).requires_grad_()

        q, k, v = rnd(H, D), rnd(KVH, D), rnd(KVH, D)
        gates = torch.rand(*lead, H, 2, device="cuda", generator=g).requires_grad_()
        kc = torch.randn(len(lengths), max(lengths) // 4 + 1, KVH, D, device="cuda",
                         generator=g, dtype=torch.bfloat16)
        kw = dict(compress_stride=4, select_block=b, num_select=4, causal=causal)
        if packed:
            cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), device="cuda")
            outs = [blossomrec_cuda.blossom_attention(q, k, v, kc, gates, cu_seqlens=cu, **kw)]
        else:
            outs = [blossomrec_cuda.blossom_attention(q, k, v, kc, gates, lengths=lengths,
                                                      padding_side=side, **kw)
                    for side in ("right", "left")]
        for out in outs:
            out.float().square().sum().backward()
    torch.cuda.synchronize()
    print("fused_smoke: done")


if __name__ == "__main__":
    main()

"""How many keys a 16-row query tile of the tensor-core forward reads, against the rows' own key
sets, for the benchmark's random inputs (CPU select_blocks op, same hyper-parameters as
benchmarks/bench_attention.py). Archived with its output (tile_union.txt): the numbers behind
docs/PERF_NOTES.md v6."""
import math

import torch

import blossomrec_cuda  # noqa: F401  (registers torch.ops.blossomrec)

H, KVH, D, S, BLK, NSEL, W = 8, 2, 16, 16, 16, 4, 8


def stis_keys_row(i):
    return min(i + 1, W) + sum(1 for k in range(3, 31) if (1 << k) <= i and (1 << k) >= W)


def stis_slots_tile(i0, L):
    near_lo = max(0, i0 - max(W - 1, 16))
    near = min(i0 + 16, L) - near_lo
    far = sum(min(16, near_lo - (i0 - d)) for d in (1 << k for k in range(5, 31))
              if d <= i0 and near_lo - (i0 - d) > 0)
    return near + far


for name, B, N in (("S2", 8, 200), ("S3", 4, 1024), ("S4", 2, 4096), ("S6", 1, 65536)):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, N, H, D, generator=g).to(torch.bfloat16)
    kc = torch.randn(B, N // S, KVH, D, generator=g).to(torch.bfloat16)
    st = torch.zeros(B, dtype=torch.int32)
    ln = torch.full((B,), N, dtype=torch.int32)
    idx, cnt = torch.ops.blossomrec.select_blocks(q, kc, st, ln, S, BLK, NSEL, True, D ** -0.5)
    tiles = rows_sel = tile_sel = rows_stis = tile_stis = 0
    unions = []
    for b in range(B):
        for g_ in range(KVH):
            for i0 in range(0, N, 16):
                rows = range(i0, min(i0 + 16, N))
                blocks = set()
                for i in rows:
                    c = int(cnt[b, i, g_])
                    blocks.update(int(j) for j in idx[b, i, g_, :c])
                    rows_sel += (i - (i // BLK) * BLK + 1) + c * BLK
                    rows_stis += stis_keys_row(i)
                unions.append(len(blocks))
                tile_sel += (min(i0 + 16, N) - (i0 // BLK) * BLK) + len(blocks) * BLK
                tile_stis += stis_slots_tile(i0, N)
                tiles += 1
    # MMA work of a tile: 16 rows x its slots; row-kernel work: each row's own keys
    print(f"{name} (B={B}, N={N}): mean union {sum(unions) / tiles:.1f} blocks per tile "
          f"(max {max(unions)}); selected branch: {tile_sel / tiles:.0f} slots per tile vs "
          f"{rows_sel / tiles / 16:.0f} keys per row -> tile reads {tile_sel * 16 / rows_sel:.1f}x "
          f"the (row, key) pairs; STIS: {tile_stis / tiles:.0f} slots vs {rows_stis / tiles / 16:.1f}"
          f" keys per row -> {tile_stis * 16 / rows_stis:.1f}x")

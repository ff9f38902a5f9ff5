import torch, sys
import blossomrec_cuda as br
from torch.profiler import profile, ProfilerActivity
H,KVH=8,2
for name,B,N,D in [("S1",2048,50,16),("S4",16,4096,16),("S5",4,16384,16)]:
    q=torch.randn(B,N,H,D,device='cuda',dtype=torch.bfloat16,requires_grad=True)
    k=torch.randn(B,N,KVH,D,device='cuda',dtype=torch.bfloat16,requires_grad=True)
    v=torch.randn(B,N,KVH,D,device='cuda',dtype=torch.bfloat16,requires_grad=True)
    kc=torch.randn(B,N//16,KVH,D,device='cuda',dtype=torch.bfloat16)
    g=torch.rand(B,N,H,2,device='cuda',dtype=torch.bfloat16,requires_grad=True)
    do=torch.randn(B,N,H,D,device='cuda',dtype=torch.bfloat16)
    for _ in range(3): br.blossom_attention(q,k,v,kc,g).backward(do)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5): br.blossom_attention(q,k,v,kc,g).backward(do)
        torch.cuda.synchronize()
    print("=====", name)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))

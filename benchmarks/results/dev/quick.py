import torch, time, torch.nn.functional as F
import blossomrec_cuda as br
from triton.testing import do_bench
torch.manual_seed(0)
shapes=[("S1",2048,50),("S2",512,200),("S3",64,1024),("S4",16,4096),("S5",4,16384),("S6",1,65536)]
H,KVH=8,2
for D in (16,64):
  for name,B,N in shapes:
    q=torch.randn(B,N,H,D,device='cuda',dtype=torch.bfloat16,requires_grad=True)
    k=torch.randn(B,N,KVH,D,device='cuda',dtype=torch.bfloat16,requires_grad=True)
    v=torch.randn(B,N,KVH,D,device='cuda',dtype=torch.bfloat16,requires_grad=True)
    kc=torch.randn(B,N//16,KVH,D,device='cuda',dtype=torch.bfloat16)
    g=torch.rand(B,N,H,2,device='cuda',dtype=torch.bfloat16,requires_grad=True)
    do=torch.randn(B,N,H,D,device='cuda',dtype=torch.bfloat16)
    def ours():
      o=br.blossom_attention(q,k,v,kc,g); o.backward(do)
    def ours_f():
      with torch.no_grad(): br.blossom_attention(q,k,v,kc,g)
    def sel():
      br.select_blocks(q.detach(),kc)
    qt=q.detach().transpose(1,2).contiguous().requires_grad_(); kt=k.detach().transpose(1,2).contiguous().requires_grad_(); vt=v.detach().transpose(1,2).contiguous().requires_grad_(); dot=do.transpose(1,2).contiguous()
    def sdpa():
      o=F.scaled_dot_product_attention(qt,kt,vt,is_causal=True,enable_gqa=True); o.backward(dot)
    res=[]
    for f in (ours,ours_f,sel,sdpa):
      try: res.append(do_bench(f,warmup=25,rep=100,return_mode='median'))
      except Exception as e: res.append(float('nan')); print(name, f.__name__, 'ERR', str(e)[:100])
    print(f"D={D} {name} ours_fwdbwd={res[0]:.3f} ours_fwd={res[1]:.3f} select={res[2]:.3f} sdpa_fwdbwd={res[3]:.3f} ratio={res[0]/res[3]:.3f}", flush=True)
    del q,k,v,kc,g,do,qt,kt,vt,dot; torch.cuda.empty_cache()

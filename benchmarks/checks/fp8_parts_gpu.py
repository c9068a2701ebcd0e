"""GPU check: fp8 storage streamed by parts gives exactly the output of fp8 streamed by blocks (fused
Triton decode on), on a full-width FLUX transformer with few blocks. Prints one line per case."""
import json
import os
import time

import torch
from diffusers import FluxTransformer2DModel

from vramkit.engine import enable_block_streaming

torch.manual_seed(0)
m = FluxTransformer2DModel(num_layers=3, num_single_layers=6, guidance_embeds=True).to("cuda", torch.bfloat16)
img, txt = 4096, 512
inp = dict(hidden_states=torch.randn(1, img, 64, device="cuda", dtype=torch.bfloat16),
           encoder_hidden_states=torch.randn(1, txt, 4096, device="cuda", dtype=torch.bfloat16),
           pooled_projections=torch.randn(1, 768, device="cuda", dtype=torch.bfloat16),
           timestep=torch.tensor([0.5], device="cuda"), guidance=torch.tensor([3.5], device="cuda"),
           img_ids=torch.zeros(img, 3, device="cuda"), txt_ids=torch.zeros(txt, 3, device="cuda"), return_dict=False)

def run(n=5):
    with torch.no_grad():
        out = m(**inp)[0]
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            m(**inp)
        torch.cuda.synchronize()
    return out.float().cpu(), (time.perf_counter() - t) / n

ref, t_ref = run()
res = {"resident_s": t_ref}
outs = {}
for unit, resident in (("block", 2), ("part", 8), ("part", 0), ("block", 0)):
    s = enable_block_streaming(m, resident=resident, storage="fp8", unit=unit)
    o, t = run()
    s.restore()
    outs[(unit, resident)] = o
    err = (o - ref).abs().max().item()
    res[f"{unit}_{resident}"] = {"s": t, "max_err_vs_bf16": err}
    print(unit, resident, f"{t*1e3:.1f} ms", "max|err| vs bf16", err, flush=True)
print("resident bf16", f"{t_ref*1e3:.1f} ms")
same = torch.equal(outs[("part", 0)], outs[("block", 0)])
print("fp8 parts == fp8 blocks (all streamed):", same)
res["parts_equal_blocks"] = same
res["device"] = torch.cuda.get_device_name()
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "fp8_parts_gpu.json"), "w"), indent=1)

"""QINSCache on CUDA against the CPU: the same layer inputs must give the same packed codes and
the same decoded K/V at every width, with and without a key plan, and a tiny random Llama
must generate through the cache on the GPU (residual 1000: identical to DynamicCache).

    PYTHONPATH=src python3 benchmarks/gpu/kv_cuda_check.py   # on a CUDA machine, from the repo root

Writes $OUT/gpu_kv_check.json (benchmarks/results/kv_cuda_check.json holds a copy with the
date, card and transformers version) and prints a table.
"""
import json
import os

import torch

from qins.kv.cache import QINSCache
from qins.kv.config import KVConfig
from qins.kv.layer import QINSLayer
from qins.kv.plan import MENU, allocate_widths

assert torch.cuda.is_available()
rows = []
cfg = KVConfig()
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 3, 700, 64, generator=g) * 2 + 0.3
y = torch.randn(2, 3, 1, 64, generator=g)
for bits in (2, 3, 4, 5, 6, 8):
    for plan in (False, True):
        if plan and bits == 8:
            continue
        widths = None
        if plan:
            cost = torch.rand(64, 1, generator=g, dtype=torch.float64) * 4.0 ** -torch.tensor(MENU, dtype=torch.float64).view(1, -1)
            widths = torch.tensor([allocate_widths(cost, bits) for _ in range(3)])
        kw = dict(residual=0, sink=1, group=cfg.group_for(bits), k_zero=cfg.zero_for(bits, "k"),
                  k_curvature=0.0, v_curvature=cfg.curvature_for(bits, "v"), k_widths=widths)
        outs = {}
        for dev in ("cpu", "cuda"):
            L = QINSLayer(bits, bits, **kw)
            L.update(x.to(dev), x.flip(2).to(dev))
            k, v = L.update(y.to(dev), y.to(dev))
            outs[dev] = (k.cpu(), v.cpu(), L.planes()[0].cpu(), L.planes()[3].cpu())
        kc_eq = (outs["cpu"][2] == outs["cuda"][2]).float().mean().item()
        vc_eq = (outs["cpu"][3] == outs["cuda"][3]).float().mean().item()
        dk = (outs["cpu"][0] - outs["cuda"][0]).abs().max().item()
        dv = (outs["cpu"][1] - outs["cuda"][1]).abs().max().item()
        rows.append(dict(bits=bits, plan=plan, k_words_equal=kc_eq, v_words_equal=vc_eq, max_dk=dk, max_dv=dv))
# tiny llama generation on the GPU, plan vs none vs dynamic
from transformers import LlamaConfig, LlamaForCausalLM, DynamicCache
torch.manual_seed(0)
m = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                 num_attention_heads=8, num_key_value_heads=2, initializer_range=0.2)).cuda().eval()
ids = torch.randint(0, 128, (2, 300), device="cuda")
gen = {}
for name, mk in [("dynamic", lambda: DynamicCache(config=m.config)),
                 ("qins-8b-r1000", lambda: QINSCache(m, bits=8, residual=1000)),
                 ("qins-4b-r0", lambda: QINSCache(m, bits=4, residual=0))]:
    with torch.inference_mode():
        out = m.generate(input_ids=ids, max_new_tokens=16, do_sample=False, pad_token_id=0, past_key_values=mk())
    gen[name] = out[:, 300:].cpu()
res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, layer_rows=rows,
           r1000_equals_dynamic=bool(torch.equal(gen["dynamic"], gen["qins-8b-r1000"])),
           r0_4b_match=float((gen["dynamic"] == gen["qins-4b-r0"]).float().mean()))
os.makedirs(os.environ.get("OUT", "/tmp"), exist_ok=True)
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "gpu_kv_check.json"), "w"), indent=1)
print("bits plan k_words_eq v_words_eq max|dk| max|dv|")
for r in rows:
    print(r["bits"], r["plan"], f"{r['k_words_equal']:.6f} {r['v_words_equal']:.6f} {r['max_dk']:.2e} {r['max_dv']:.2e}")
print("r1000 == dynamic:", res["r1000_equals_dynamic"], " 4b r0 match:", res["r0_4b_match"], res["device"])

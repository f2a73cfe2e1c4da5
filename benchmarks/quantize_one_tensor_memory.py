"""Peak RSS of quantizing Phi-3.5-mini's largest tensor (the 32064 x 3072 embedding, 6-bit g128) alone.

    python benchmarks/quantize_one_tensor_memory.py new|old   (old: packing without row chunks)

Prints VmHWM before and after `QuantizedWeight.from_float`; saves the packed codes to
/tmp/qw_{new,old}.pt for comparison.
"""
import sys, torch
import qins.codec.packing as P
if sys.argv[1] == "old":
    P._PACK_CHUNK = 1 << 62
from qins.codec.config import WeightConfig
from qins.codec.tensor import QuantizedWeight
from qins.eval.synthetic_checkpoint import synthetic_tensor
from qins.weights.stream import TensorSpec
w = synthetic_tensor(TensorSpec("model.embed_tokens.weight", torch.bfloat16, (32064, 3072)), 0, 32)
def rss():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024 / 1e9
print("before quantize: VmHWM", round(rss(), 3))
q = QuantizedWeight.from_float(w, WeightConfig("qins", 6, 128))
print(sys.argv[1], "after quantize: VmHWM", round(rss(), 3), "GB", q.qweight.shape)
torch.save(q.qweight, f"/tmp/qw_{sys.argv[1]}.pt")

"""Worker of tests/weights/test_parallel.py: one gloo rank of a 2-process tensor-parallel run.

For each saved QINS directory, the rank loads it with transformers' tensor parallelism
(`from_pretrained(dir, distributed_config=DistributedConfig(tp_plan="auto"))`: transformers
shards the float tensors and installs its hooks, the qins quantizer cuts the QINS buffers)
and writes its logits and QINS byte count to `out_dir/rank{r}_{i}.pt`.
"""
from __future__ import annotations

import os
from datetime import timedelta


def cached_step(model, ids):
    """Logits of one decode step after a prefill into a QINSCache that reads every token back
    from its 4-bit pages (residual 0): the cache's heads follow the rank's attention."""
    import qins

    cache = qins.QINSCache(model, bits=4, residual=0)
    first = model(ids, past_key_values=cache, use_cache=True).logits[:, -1]
    return model(first.argmax(-1, keepdim=True), past_key_values=cache, use_cache=True).logits[:, -1]


def run(rank: int, world: int, port: int, model_dirs: list[str], out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        from transformers import AutoModelForCausalLM
        from transformers.distributed import DistributedConfig

        import qins
        from qins.weights.parallel import stored_bytes

        qins.register_transformers()
        ids = torch.load(os.path.join(out_dir, "ids.pt"))
        for i, d in enumerate(model_dirs):
            model = AutoModelForCausalLM.from_pretrained(
                d, distributed_config=DistributedConfig(tp_plan="auto"), dtype=torch.float32)
            out = {"bytes": stored_bytes(model)}
            with torch.no_grad():
                out["logits"] = model(ids).logits
                out["cached"] = cached_step(model, ids)
            torch.save(out, os.path.join(out_dir, f"rank{rank}_{i}.pt"))
    finally:
        dist.destroy_process_group()

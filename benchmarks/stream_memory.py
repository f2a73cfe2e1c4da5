"""Where the resident memory of `qins compress --stream` goes, phase by phase.

    python benchmarks/stream_memory.py SRC OUT [--shard-gb G] [--bits 4] [--group-size 64]
                                               [--no-embeddings] [--interval 0.05]

Runs `compress_checkpoint(SRC, OUT, ...)` in this process while a thread samples
/proc/self/status every `--interval` seconds: VmRSS and its two parts, RssAnon (heap and
anonymous maps: what the process really holds) and RssFile (file-backed pages of mapped
files, e.g. the safetensors shards `safe_open` maps; the kernel can drop them under pressure,
but `time -v` and VmHWM count them). The phase each sample falls in comes from wrapping the
library's steps (hashing the source, reading a tensor, quantizing it, writing an output
shard, joining the shards). Prints the peak of each quantity per phase and overall, plus
VmHWM, the kernel's own peak of VmRSS.
"""
from __future__ import annotations

import argparse
import json
import threading
import time
from collections import defaultdict

FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")


def status() -> dict[str, int]:
    """Bytes of the FIELDS of /proc/self/status."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in FIELDS:
                out[key] = int(rest.split()[0]) * 1024
    return out


class Sampler(threading.Thread):
    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self.interval, self.phase, self.stop = interval, "setup", False
        self.peak: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.at_peak_rss: dict = {}

    def run(self):
        while not self.stop:
            s = status()
            p = self.peak[self.phase]
            for k, v in s.items():
                p[k] = max(p[k], v)
            if s["VmRSS"] > self.at_peak_rss.get("VmRSS", 0):
                self.at_peak_rss = dict(s, phase=self.phase)
            time.sleep(self.interval)


def wrap(module, name: str, sampler: Sampler, phase: str):
    fn = getattr(module, name)

    def wrapped(*args, **kwargs):
        prev, sampler.phase = sampler.phase, phase
        try:
            return fn(*args, **kwargs)
        finally:
            sampler.phase = prev
    setattr(module, name, wrapped)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--shard-gb", type=float, default=None, help="output shard GiB (default: the library's)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--embeddings", default="6:128", help="BITS:GROUP of embeddings / lm_head")
    ap.add_argument("--no-embeddings", action="store_true")
    ap.add_argument("--interval", type=float, default=0.05)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    import qins.weights.stream as stream
    from qins.codec.config import WeightConfig

    sampler = Sampler(a.interval)
    wrap(stream, "fingerprint", sampler, "hash source")
    wrap(stream.QuantizedWeight, "from_float", sampler, "quantize")
    wrap(stream, "write_safetensors", sampler, "write shard")
    wrap(stream, "_concatenate", sampler, "join shards")
    if hasattr(stream, "TensorReader"):
        wrap(stream.TensorReader, "get", sampler, "read tensor")
    cfg = WeightConfig("qins", a.bits, a.group_size)
    emb = None
    if not a.no_embeddings:
        b, g = a.embeddings.split(":")
        emb = WeightConfig("qins", int(b), int(g))
    kw = {} if a.shard_gb is None else {"shard_bytes": int(a.shard_gb * 2**30)}
    sampler.start()
    t0 = time.perf_counter()
    stream.compress_checkpoint(a.src, a.out, cfg, embeddings=emb, progress=False, **kw)
    wall = time.perf_counter() - t0
    sampler.stop = True
    sampler.join()
    end = status()
    gb = 1e9
    print(f"wall {wall:.1f} s; VmHWM (kernel's peak RSS) {end['VmHWM'] / gb:.3f} GB")
    print(f"{'phase':<14} {'VmRSS':>8} {'RssAnon':>8} {'RssFile':>8}   (peak GB within the phase)")
    for phase, p in sampler.peak.items():
        print(f"{phase:<14} {p['VmRSS'] / gb:8.3f} {p['RssAnon'] / gb:8.3f} {p['RssFile'] / gb:8.3f}")
    s = sampler.at_peak_rss
    print(f"at the sampled VmRSS peak ({s['phase']}): RssAnon {s['RssAnon'] / gb:.3f} GB + "
          f"RssFile {s['RssFile'] / gb:.3f} GB")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"wall_s": wall, "vmhwm": end["VmHWM"], "phases": sampler.peak, "at_peak": s}, f, indent=1)


if __name__ == "__main__":
    main()

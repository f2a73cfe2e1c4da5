"""Phi-3.5-mini end to end on one machine: synthetic checkpoint -> `qins compress --stream` -> load -> generate.

    PYTHONPATH=$PWD/src python benchmarks/gpu/phi35_full.py                # full 32 layers (GPU machine)
    PYTHONPATH=$PWD/src python benchmarks/gpu/phi35_full.py --layers 2 --workdir /tmp/p35   # CPU smoke run

Steps, each in its own child process under a timeout; a failed or timed-out step is recorded
and the next runs where it can, and the JSON is rewritten after every step. Peak RSS is the
child's own VmHWM (`vmhwm`, read in the child at its end; the table shows it), beside
os.wait4's ru_maxrss (`peak_rss_bytes`: the largest of the child and the processes it waited
for, e.g. the compiler of the CPU kernel's first build):

  checkpoint   benchmarks/synthetic_checkpoint.py: Phi-3.5-mini-instruct's exact shapes
               (Phi3ForCausalLM, hidden 3072, fused qkv / gate_up, vocab 32064, untied
               lm_head), random heavy-tailed weights, bf16 in 2 GB shards (reused when the
               workdir already holds one of the same depth)
  compress     `python -m qins.cli compress SRC -o OUT --stream --device DEV [--compress-args]`:
               the library's defaults unless --compress-args adds flags; DEV = cuda when there
               is one (the streamed weights are quantized on it), else cpu. Wall time, bytes
               on disk, bpw all-in, the plan
  load_cuda    qins.load(OUT, device="cuda", dtype=bfloat16) (parameters on the meta device,
               filled from the file: no float weight of a quantized layer is made); peak RSS,
               torch.cuda.max_memory_allocated; 32 greedy tokens from a fixed prompt of token
               ids (qins.metrics.decode.greedy_decode: static cache, CUDA graph when the step
               can be captured, else eager), tokens/s of the timed steps; the kernel routes
               QINSLinear's dispatch chose
  load_cpu     the same on the CPU (float32 compute), 4 tokens; agreement with the GPU's first
               4 tokens and the first position's logits (reported, never a failure: with random
               weights the logits are nearly flat, so bf16 on the GPU and fp32 on the CPU may
               pick different near-tied tokens)

Writes $OUT/phi35_full.json when OUT is set (else --json, else WORKDIR/phi35_full.json) and
prints a table last. Nothing here needs zstandard or constriction. The quality of the
compressed model means nothing (random weights): time, memory and size only.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# fixed prompt: 16 token ids inside Phi-3.5's 32000-token base vocabulary (1 = <s>)
PROMPT = [1] + [(7919 * i) % 31000 + 500 for i in range(1, 16)]
CAPS = {"checkpoint": 240, "compress": 300, "load_cuda": 180, "load_cpu": 180}   # seconds, at most


def tag(a) -> str:
    """Directory name part of the checkpoint's size: 32L, or 2L-h96-v512 when shrunk."""
    return f"{a.layers}L" + (f"-h{a.hidden}" if a.hidden else "") + (f"-v{a.vocab}" if a.vocab else "")


def vm_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * 1024
    return out


# ------------------------------------------------------------------ parent: steps in children

def run_child(cmd: list[str], timeout: float, log: Path) -> dict:
    """Run `cmd` in its own session; kill the session after `timeout` s. rc, wall, peak RSS."""
    t0 = time.perf_counter()
    env = dict(os.environ, TQDM_MININTERVAL="10", PYTHONUNBUFFERED="1")
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=ROOT)
    timed_out = False
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() - t0 > timeout:
            timed_out = True
            os.killpg(p.pid, signal.SIGKILL)
            pid, status, ru = os.wait4(p.pid, 0)
            break
        time.sleep(0.2)
    p.returncode = rc = os.waitstatus_to_exitcode(status)
    tail = log.read_text(errors="replace")[-3000:]
    return {"command": " ".join(shlex.quote(c) for c in cmd), "rc": rc, "timed_out": timed_out,
            "timeout_s": round(timeout, 1), "wall_s": time.perf_counter() - t0,
            "peak_rss_bytes": ru.ru_maxrss * 1024, "ok": rc == 0 and not timed_out,
            **({} if rc == 0 and not timed_out else {"log_tail": tail})}


def tensor_params(ckpt: Path) -> int:
    """Parameters of a safetensors checkpoint directory, from the file headers."""
    n = 0
    for f in sorted(ckpt.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (k,) = struct.unpack("<Q", fh.read(8))
            head = json.loads(fh.read(k))
        for name, e in head.items():
            if name != "__metadata__":
                c = 1
                for s in e["shape"]:
                    c *= s
                n += c
    return n


def plan_summary(out: Path) -> dict:
    """{config label or kind: modules} of a saved qins.json."""
    from qins.codec.config import WeightConfig
    doc = json.loads((out / "qins.json").read_text())
    counts: dict[str, int] = {}
    for e in doc["modules"].values():
        c = e.get("config")
        if c:
            cfg = WeightConfig.from_dict(c)
            label = f"{e['kind']} {cfg.label}" + ("" if cfg.rounding == "gptq" else "-nearest")
        else:
            label = e["kind"]
        counts[label] = counts.get(label, 0) + 1
    return counts


def cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:                                  # noqa: BLE001 - no torch: no CUDA
        return False


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (Phi-3.5-mini: 32)")
    ap.add_argument("--hidden", type=int, default=None, help="shrink the width (tests only; default 3072)")
    ap.add_argument("--vocab", type=int, default=None, help="shrink the vocabulary (tests only; default 32064)")
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "phi35_full"),
                    help="local disk for the checkpoint (~7.6 GB at 32 layers) and the output (~2 GB)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--budget-s", type=float, default=450, help="wall seconds for all steps together")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--cpu-tokens", type=int, default=4)
    ap.add_argument("--no-cuda", action="store_true", help="skip the GPU even if there is one")
    ap.add_argument("--compress-args", default="",
                    help="more `qins compress` flags, e.g. '--scales log8 --embeddings 5:128' (the <= 2.0 GB plan)")
    ap.add_argument("--caps-scale", type=float, default=1.0,
                    help="multiply each step's time cap (seconds: %s) by this, e.g. on a slow CPU" % CAPS)
    ap.add_argument("--step", default=None, help=argparse.SUPPRESS)          # internal: a child's step
    ap.add_argument("--device", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("cli", nargs="*", help=argparse.SUPPRESS)                 # internal: the compress step's argv
    a = ap.parse_args(argv)
    if a.step:
        return child(a)

    t_start = time.perf_counter()
    work = Path(a.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    src, out = work / f"phi35-synth-{tag(a)}", work / f"phi35-{tag(a)}-qins"
    json_path = Path(os.environ["OUT"]) / "phi35_full.json" if os.environ.get("OUT") else \
        Path(a.json) if a.json else work / "phi35_full.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    cuda = not a.no_cuda and cuda_available()
    doc: dict = {"question": "Phi-3.5-mini shapes: stream-compress with the defaults, load without float weights, "
                             "generate (issue 13)",
                 "command": "python benchmarks/gpu/phi35_full.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:])),
                 "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "host": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "ram_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9,
                          "python": platform.python_version()},
                 "layers": a.layers, "workdir": str(work), "cuda": cuda, "prompt": PROMPT, "steps": {}}

    def save():
        doc["total_wall_s"] = time.perf_counter() - t_start
        tmp = json_path.with_name(json_path.name + ".partial")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, json_path)

    def budget(step: str) -> float:
        return max(5.0, min(CAPS[step] * a.caps_scale, a.budget_s - (time.perf_counter() - t_start)))

    def step(name: str, fn):
        try:
            doc["steps"][name] = fn()
        except Exception as e:                         # noqa: BLE001 - recorded, the next step still runs
            doc["steps"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        save()
        return doc["steps"][name]

    py = sys.executable
    me = str(Path(__file__).resolve())

    def make_checkpoint():
        cfg = src / "config.json"
        if (src / "model.safetensors.index.json").is_file() and cfg.is_file() and \
                json.loads(cfg.read_text()).get("num_hidden_layers") == a.layers:
            return {"ok": True, "reused": str(src), "bytes": sum(f.stat().st_size for f in src.glob("*.safetensors")),
                    "params": tensor_params(src)}
        shutil.rmtree(src, ignore_errors=True)
        shrink = [x for k in ("hidden", "vocab") if getattr(a, k) for x in (f"--{k}", str(getattr(a, k)))]
        r = run_child([py, str(ROOT / "benchmarks" / "synthetic_checkpoint.py"), str(src), "--layers", str(a.layers),
                       *shrink], budget("checkpoint"), work / "checkpoint.log")
        if r["ok"]:
            r.update(bytes=sum(f.stat().st_size for f in src.glob("*.safetensors")), params=tensor_params(src),
                     shards=len(list(src.glob("*.safetensors"))))
        return r

    def compress():
        if not doc["steps"].get("checkpoint", {}).get("ok"):
            return {"ok": False, "skipped": "no checkpoint"}
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out.parent / f".{out.name}.stream-partial", ignore_errors=True)   # measure a fresh run
        dev = "cuda" if cuda else "cpu"
        cli = ["compress", str(src), "-o", str(out), "--stream", "--device", dev, *shlex.split(a.compress_args)]
        res = work / "compress.json"
        res.unlink(missing_ok=True)
        r = run_child([py, me, "--step", "compress", "--result", str(res), "--", *cli], budget("compress"),
                      work / "compress.log")
        r.update(device=dev, qins_command="qins " + " ".join(shlex.quote(c) for c in cli))
        if res.is_file():
            r.update(json.loads(res.read_text()))
        if r["ok"]:
            st = (out / "model.safetensors").stat().st_size
            params = doc["steps"]["checkpoint"]["params"]
            r.update(model_safetensors_bytes=st, dir_bytes=sum(f.stat().st_size for f in out.iterdir() if f.is_file()),
                     params=params, bpw_all_in=8 * st / params, plan=plan_summary(out),
                     gb=st / 1e9, gib=st / 2**30)
        return r

    def load(dev: str, tokens: int):
        if not doc["steps"].get("compress", {}).get("ok"):
            return {"ok": False, "skipped": "no compressed model"}
        res = work / f"load_{dev}.json"
        res.unlink(missing_ok=True)
        shrink = [x for k in ("hidden", "vocab") if getattr(a, k) for x in (f"--{k}", str(getattr(a, k)))]
        r = run_child([py, me, "--step", "load", "--device", dev, "--workdir", str(work), "--layers", str(a.layers),
                       *shrink, "--new-tokens", str(tokens), "--result", str(res)], budget(f"load_{dev}"), work / f"load_{dev}.log")
        if res.is_file():
            r.update(json.loads(res.read_text()))
        return r

    step("checkpoint", make_checkpoint)
    step("compress", compress)
    if cuda:
        step("load_cuda", lambda: load("cuda", a.new_tokens))
    else:
        doc["steps"]["load_cuda"] = {"ok": False, "skipped": "no CUDA device"}
    step("load_cpu", lambda: load("cpu", a.cpu_tokens))
    g, c = doc["steps"].get("load_cuda", {}), doc["steps"]["load_cpu"]
    if g.get("tokens") and c.get("tokens"):
        k = min(len(c["tokens"]), len(g["tokens"]))
        doc["cpu_vs_cuda"] = {"tokens": k, "equal": c["tokens"][:k] == g["tokens"][:k],
                              "positions_equal": sum(x == y for x, y in zip(c["tokens"], g["tokens"])),
                              **c.get("vs_cuda_logits", {})}
    comp = doc["steps"]["compress"]
    if comp.get("ok"):
        doc["targets"] = {"disk_le_2.0GB": comp["model_safetensors_bytes"] <= 2.0e9,
                          "compress_rss_le_4GB": comp.get("vmhwm", comp["peak_rss_bytes"]) <= 4e9}
        for dev in ("cuda", "cpu"):
            s = doc["steps"].get(f"load_{dev}", {})
            if s.get("vmhwm_after_load"):
                doc["targets"][f"load_{dev}_rss_le_size_plus_1.5GB"] = \
                    s["vmhwm_after_load"] <= comp["model_safetensors_bytes"] + 1.5e9
    save()
    print(table(doc))
    print(f"wrote {json_path}")
    return 0


def table(doc: dict) -> str:
    gb = 1e9
    rows = [f"Phi-3.5-mini shapes, {doc['layers']} layers (synthetic weights), {doc['host']['cpus']} CPUs, "
            f"CUDA {'yes' if doc['cuda'] else 'no'}; total {doc.get('total_wall_s', 0):.0f} s",
            f"{'step':<11} {'status':<9} {'wall s':>7} {'peak RSS GB':>11}  notes"]
    for name, s in doc["steps"].items():
        status = "ok" if s.get("ok") else ("skipped" if s.get("skipped") else "TIMEOUT" if s.get("timed_out") else "FAILED")
        note = s.get("skipped") or s.get("error") or ""
        if name == "checkpoint" and s.get("ok"):
            note = f"{s['params'] / 1e9:.3f}B params, {s['bytes'] / gb:.2f} GB" + (" (reused)" if s.get("reused") else "")
        if name == "compress" and s.get("ok"):
            note = (f"{s['model_safetensors_bytes'] / gb:.3f} GB ({s['gib']:.3f} GiB), {s['bpw_all_in']:.3f} bpw "
                    f"all-in, on {s['device']}")
        if name.startswith("load") and s.get("ok"):
            note = (f"load {s['load_s']:.1f} s, RSS peak after load {s['vmhwm_after_load'] / gb:.2f} GB; "
                    f"{s['tokens_per_s']:.2f} tok/s ({s['decode_mode']}, {s['timed_steps']} steps)")
            if s.get("cuda_max_allocated"):
                note += f"; CUDA max allocated {s['cuda_max_allocated'] / gb:.2f} GB"
            if s.get("eager_tokens_per_s"):
                note += f"; eager {s['eager_tokens_per_s']:.2f} tok/s"
        if not s.get("ok") and s.get("log_tail"):
            note += " | " + s["log_tail"].strip().splitlines()[-1][:120]
        peak = s.get("vmhwm") or s.get("peak_rss_bytes")
        rss = f"{peak / gb:.2f}" if peak else "-"
        wall = f"{s['wall_s']:.1f}" if s.get("wall_s") is not None else "-"
        rows.append(f"{name:<11} {status:<9} {wall:>7} {rss:>11}  {note}")
    if doc.get("cpu_vs_cuda"):
        v = doc["cpu_vs_cuda"]
        rows.append(f"CPU vs CUDA first {v['tokens']} tokens: {'equal' if v['equal'] else 'differ'} "
                    f"({v['positions_equal']}/{v['tokens']} positions)"
                    + (f"; first-position logits max |diff| {v['max_abs_diff']:.3g}, top-5 overlap {v['top5_overlap']}/5"
                       if "max_abs_diff" in v else ""))
    if doc.get("targets"):
        rows.append("targets: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in doc["targets"].items()))
    return "\n".join(rows)


# ------------------------------------------------------------------ child: load and generate

def child(a) -> int:
    res: dict = {}
    path = Path(a.result)

    def save():
        path.write_text(json.dumps(res, indent=1))

    try:
        if a.step == "compress":
            _compress(a, res)
        else:
            _load_and_generate(a, res, save)
    except Exception as e:                             # noqa: BLE001 - recorded, then a non-zero exit
        import traceback
        res["error"] = f"{type(e).__name__}: {e}"
        res["traceback"] = traceback.format_exc()[-3000:]
        res.update(vm=vm_status())
        save()
        return 1
    save()
    return 0


def _compress(a, res: dict) -> None:
    """`qins compress ...` (a.cli) in this process: its exit status and this process's own peak RSS
    (VmHWM; the parent's rusage would also count any compiler a kernel build spawns)."""
    import torch

    from qins.cli import main
    t0 = time.perf_counter()
    rc = main(a.cli)
    res.update(cli_rc=rc, cli_wall_s=time.perf_counter() - t0, vmhwm=vm_status()["VmHWM"], torch=torch.__version__)
    if torch.cuda.is_available():
        res["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
    if rc:
        raise RuntimeError(f"qins compress exited with {rc}")


def _load_and_generate(a, res: dict, save) -> None:
    import torch
    import transformers

    import qins
    import qins.kernels.ops as ops
    from qins.metrics.decode import greedy_decode

    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    work = Path(a.workdir)
    out = work / f"phi35-{tag(a)}-qins"
    res.update(torch=torch.__version__, transformers=transformers.__version__, qins=qins.__version__,
               threads=torch.get_num_threads(), rss_before_load=vm_status()["VmRSS"])
    if cuda:
        res["gpu"] = torch.cuda.get_device_name(dev)
    dtype = torch.bfloat16 if cuda else torch.float32
    t0 = time.perf_counter()
    model = qins.load(out, device=dev, dtype=dtype)
    if cuda:
        torch.cuda.synchronize()
    res["load_s"] = time.perf_counter() - t0
    vm = vm_status()
    res.update(dtype=str(dtype), rss_after_load=vm["VmRSS"], vmhwm_after_load=vm["VmHWM"],
               params_on_meta=sum(p.is_meta for p in model.parameters()),
               float_weight_params=sum(p.numel() for n, p in model.named_parameters() if n.endswith(".weight")
                                       and p.dim() == 2))
    if cuda:
        res["cuda_allocated_after_load"] = torch.cuda.memory_allocated(dev)
        res["cuda_max_allocated_after_load"] = torch.cuda.max_memory_allocated(dev)
    save()

    routes: dict[str, int] = {}
    choose = ops.choose

    def counting(*args, **kw):                         # which fused kernel each QINSLinear call took
        r = choose(*args, **kw)
        key = f"{r[0]}/{r[1]} m={args[2] if len(args) > 2 else kw.get('m')}"
        routes[key] = routes.get(key, 0) + 1
        return r
    ops.choose = counting

    prompt = torch.tensor([[t % model.config.vocab_size for t in PROMPT]], device=dev)
    steps = a.new_tokens - 1                           # the prefill yields the first token
    try:
        run = greedy_decode(model, prompt, steps, mode="graph" if cuda else "eager", check_steps=min(4, steps))
        res.update(tokens=run.tokens[0].tolist(), tokens_per_s=run.tokens_per_second, timed_steps=run.steps,
                   decode_s=run.seconds, prefill_s=run.prefill_seconds, setup_s=run.setup_seconds,
                   decode_mode=run.mode, decode_error=run.error, graph_matches_eager=run.graph_matches_eager)
        first = run.first_logits[0].float()
        if cuda and run.mode != "eager":
            e = greedy_decode(model, prompt, steps, mode="eager", check_steps=0)
            res.update(eager_tokens_per_s=e.tokens_per_second, eager_tokens_equal=e.tokens[0].tolist() == res["tokens"])
    except Exception as e:                             # noqa: BLE001 - fall back to a plain loop
        res["greedy_decode_error"] = f"{type(e).__name__}: {e}"
        tokens, first, t = _plain_greedy(model, prompt, a.new_tokens, cuda)
        res.update(tokens=tokens, tokens_per_s=(len(tokens) - 1) / t if t > 0 else 0.0, timed_steps=len(tokens) - 1,
                   decode_s=t, decode_mode="plain loop (DynamicCache)")
    res["kernel_routes"] = routes
    if not cuda:
        from qins.kernels import cpu as cpu_kernels
        res["cpu_fast_path"] = cpu_kernels.available()
        res["cpu_fast_path_why_not"] = cpu_kernels.why_not() if not res["cpu_fast_path"] else None
    torch.save(first.cpu(), work / f"first_logits_{dev.type}.pt")
    other = work / "first_logits_cuda.pt"
    if not cuda and other.is_file():
        g = torch.load(other).float()
        res["vs_cuda_logits"] = {"max_abs_diff": float((g - first).abs().max()),
                                 "argmax_equal": int(g.argmax()) == int(first.argmax()),
                                 "top5_overlap": len(set(g.topk(5).indices.tolist()) & set(first.topk(5).indices.tolist()))}
    vm = vm_status()
    res.update(vmhwm=vm["VmHWM"], rss_end=vm["VmRSS"])
    if cuda:
        res["cuda_max_allocated"] = torch.cuda.max_memory_allocated(dev)


def _plain_greedy(model, prompt, n: int, cuda: bool):
    """Greedy tokens with the model's own cache (no static cache): tokens, first logits, decode seconds."""
    import torch
    with torch.inference_mode():
        o = model(prompt, use_cache=True)
        first = o.logits[0, -1].float()
        tokens = [int(first.argmax())]
        past = o.past_key_values
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n - 1):
            o = model(torch.tensor([[tokens[-1]]], device=prompt.device), past_key_values=past, use_cache=True)
            past = o.past_key_values
            tokens.append(int(o.logits[0, -1].argmax()))
        if cuda:
            torch.cuda.synchronize()
    return tokens, first, time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(main())

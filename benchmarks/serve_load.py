"""Load on `onenip serve`: throughput and latency under N concurrent clients, against the offline batched throughput of
the same model, and the server's memory before and after many requests.

    python benchmarks/serve_load.py                                    # a tiny model at 64 px, trained here (~20 s)
    python benchmarks/serve_load.py --model runs/x/model.safetensors --clients 1 4 8 --seconds 20 --requests 10000

Without --model, the tiny model of the test suite (`onenip.demo.run.tiny_config`: Lite0 backbone, hidden 64, 3
training steps) is trained on the demo's generated data at --size px; its speed is that of a real model of that input
size and backbone (the transformer is smaller). The server runs as a subprocess (`onenip serve --port 0`) on
127.0.0.1; the clients are threads of this process, each with one keep-alive connection, posting the raw PNG bytes of
the demo's test images to /predict in a closed loop. On a small machine the clients take CPU time from the server:
the figures are a lower bound.

Offline: the same model through `Predictor.predict` on the same image files, in batches of --batch-size (what `onenip
predict` does, file decoding included), in this process while the server idles. ratio = served / offline images/s.

Memory: the server's resident set (VmRSS of /proc/PID/status, Linux) after the warm-up and after --requests more
requests from 8 clients, and its peak (VmHWM).

Writes a JSON result file (--output, default docs/results/serve-load-<size>px.json) and prints the Markdown section
of docs/benchmarks.md (also `--render FILE`).
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def tiny_model(folder: Path, size: int) -> tuple[Path, Path]:
    """Train the test suite's tiny model (`tiny_config`) on the demo's generated data: (model file, data root)."""
    from onenip.api import make_config
    from onenip.demo.dataset import make_demo_dataset
    from onenip.demo.run import tiny_config
    from onenip.training.trainer import Trainer

    data = make_demo_dataset(folder / "data", seed=0, image_size=max(96, size), n_train=12, n_test_good=8,
                             n_test_defect=12)
    cfg = make_config(None, [f"data.roots=[{data}]", *tiny_config(size), f"output_dir={folder / 'run'}"])
    Trainer(cfg, progress=False).run()
    return folder / "run" / "model.safetensors", data


def rss(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of process `pid`, in MiB."""
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: int(re.search(rf"^{k}:\s+(\d+) kB", text, re.M).group(1)) / 1024 for k in ("VmRSS", "VmHWM")}


class Server:
    def __init__(self, model: Path, batch_size: int, max_wait_ms: float, threads: int) -> None:
        cmd = [sys.executable, "-c", "import sys; from onenip.cli import main; sys.exit(main())", "serve", str(model),
               "--port", "0", "--device", "cpu", "--batch-size", str(batch_size), "--max-wait-ms", str(max_wait_ms)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # torch's intra-op threads in the server
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in self.proc.stdout], daemon=True).start()  # type: ignore[union-attr]
        deadline, seen = time.monotonic() + 180, []
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            seen.append(line)
            found = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
            if found:
                self.port = int(found.group(1))
                return
        self.stop()
        raise SystemExit("the server did not start:\n" + "".join(seen))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def content_type(body: bytes) -> str:
    """The Content-Type of an image file's bytes: Pillow's MIME type of the format it reads from their header
    (application/octet-stream when it reads none)."""
    try:
        with Image.open(io.BytesIO(body)) as im:
            return Image.MIME.get(im.format or "", "application/octet-stream")
    except OSError:
        return "application/octet-stream"


def load(port: int, bodies: list[bytes], clients: int, seconds: float | None = None, count: int | None = None,
         rest: float = 0.0) -> dict:
    """`clients` threads posting `bodies` (cycled) to /predict until `seconds` have passed or `count` answers came;
    each client waits `rest` seconds after an answer before its next request (0: at once)."""
    kinds = [content_type(b) for b in bodies]  # each file's, once
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    taken = iter(range(10**12))
    lock = threading.Lock()
    start_gate = threading.Barrier(clients + 1)
    stop_at: list[float] = [0.0]

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        start_gate.wait()
        try:
            while True:
                with lock:
                    i = next(taken)
                if (count is not None and i >= count) or (seconds is not None and time.perf_counter() >= stop_at[0]):
                    return
                t0 = time.perf_counter()
                conn.request("POST", "/predict", body=bodies[i % len(bodies)], headers={"Content-Type": kinds[i % len(bodies)]})
                res = conn.getresponse()
                data = res.read()
                if res.status != 200:
                    errors.append(f"{res.status}: {data[:200]!r}")
                    return
                latencies[k].append(time.perf_counter() - t0)
                if rest:
                    time.sleep(rest)
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    stop_at[0] = t0 + (seconds or 0.0)
    start_gate.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"requests failed: {errors[:3]}")
    lat = sorted(x for per in latencies for x in per)
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else lat * 99
    return {"clients": clients, "requests": len(lat), "seconds": round(wall, 2), "images_per_s": round(len(lat) / wall, 2),
            "p50_ms": round(1000 * statistics.median(lat), 1), "p99_ms": round(1000 * q[98], 1)}


def offline(predictor: Any, images: list[Path], seconds: float) -> dict:
    """The model through Predictor.predict on the image files (decoding included), in its batches, for `seconds`."""
    n, k, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        chunk = [images[(k + j) % len(images)] for j in range(predictor.batch_size)]
        predictor.predict(chunk)
        n, k = n + len(chunk), k + len(chunk)
    wall = time.perf_counter() - t0
    return {"images": n, "seconds": round(wall, 2), "images_per_s": round(n / wall, 2)}


def render(res: dict[str, Any]) -> str:
    """The Markdown section of docs/benchmarks.md for one result file."""
    busy = res.get("load_average")
    lines = [f"### {res['input_size']} px, {'the tiny test model' if res['tiny_model'] else res['model']}, "
             f"batch {res['batch_size']}, max wait {res['max_wait_ms']:g} ms", "",
             f"- command: `{res['command']}`",
             f"- commit {res['commit']}; {res['device']}; torch {res['torch']}, "
             + (f"{res['runtime']} with its default threads (all cores)" if res.get("runtime") else
                f"{res['threads']} torch thread{'s' * (res['threads'] != 1)}")
             + " in the server and offline; clients and server on the same machine"
             + (f" (load average {busy:.1f} at the start)" if busy is not None else ""),
             f"- offline: `Predictor.predict` on the same {res['images']} image files, batches of {res['batch_size']}, "
             "measured for as long as each client level just before it", "",
             "| clients | requests | served images/s | offline images/s | served / offline | p50 latency (ms) | "
             "p99 latency (ms) |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for lv in res["levels"]:
        lines.append(f"| {lv['clients']} | {lv['requests']} | {lv['images_per_s']:.1f} | {lv['offline_images_per_s']:.1f} | "
                     f"{100 * lv['ratio']:.0f} % | {lv['p50_ms']:.1f} | {lv['p99_ms']:.1f} |")
    alone = res.get("isolated")
    if alone:
        lines += ["", f"Isolated requests (one client resting {alone['rest_ms']:g} ms after each answer, as a line "
                      f"sending one image per part): p50 {alone['p50_ms']:.1f} ms, p99 {alone['p99_ms']:.1f} ms over "
                      f"{alone['requests']} requests."]
    mem = res.get("memory")
    if mem:
        middle = (f"{mem['rss_middle_mib']:.0f} MiB after {mem['requests'] // 2:,} more, "
                  if mem.get("rss_middle_mib") is not None else "")
        lines += ["", f"Server memory (resident set): {mem['rss_before_mib']:.0f} MiB after the warm-up, {middle}"
                      f"{mem['rss_after_mib']:.0f} MiB after {mem['requests']:,} more requests from {mem['clients']} "
                      f"clients ({mem['seconds']:.0f} s, {mem['images_per_s']:.1f} images/s); peak "
                      f"{mem['peak_mib']:.0f} MiB."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="model.safetensors (default: train the tiny test model here)")
    ap.add_argument("--images", type=Path, help="a folder of test images (default: the generated data's test images)")
    ap.add_argument("--size", type=int, default=64, help="input size of the tiny model (default: 64)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8], help="concurrent clients (default: 1 4 8)")
    ap.add_argument("--seconds", type=float, default=20.0, help="seconds per client count (default: 20)")
    ap.add_argument("--requests", type=int, default=10_000, help="requests of the memory check, 0: none (default: 10000)")
    ap.add_argument("--rest-ms", type=float, default=0.0,
                    help="also time isolated requests: one client resting this long after each answer (0: not)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-wait-ms", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the server and of the offline measure (default: 1; see the docstring)")
    ap.add_argument("--output", type=Path, help="result file (default: docs/results/serve-load-<size>px.json)")
    ap.add_argument("--render", type=Path, metavar="RESULT", help="only print the Markdown of a result file")
    args = ap.parse_args()
    if args.render:
        print(render(json.loads(args.render.read_text())))
        return

    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from iad_mix import device_name, git_commit, portable  # the commit as this run starts; imports torch and onenip

    load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        if args.model is None:
            model, data = tiny_model(Path(tmp), args.size)
            images = sorted(data.glob("*/test/*/*.png"))
        else:
            model = args.model
            if args.images is None:
                raise SystemExit("--model needs --images (a folder of test images)")
        if args.images is not None:
            images = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
        bodies = [p.read_bytes() for p in images]
        from onenip.deploy.predictor import ExportedModel, Predictor

        torch.set_num_threads(args.threads)
        predictor = Predictor.load(model, device="cpu", batch_size=args.batch_size)
        offline(predictor, images, 1.0)  # warm-up
        server = Server(model, args.batch_size, args.max_wait_ms, args.threads)
        try:
            load(server.port, bodies, clients=2, count=40)  # warm-up
            levels, offs = [], []
            for c in args.clients:  # each level beside an offline measure of the same length, as the load may vary
                off = offline(predictor, images, args.seconds)
                offs.append(off)
                print(f"offline: {off['images_per_s']:.1f} images/s", flush=True)
                lv = load(server.port, bodies, clients=c, seconds=args.seconds)
                lv["offline_images_per_s"] = off["images_per_s"]
                lv["ratio"] = round(lv["images_per_s"] / off["images_per_s"], 3)
                levels.append(lv)
                print(f"{c} clients: {lv['images_per_s']:.1f} images/s, p50 {lv['p50_ms']:.1f} ms, p99 {lv['p99_ms']:.1f} ms, "
                      f"{100 * lv['ratio']:.0f} % of offline", flush=True)
            isolated = None
            if args.rest_ms > 0:
                isolated = {**load(server.port, bodies, clients=1, seconds=args.seconds, rest=args.rest_ms / 1000),
                            "rest_ms": args.rest_ms}
                print(f"isolated: p50 {isolated['p50_ms']:.1f} ms, p99 {isolated['p99_ms']:.1f} ms", flush=True)
            memory = None
            if args.requests > 0:
                before = rss(server.proc.pid)  # and after each half: growth that goes on shows in the second
                halves = [load(server.port, bodies, clients=8, count=args.requests // 2)]
                middle = rss(server.proc.pid)
                halves.append(load(server.port, bodies, clients=8, count=args.requests - args.requests // 2))
                after = rss(server.proc.pid)
                requests, seconds = sum(h["requests"] for h in halves), sum(h["seconds"] for h in halves)
                memory = {"requests": requests, "clients": 8, "seconds": round(seconds, 2),
                          "images_per_s": round(requests / seconds, 2), "rss_before_mib": round(before["VmRSS"], 1),
                          "rss_middle_mib": round(middle["VmRSS"], 1), "rss_after_mib": round(after["VmRSS"], 1),
                          "peak_mib": round(after["VmHWM"], 1)}
                print(f"memory: {memory}", flush=True)
        finally:
            server.stop()
    shown = ["python", "benchmarks/serve_load.py", *sys.argv[1:]]
    res = {"command": " ".join(shown), "commit": git_commit(), "device": device_name(torch.device("cpu")),
           "torch": torch.__version__, "model": str(args.model) if args.model else None,
           "runtime": (f"{predictor.model.runtime.name} {predictor.model.runtime.precision}"
                       if isinstance(predictor.model, ExportedModel) else None),
           "tiny_model": args.model is None, "input_size": predictor.size,
           "batch_size": args.batch_size, "max_wait_ms": args.max_wait_ms, "threads": args.threads,
           "images": len(images), "load_average": load_average, "offline": offs, "levels": levels, "isolated": isolated,
           "memory": memory}
    out = args.output or REPO / "docs" / "results" / f"serve-load-{res['input_size']}px.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(portable(json.dumps(res, indent=2)) + "\n")
    print(f"\n{render(res)}\nresult: {out}")


if __name__ == "__main__":
    main()

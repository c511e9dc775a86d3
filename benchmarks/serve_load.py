"""Load and fault test of ``qshift serve`` on loopback: the embedded world model, REST, the test1k captions.

    python benchmarks/serve_load.py                      # 1, 8 and 64 clients, then the SIGKILL test
    python benchmarks/serve_load.py --requests 64 --duration 20 --concurrency 1 8

Load: for each concurrency level, that many client threads (one keep-alive connection each) send
single-image requests until ``--requests`` have been sent or ``--duration`` seconds have passed; it reports
queries/s, client-side latency p50 / p99, the answers by status, and the requests that got no answer
(a connection error or a timeout: must be 0).

Fault: a fresh state folder, 8 clients streaming, the server SIGKILLed once it has run a few batches past a
checkpoint; then it is restarted on the same folder, which must resume from the last checkpoint (its batch
count and state digest); it reports how many adapted batches came after that checkpoint (lost by the kill)
and how many requests were in flight when it died.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import qshift
from qshift.data.world import load_split

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``qshift serve`` in a subprocess on 127.0.0.1, its output in a log file."""

    def __init__(self, args: list[str], workdir: Path, name: str) -> None:
        self.port = free_port()
        self.log = workdir / f"{name}.log"
        self._fh = open(self.log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "qshift.cli", "serve", "--port", str(self.port), *args],
                                     stdout=self._fh, stderr=subprocess.STDOUT, cwd=ROOT)

    def call(self, method: str, path: str, body: dict | None = None, timeout: float = 30) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, None if body is None else json.dumps(body),
                         {"Content-Type": "application/json"})
            r = conn.getresponse()
            return r.status, json.loads(r.read() or b"{}")
        finally:
            conn.close()

    def wait_healthy(self, timeout: float = 300) -> float:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited with {self.proc.returncode}; see {self.log}:\n"
                                 f"{self.log.read_text()[-2000:]}")
            try:
                if self.call("GET", "/healthz", timeout=2)[0] == 200:
                    return time.time() - t0
            except OSError:
                pass
            time.sleep(0.25)
        self.kill()
        raise SystemExit(f"server not healthy after {timeout} s; see {self.log}")

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._fh.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self._fh.close()


def query_pool(n: int) -> list[bytes]:
    """``n`` request bodies of one test1k image each (PNG, base64)."""
    split = load_split("test1k")
    bodies = []
    for i, img in enumerate(split.images(list(range(n)))):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "PNG")
        q = {"image": base64.b64encode(buf.getvalue()).decode(), "id": str(i)}
        bodies.append(json.dumps({"queries": [q], "k": 5}).encode())
    return bodies


class Load:
    """``clients`` threads sending the pool's requests until ``total`` are sent or ``duration`` s have passed."""

    def __init__(self, port: int, pool: list[bytes], clients: int, total: int, duration: float,
                 timeout: float = 180) -> None:
        self.port, self.pool, self.clients, self.total = port, pool, clients, total
        self.duration, self.timeout = duration, timeout
        self.lock = threading.Lock()
        self.sent = 0
        self.codes: Counter = Counter()
        self.no_answer = 0
        self.latencies: list[float] = []
        self.max_batch = 0
        self.stop = threading.Event()

    def _take(self) -> int | None:
        with self.lock:
            if self.stop.is_set() or self.sent >= self.total or time.monotonic() > self.deadline:
                return None
            self.sent += 1
            return self.sent - 1

    def _client(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        while (n := self._take()) is not None:
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/v1/retrieve", self.pool[n % len(self.pool)], {"Content-Type": "application/json"})
                r = conn.getresponse()
                data = r.read()
            except (OSError, http.client.HTTPException):
                with self.lock:
                    self.no_answer += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
                continue
            dt = time.perf_counter() - t0
            with self.lock:
                self.codes[r.status] += 1
                if r.status == 200:
                    self.latencies.append(dt)
                    self.max_batch = max(self.max_batch, max(json.loads(data)["batches"]))
        conn.close()

    def run(self) -> dict:
        self.deadline = time.monotonic() + self.duration
        t0 = time.perf_counter()
        threads = [threading.Thread(target=self._client, daemon=True) for _ in range(self.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        lat = np.asarray(self.latencies)
        return {"clients": self.clients, "sent": self.sent, "answered": sum(self.codes.values()),
                "no_answer": self.no_answer, "codes": dict(self.codes), "seconds": round(wall, 1),
                "queries_per_s": round(self.codes[200] / wall, 2),
                "p50_ms": round(float(np.percentile(lat, 50)) * 1000, 1) if lat.size else None,
                "p99_ms": round(float(np.percentile(lat, 99)) * 1000, 1) if lat.size else None}


def serve_args(work: Path, state: Path, method: str, settings: list[str], checkpoint_every: int) -> list[str]:
    return ["--method", method, *[a for s in settings for a in ("--set", s)], "--gallery-embeddings",
            str(work / "gallery.npy"), "--gallery-ids", str(work / "ids.txt"), "--state-dir", str(state),
            "--checkpoint-every", str(checkpoint_every), "--log-level", "warning"]


def load_test(work: Path, pool: list[bytes], args: argparse.Namespace) -> list[dict]:
    server = Server(serve_args(work, work / "state-load", args.method, args.set, args.checkpoint_every), work, "load")
    print(f"server up in {server.wait_healthy():.1f} s (port {server.port})", flush=True)
    rows = []
    try:
        for c in args.concurrency:
            row = Load(server.port, pool, c, args.requests, args.duration).run()
            status = server.call("GET", "/v1/status")[1]
            row["server_batches"] = status["batches"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        rc = server.stop()
    print(f"server stopped with SIGTERM (exit {rc})", flush=True)
    return rows


def fault_test(work: Path, pool: list[bytes], args: argparse.Namespace) -> dict:
    state = work / "state-fault"
    every = args.fault_checkpoint_every
    server = Server(serve_args(work, state, args.method, args.set, every), work, "fault1")
    server.wait_healthy()
    load = Load(server.port, pool, args.fault_clients, 10**9, args.duration)
    runner = threading.Thread(target=load.run, daemon=True)
    runner.start()
    target = 2 * every + max(1, every // 2)  # mid-way between two checkpoints
    seen = 0
    t_end = time.time() + args.duration
    while seen < target and time.time() < t_end:
        time.sleep(0.1)
        try:
            seen = server.call("GET", "/v1/status", timeout=5)[1]["batches"]
        except OSError:
            pass
    load.stop.set()  # no new requests; those in flight die with the server
    server.kill()
    killed_at = seen
    runner.join(60)
    meta = json.loads((state / "checkpoint.json").read_text())
    restarted = Server(serve_args(work, state, args.method, args.set, every), work, "fault2")
    restarted.wait_healthy()
    status = restarted.call("GET", "/v1/status")[1]
    code, after = restarted.call("POST", "/v1/retrieve", json.loads(pool[0]), timeout=120)
    restarted.stop()
    last_done = max(killed_at, load.max_batch)
    return {"checkpoint_every": every, "batches_at_kill": last_done, "answered_batches_at_kill": load.max_batch,
            "last_checkpoint_batches": meta["batches"], "resumed_batches": status["batches"],
            "resumed_digest_matches": status["state_digest"] == meta["state_digest"],
            "resumed_from": status["checkpoints"]["resumed_from"], "lost_batches": last_done - meta["batches"],
            "in_flight_at_kill": load.no_answer, "answered_before_kill": load.codes[200],
            "first_batch_after_restart": after.get("batches") if code == 200 else code}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="rest")
    p.add_argument("--set", action="append", default=[], help="key=value for the server (repeatable)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--requests", type=int, default=192, help="requests per concurrency level (one image each)")
    p.add_argument("--duration", type=float, default=60.0, help="at most this many seconds per level")
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--fault-clients", type=int, default=8)
    p.add_argument("--fault-checkpoint-every", type=int, default=4)
    p.add_argument("--no-fault", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, checkpoints)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qshift-serve-load-"))
    try:
        split = load_split("test1k")
        model = qshift.load_model("world", "i2t")
        with torch.no_grad():
            emb = torch.cat([model.encode_gallery(split.captions[s:s + 500]) for s in range(0, len(split.captions), 500)])
        np.save(work / "gallery.npy", emb.numpy())
        (work / "ids.txt").write_text("\n".join(str(i) for i in range(len(emb))) + "\n")
        pool = query_pool(64)
        print(f"qshift {qshift.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs; gallery "
              f"{len(emb)} test1k captions; method {args.method} {' '.join(args.set)}", flush=True)
        rows = load_test(work, pool, args)
        print("\nclients  sent  answered  no-answer  q/s     p50 ms   p99 ms   batches")
        for r in rows:
            print(f"{r['clients']:>7}  {r['sent']:>4}  {r['answered']:>8}  {r['no_answer']:>9}  {r['queries_per_s']:>6}"
                  f"  {r['p50_ms']:>7}  {r['p99_ms']:>7}  {r['server_batches']:>7}")
        if not args.no_fault:
            fault = fault_test(work, pool, args)
            print("\nfault test (SIGKILL mid-stream, restart):\n" + json.dumps(fault, indent=1))
        bad = sum(r["no_answer"] for r in rows)
        if bad:
            raise SystemExit(f"{bad} request(s) got no answer")
    finally:
        if args.keep:
            print(f"work folder: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""`onerec serve` end to end on CPU, one server start: the Think-Ahead cache is built on 2 Ray workers (and must equal
the single-process build shard for shard), then `onerec serve action=start` runs in a subprocess on a free port,
concurrent real HTTP requests (stdlib urllib + threads) get answers, every bad request gets a 4xx and the server
still answers afterwards, and `onerec serve action=stop` ends it."""

import json
import os
import signal
import socket
import subprocess
import sys
import secrets
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from onerec_launch.local_cluster import LocalRayCluster
from test_think_ahead import NUM_ITEMS, make_model_dir

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call(url, body=None, method=None, timeout=60):
    """(status, JSON answer) of one HTTP request; a raw bytes body is sent as is."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_sharded_build_then_serve_concurrent_and_bad_requests(tmp_path, monkeypatch):
    import ray

    from onerec_dist.distributed.think_ahead_shards import build_sharded
    from onerec_dist.models import load_pretrained
    from onerec_dist.serving.config import ServingConfig
    from onerec_dist.serving.think_ahead import Fingerprints, build_shards, load_cache, prepare_cache_dir
    from onerec_dist.sid.tokens import ItemTokenizer

    model_dir = tmp_path / "model"
    codes = make_model_dir(model_dir)
    rng = np.random.default_rng(1)
    users = [f"u{u}" for u in range(5)]
    histories = [rng.integers(0, NUM_ITEMS, size=3).tolist() for _ in users]
    cfg = ServingConfig(num_rationales=2, prefix_levels=2, prefix_beam=3, max_think_tokens=4, shard_size=2,
                        do_sample=False, num_workers=2, beam_width=8, max_k=8, max_batch_size=16,
                        batch_wait_timeout_s=0.2, device="cpu")
    fps = Fingerprints.of(model_dir)
    # One Ray for the build and the server: a local head that retries and waits on a loaded machine.
    cluster = LocalRayCluster(temp_dir=f"/tmp/rs_{secrets.token_hex(4)}", num_cpus=2, start_timeout_s=420,
                              env={"RAY_AUTH_MODE": "disabled"})
    cluster.start()
    address = f"127.0.0.1:{cluster.ports['--port']}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    todo = prepare_cache_dir(tmp_path / "cache", fps, cfg, users)
    try:
        build_sharded(cfg, str(model_dir), codes, users, histories, str(tmp_path / "cache"), todo, fps)
    finally:
        ray.shutdown()
    model, tokenizer = load_pretrained(str(model_dir), "sdpa")
    local = tmp_path / "local"
    prepare_cache_dir(local, fps, cfg, users)
    build_shards(model.eval(), tokenizer, ItemTokenizer.from_tokenizer(tokenizer), codes, users, histories, cfg,
                 local, [0, 1, 2], fps)
    sharded, single = load_cache(tmp_path / "cache", fps), load_cache(local, fps)
    assert sharded.prefixes == single.prefixes and sorted(sharded.prefixes) == users  # greedy: same shards

    port, out = free_port(), tmp_path / "serve"
    env = {**os.environ, "RAY_ADDRESS": address}
    overrides = [f"model.name_or_path={model_dir}", f"serving.cache_dir={tmp_path / 'cache'}", f"output_dir={out}",
                 f"serving.port={port}", "serving.beam_width=8", "serving.max_k=8", "serving.device=cpu",
                 "serving.batch_wait_timeout_s=0.2"]
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "onerec_dist.cli", "serve", "action=start", *overrides],
                              cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while not (out / "serve.json").is_file():
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "server did not start in 240 s"
            time.sleep(0.5)
        status, health = call(f"{url}/health")
        assert status == 200 and health["status"] == "ok" and health["cached_users"] == len(users)
        assert health["items"] == NUM_ITEMS

        item = lambda row: f"i{row}"  # noqa: E731  the model's table names item row r "i<r>"
        requests = [{"user": users[i % 5], "history": [item(r) for r in histories[i % 5]], "k": 5} for i in range(14)]
        requests += [{"user": "new-user", "history": ["i1", "i2"], "k": 3}, {"user": 7, "history": ["i3"]}]
        answers = [None] * len(requests)

        def send(i):
            answers[i] = call(f"{url}/recommend", requests[i])

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        for request, (status, answer) in zip(requests, answers):
            assert status == 200, answer
            assert len(answer["items"]) == min(request.get("k", 10), 8)  # k omitted: min(10, serving.max_k)
            assert answer["latency_ms"] > 0 and answer["user"] == str(request["user"])
            assert all(a["item"].startswith("i") for a in answer["items"])
            scores = [a["score"] for a in answer["items"]]
            assert scores == sorted(scores, reverse=True)
            cached = str(request["user"]) in users
            assert answer["path"] == ("cached" if cached else "fallback")
            if cached:  # every item lies below one of the user's cached prefixes
                allowed = sharded.get(str(request["user"]))
                assert all(list(codes[int(a["item"][1:])][:2]) in allowed for a in answer["items"])
        assert max(answer["batch_size"] for _, answer in answers) > 1  # concurrent requests were batched

        bad = [(b"{not json", 400), ({"user": "u0", "history": []}, 400), ({"user": "u0", "history": ["nope"]}, 422),
               ({"user": "u0", "history": ["i1"], "k": 9}, 400), ({"user": "u0", "history": ["i1"], "k": "3"}, 400),
               ({"history": ["i1"]}, 400), ([1, 2], 400), ({"user": "u0", "history": ["i1"], "x": 1}, 400)]
        for body, expected in bad:
            status, answer = call(f"{url}/recommend", body)
            assert status == expected and answer["error"], (body, status, answer)
        assert call(f"{url}/recommend", method="GET")[0] == 405
        assert call(f"{url}/nowhere")[0] == 404
        status, answer = call(f"{url}/recommend", {"user": "u1", "history": ["i4", "i5"], "k": 2})
        assert status == 200 and len(answer["items"]) == 2 and answer["path"] == "cached"  # still serving
        status, health = call(f"{url}/health")
        assert health["requests"] == {"cached": 15, "fallback": 2}

        stop = subprocess.run([sys.executable, "-m", "onerec_dist.cli", "serve", "action=stop", f"output_dir={out}"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0, stop.stderr
        assert server.wait(120) == 0, (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
        log.close()
        cluster.stop()

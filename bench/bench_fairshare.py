"""Benchmark the cost of fair share at dequeue (issue 33): Redis commands per job, a no-op worker's jobs/s, and the
cost of an empty poll, for the dequeue before tenants and the fair-share dequeue over 1, 2 and 8 tenants.

One private redis-server; each variant has its own worker app and broker channel (`worker.celery_app.create_app` and
its `worker.process.transport.Channel`, polled as the worker's event loop polls it) consuming its own queue, whose
callback acks each job at once and, for a capped tenant's job, frees its tenant GPU slot (`fairshare.free_gpu`), as
the worker does when such a job ends. Each pass queues `--jobs` real `render.run` task messages per variant
(`TaskMessage.send` through a `RenderClient`'s Celery app, as `RenderClient` sends them, spread evenly over the
variant's tenants, normal priority), then drains them `CHUNK` jobs at a time, the variants taking turns in rotated
order (`common.interleaved`), so a burst of load on the shared cores hits every variant alike. Variants:
- before: the plain pop script of the commit before tenants (`_POP` of f86a481~1's worker/process/transport.py,
  copied below unchanged as `BEFORE_POP`), with that commit's arguments; the rest of the channel is today's, which
  differs from that commit's only in the script it runs;
- fair share, default tenant only: what a farm without RENDER_TENANTS runs now (`worker.process.fairshare.POP`);
- fair share over 2 and 8 declared tenants (the `default` tenant, always listed, has none queued), and over 8 with
  `max_gpus` set on each (a ZCARD per tenant tried; the cap never binds: the no-op worker holds one job at a time).
Figures: commands per job from INFO commandstats deltas (commands run inside a script are counted there, so both the
EVALSHA calls and the total are given), the server's µs per EVALSHA (commandstats usec), redis-server and client
CPU per job, jobs/s (median chunk) and its ratio to before (median of the rounds' paired ratios), and the commands
of one empty poll: the poll's script over every list, then the wait (BLMOVE) that follows it.

    python bench/bench_fairshare.py [--jobs 2000] [--passes 3] [--idle-polls 100]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import redis
from common import Section, interleaved, median, percent, spread
from kombu.transport.virtual import Empty

from localfarm.cluster import RedisServer
from producer.client import RenderClient
from producer.keys import DEFAULT_TENANT, PRIORITIES, scoped_id, tenant_of, tenant_queue
from producer.records import TaskMessage
from producer.settings import ClientSettings
from worker.celery_app import create_app
from worker.process import fairshare, transport
from worker.settings import WorkerSettings

MODEL = "tiny-sd15"
CHUNK = 200  # jobs a variant drains in its turn of a round

# The baseline: the dequeue script of the commit before tenants (f86a481~1, worker/process/transport.py `_POP`),
# copied unchanged. Its channel passed one ARGV, the time of the delivery.
BEFORE_POP = """
for i = 3, #KEYS do
  local item = redis.call('RPOP', KEYS[i])
  if item then
    local tag = false
    local ok, message = pcall(cjson.decode, item)
    if ok and type(message) == 'table' and type(message.properties) == 'table' then
      local info = message.properties.delivery_info
      local candidate = message.properties.delivery_tag
      if type(candidate) == 'string' and type(info) == 'table' and type(info.exchange) == 'string'
          and type(info.routing_key) == 'string' then
        tag = candidate
        redis.call('ZADD', KEYS[2], ARGV[1], tag)
        redis.call('HSET', KEYS[1], tag,
          '[' .. item .. ',' .. cjson.encode(info.exchange) .. ',' .. cjson.encode(info.routing_key) .. ']')
      end
    end
    return {KEYS[i], item, tag}
  end
end
return false
"""
BEFORE_POP_SHA = hashlib.sha1(BEFORE_POP.encode()).hexdigest()


class BeforeChannel(transport.Channel):
    """Today's channel polling with the script of the commit before tenants, as that commit's `_pop_args` did."""

    def _pop_args(self, lists: list[str]) -> list[Any]:
        prefix = self.global_keyprefix or ""
        keys = [prefix + key for key in (self.unacked_key, self.unacked_index_key, *lists)]
        return ["EVALSHA", BEFORE_POP_SHA, len(keys), *keys, repr(time.time())]


class BeforeTransport(transport.Transport):
    Channel = BeforeChannel


@dataclass
class Variant:
    label: str
    tenants: dict[str, dict[str, Any]]  # RENDER_TENANTS; the jobs go to these (to `default` when empty)
    before: bool = False

    @property
    def owners(self) -> list[str]:
        return list(self.tenants) or [DEFAULT_TENANT]


def teams(prefix: str, count: int, **first: Any) -> dict[str, dict[str, Any]]:
    """`count` tenants named `<prefix>0`...; the first with `first` (a weight), each variant with its own names."""
    return {f"{prefix}{i}": dict(first) if i == 0 else {} for i in range(count)}


VARIANTS = [
    Variant("before: plain pop (f86a481~1)", {}, before=True),
    Variant("fair share, default tenant only", {}),
    Variant("fair share, 2 tenants", teams("a", 2, weight=2)),
    Variant("fair share, 8 tenants", teams("b", 8, weight=2)),
    Variant("fair share, 8 tenants, max_gpus 4", {name: {"max_gpus": 4} for name in teams("c", 8)}),
]


Counters = tuple[Counter[str], Counter[str], float]


def counters(client: redis.Redis) -> Counters:
    """Calls and server µs per command so far (INFO itself left out), and the server's CPU seconds."""
    info: dict[str, Any] = client.info("all")
    stats = {k.removeprefix("cmdstat_"): v for k, v in info.items() if k.startswith("cmdstat_") and k != "cmdstat_info"}
    calls = Counter({name: int(v["calls"]) for name, v in stats.items()})
    usec = Counter({name: int(v["usec"]) for name, v in stats.items()})
    return calls, usec, float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


@dataclass
class Usage:
    """Redis's counters over some events (jobs drained, or empty polls)."""

    events: int = 0
    calls: Counter[str] = field(default_factory=Counter)
    usec: Counter[str] = field(default_factory=Counter)
    cpu: float = 0.0

    def add(self, events: int, before: Counters, after: Counters) -> None:
        self.events += events
        self.calls.update(after[0] - before[0])
        self.usec.update(after[1] - before[1])
        self.cpu += after[2] - before[2]

    def per(self, command: str | None = None) -> float:
        """Calls of `command` (all commands when None) per event."""
        total = sum(self.calls.values()) if command is None else self.calls[command]
        return total / max(self.events, 1)

    def script_micros(self) -> float:
        """Server µs per EVALSHA: the script's whole run, the commands inside it included."""
        return self.usec["evalsha"] / max(self.calls["evalsha"], 1)

    def breakdown(self) -> str:
        """Calls per event by command; those under 0.005 per event (the clients' health-check PINGs) left out."""
        shown = {name: count / self.events for name, count in sorted(self.calls.items())}
        return ", ".join(f"{name} {per:.2f}" for name, per in shown.items() if per >= 0.005)


class Drainer:
    """One variant's worker app and broker channel on the shared redis-server, and its producer."""

    def __init__(self, variant: Variant, queue: str, url: str, sender: RenderClient, monitor: redis.Redis) -> None:
        self.variant, self.queue, self.sender, self.monitor = variant, queue, sender, monitor
        settings = WorkerSettings(
            redis_url=url, models={MODEL: {"family": "sd15", "source": "tiny"}}, tenants=variant.tenants
        )
        app = create_app(settings)
        app.conf.broker_transport_options[transport.POLL_OPTION] = 0.01  # the idle figure's waits: short, same count
        self.connection = app.connection_for_read(transport=BeforeTransport if variant.before else None)
        self.channel: transport.Channel = self.connection.default_channel
        self.channel.client.script_load(BEFORE_POP if variant.before else fairshare.POP)
        self.channel.basic_consume(queue, False, self._received, f"bench-{id(self)}")
        self.capped = set(fairshare.capped(settings.tenants))
        self.delivered = 0
        self.jobs = Usage()
        self.idle = Usage()
        self.client_cpu = 0.0  # this process's CPU seconds over the counted chunks
        self.batches = 0

    def _received(self, message: Any) -> None:
        """The no-op worker: ack at once and, as today's worker does when a capped tenant's job ends, free its slot."""
        message.ack()
        if tenant_of(message.headers["id"]) in self.capped:
            fairshare.free_gpu(self.channel.client, message.headers["id"])
        self.delivered += 1

    def fill(self, jobs: int) -> None:
        self.batches += 1
        owners = self.variant.owners
        spec = json.dumps({"model": MODEL, "prompt": "a lighthouse", "num_inference_steps": 1})
        now = time.time()
        messages = [
            TaskMessage(
                scoped_id(owners[i % len(owners)], f"b{self.batches}-{i}"),
                spec,
                tenant_queue(self.queue, owners[i % len(owners)]),
                PRIORITIES["normal"],
                now,
            )
            for i in range(jobs)
        ]
        app = self.sender.app
        with app.producer_or_acquire() as producer, producer.batch():
            for message in messages:
                message.send(app, producer=producer)

    def poll(self) -> bool:
        """One command of the worker's event loop (a poll, or the wait after an empty one): whether it delivered."""
        self.channel.connection.cycle._register_BRPOP(self.channel)
        try:
            return bool(self.channel._brpop_read())
        except Empty:
            return False

    def take(self, jobs: int) -> float:
        """The seconds the channel takes to deliver (and ack) the next `jobs` queued; Redis's counters into
        `self.jobs`, this process's CPU into `self.client_cpu`."""
        self.delivered = 0
        before, cpu = counters(self.monitor), time.process_time()
        started = time.perf_counter()
        while self.delivered < jobs:
            if not self.poll() and self.channel._waiting:
                raise RuntimeError(f"{self.variant.label}: every list empty after {self.delivered} of {jobs} jobs")
        seconds = time.perf_counter() - started
        self.client_cpu += time.process_time() - cpu
        self.jobs.add(jobs, before, counters(self.monitor))
        return seconds

    def empty_polls(self, polls: int) -> None:
        """`polls` times: a poll that finds every list empty, and the wait after it; counts into `self.idle`."""
        before = counters(self.monitor)
        for _ in range(polls):
            if self.poll() or not self.channel._waiting:
                raise RuntimeError(f"{self.variant.label}: an empty poll delivered, or did not lead to the wait")
            self.poll()  # the wait (BLMOVE), over after render_poll_seconds
            if self.channel._waiting:
                raise RuntimeError(f"{self.variant.label}: the wait was not followed by a poll")
        self.idle.add(polls, before, counters(self.monitor))

    def close(self) -> None:
        self.connection.close()


def measure(jobs: int, passes: int, idle_polls: int) -> tuple[list[Drainer], dict[str, list[float]]]:
    """The variants' drainers with their counts, and each variant's seconds per CHUNK jobs, round by round."""
    work = Path(tempfile.mkdtemp(prefix="bench-fairshare-"))
    samples: dict[str, list[float]] = {variant.label: [] for variant in VARIANTS}
    with RedisServer(workdir=work) as server:
        sender = RenderClient(ClientSettings(redis_url=server.url))
        monitor = redis.Redis.from_url(server.url)
        drainers = [Drainer(v, f"render.bench-{i}", server.url, sender, monitor) for i, v in enumerate(VARIANTS)]
        try:
            for drainer in drainers:  # warm: connections, scripts, kombu's caches
                drainer.fill(CHUNK)
                drainer.take(CHUNK)
                drainer.jobs, drainer.client_cpu = Usage(), 0.0
            for _ in range(passes):
                for drainer in drainers:
                    drainer.fill(jobs)
                rounds = interleaved(
                    {d.variant.label: partial(d.take, CHUNK) for d in drainers},
                    jobs // CHUNK,
                    warmup=0,
                    self_timed=True,
                )
                for label, seconds in rounds.items():
                    samples[label] += seconds
            for drainer in drainers:
                drainer.empty_polls(idle_polls)
            lists = [key for key in monitor.scan_iter() if monitor.type(key) == b"list"]
            leftover = int(monitor.hlen("unacked")) + sum(int(monitor.llen(key)) for key in lists)
            held = [key for key in monitor.scan_iter("render:*") if monitor.type(key) == b"zset"]
            if leftover or held:
                raise RuntimeError(f"{leftover} jobs left queued or unacked, and {held} left, after the drains")
        finally:
            for drainer in drainers:
                drainer.close()
            monitor.close()
            sender.close()
    return drainers, samples


def report(drainers: list[Drainer], samples: dict[str, list[float]], jobs: int, passes: int, polls: int) -> Section:
    rounds = len(samples[drainers[0].variant.label])
    section = Section(
        "Fair share at dequeue: Redis commands and jobs/s of a no-op worker",
        f"`bench/bench_fairshare.py`: one private redis-server; per variant its own queue, worker app and broker "
        f"channel, whose callback acks at once (and frees a capped tenant's GPU slot, as the worker does when such a "
        f"job ends); {passes} pass{'es' if passes != 1 else ''} of {jobs:,} real task messages per variant (spread "
        f"evenly over its tenants, normal priority), drained {CHUNK} jobs at a time with the variants taking turns "
        f"({rounds} interleaved rounds). "
        f"jobs/s = {CHUNK} / the median turn, ± = half the IQR (the shared cores' noise); vs before = the median of "
        "the rounds' paired ratios. Before: the pop script of f86a481~1 (no tenants). Commands from INFO "
        "commandstats deltas (a script's own commands included); server µs / EVALSHA = commandstats usec per call "
        "(the script's whole run); redis CPU = redis-server's used_cpu_user + sys; client CPU = the benchmark "
        "process's (the channel, kombu, the callback). Client round trips per job: before 3 (the pop, kombu's "
        "receipt, the ack), as now, and one more (the release of its GPU slot, a ZREM) for a capped tenant's job; "
        "every other added command runs inside the one EVALSHA. One uncapped tenant (no RENDER_TENANTS) pops as "
        "before.",
    )
    base = samples[drainers[0].variant.label]
    rows = []
    for d in drainers:
        seconds = samples[d.variant.label]
        ratio = median([b / s for b, s in zip(base, seconds, strict=True)])
        rows.append(
            [
                d.variant.label,
                f"{d.jobs.per('evalsha'):.2f}",
                f"{d.jobs.per():.2f}",
                f"{d.jobs.script_micros():.1f}",
                f"{d.jobs.cpu / d.jobs.events * 1e6:.1f}",
                f"{d.client_cpu / d.jobs.events * 1e6:.0f}",
                f"{CHUNK / median(seconds):,.0f} (±{spread(seconds):.1%})",
                f"{ratio:.3f}x ({percent(ratio)})",
                f"{d.idle.per():.1f}",
                f"{d.idle.script_micros():.1f}",
            ]
        )
    section.table(
        [
            "dequeue",
            "EVALSHA / job",
            "commands / job",
            "server µs / EVALSHA",
            "redis CPU µs / job",
            "client CPU µs / job",
            "jobs/s (no-op worker)",
            "vs before",
            "commands / empty poll",
            "server µs / empty EVALSHA",
        ],
        rows,
    )
    section.line("Commands per job, by name (a drain's calls over its jobs):")
    section.line()
    for d in drainers:
        section.line(f"- {d.variant.label}: {d.jobs.breakdown()}")
    section.line()
    section.line(f"Commands per empty poll (the poll's script over every list, then the wait; {polls} of each):")
    section.line()
    for d in drainers:
        section.line(f"- {d.variant.label}: {d.idle.breakdown()}")
    section.line()
    before, most = drainers[0], drainers[-1]
    every = transport.POLL_SECONDS
    section.line(
        f"fairshare: {most.variant.label}: {most.jobs.per():.1f} commands a job against {before.jobs.per():.1f} "
        f"before, {most.jobs.script_micros():.0f} µs of the server per pop against {before.jobs.script_micros():.0f}; "
        f"an idle worker polls once per {every} s (render_poll_seconds): {most.idle.per() / every:.0f} commands/s "
        f"against {before.idle.per() / every:.0f}, {most.idle.script_micros() / every / 1e3:.2f} ms/s of the "
        f"server against {before.idle.script_micros() / every / 1e3:.2f}"
    )
    return section


def run(*, jobs: int = 2000, passes: int = 3, idle_polls: int = 100) -> Section:
    """`jobs` per variant and pass (a multiple of CHUNK * 5, so that each variant takes each place equally often)."""
    if jobs % (CHUNK * len(VARIANTS)):
        raise ValueError(f"jobs must be a multiple of {CHUNK * len(VARIANTS)}; got {jobs}")
    drainers, samples = measure(jobs, passes, idle_polls)
    return report(drainers, samples, jobs, passes, idle_polls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2000, help="jobs per variant and pass (a multiple of 1,000)")
    parser.add_argument("--passes", type=int, default=3, help="times each variant's queue is filled and drained")
    parser.add_argument("--idle-polls", type=int, default=100, help="empty polls per variant")
    args = parser.parse_args()
    started = time.monotonic()
    run(jobs=args.jobs, passes=args.passes, idle_polls=args.idle_polls)
    print(f"\nfairshare: {time.monotonic() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()

"""Benchmark the control plane at fleet scale: Redis load per GPU for N simulated workers on one redis-server.

Each simulated worker holds one running job and runs the project's real control-plane code on its schedule,
as a worker configured with the defaults does (intervals from `WorkerSettings`):
- its lease (`Lease.acquire`, then `Lease.renew` every ttl / 3) and the revocation watch's MGET of its job's key
  (`RevocationWatch.read_all`, every RENDER_REVOCATION_POLL_INTERVAL);
- progress every RENDER_PROGRESS_INTERVAL as the job runner reports it (`worker.process.runner`,
  `TaskDelivery.progress`): the advert (`JobAdvert.progress`), the result backend's PROGRESS write and a
  `task-progress` event (Celery's own backend and event dispatcher);
- its advert (`Heartbeat.beat`, every RENDER_HEARTBEAT_INTERVAL) and Celery's `worker-heartbeat` event (2 s);
- its consumer's poll of its queues while a slot is free (kombu's BRPOP with a 1 s timeout, one command a
  second, issued here as RPOP so that the simulation never blocks);
- the recovery scan every RENDER_RECOVERY_INTERVAL: the real `RecoveryScanner.tick` (one worker of the fleet
  scans per interval, reading only lapsed leases).

The schedules run in simulated time (a heap of due actions, as fast as one process can issue them), so the
figures are per simulated second: Redis's own counters (INFO commandstats, net bytes, used CPU) over the
window, divided by its simulated length. "Before" is the same fleet with the earlier scan (every worker reads
every running job each interval: HGETALL plus one EXISTS per job, measured once at each N and counted N times
per interval) and gossip (every worker hears every event: the fleet's events times N in output bytes).

    python bench/bench_fleet.py [--quick] [--fleets 10,100,1000] [--seconds 20]
"""

from __future__ import annotations

import argparse
import heapq
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from common import Section

from localfarm.cluster import RedisServer
from producer.keys import RUNNING_TASKS, lease_key, model_queue, priority_lists
from worker.celery_app import create_app
from worker.models.registry import ModelRegistry
from worker.process.fleet import Heartbeat, JobAdvert
from worker.process.jobcontrol import Lease, RevocationWatch
from worker.settings import WorkerSettings

CELERY_HEARTBEAT = 2.0  # Celery's worker-heartbeat event interval
BROKER_POLL = 1.0  # kombu's BRPOP timeout: one command a second from an idle consumer
TARGET_COMMANDS, TARGET_BYTES = 20_000, 5_000_000  # per second for the whole fleet at 1,000 workers


@dataclass
class FleetLoad:
    workers: int
    seconds: float
    commands: float  # per simulated second, whole fleet
    net_bytes: float
    cpu: float  # redis-server CPU seconds per simulated second
    scan_seconds: float  # one recovery scan's wall time
    legacy_scan_commands: float  # one scan of every running job (the earlier algorithm)
    legacy_scan_seconds: float
    event_bytes: float  # bytes of events published per simulated second (what gossip fans out N times)
    before_commands: float = field(init=False)
    before_bytes: float = field(init=False)

    def __post_init__(self) -> None:
        interval = WorkerSettings().recovery_interval
        scans_per_second = self.workers / interval  # every worker scanned every interval
        self.before_commands = self.commands + scans_per_second * self.legacy_scan_commands
        self.before_bytes = self.net_bytes + self.event_bytes * (self.workers - 1)  # one subscriber here: Flower


def counters(client: redis.Redis) -> tuple[float, float, float]:
    info = client.info("all")
    commands = sum(v["calls"] for k, v in info.items() if k.startswith("cmdstat_") and k != "cmdstat_info")
    net = info["total_net_input_bytes"] + info["total_net_output_bytes"]
    return float(commands), float(net), info["used_cpu_sys"] + info["used_cpu_user"]


def legacy_scan(client: redis.Redis) -> None:
    """The recovery scan before this change, as every worker ran it: every running job, then its lease."""
    for raw_id in client.hgetall(RUNNING_TASKS):
        task_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
        client.exists(lease_key(task_id))


class EventBytes:
    """A subscriber to Celery's event channels (kombu's fanout `celeryev`), as Flower is: the bytes it receives."""

    def __init__(self, client: redis.Redis) -> None:
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        self.pubsub.psubscribe("*celeryev*")
        self.received = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._done.is_set():
            message = self.pubsub.get_message(timeout=0.1)
            if message is not None:
                self.received += len(message["data"])

    def stop(self) -> float:
        time.sleep(0.5)  # what was published last is delivered
        self._done.set()
        self._thread.join(timeout=10)
        self.pubsub.close()
        return float(self.received)


class Fleet:
    """N simulated workers, each with a running job, on one Redis database."""

    def __init__(self, url: str, workers: int) -> None:
        self.settings = WorkerSettings(redis_url=url)
        self.app = create_app(self.settings)
        self.client = redis.Redis.from_url(url)
        self.client.flushdb()
        self.registry = ModelRegistry.from_settings(self.settings)
        self.events = self.app.events.Dispatcher(self.app.connection_for_write(), hostname="sim@fleet", enabled=True)
        queue = model_queue(self.settings.queue, "tiny-sd15")
        self.lists = list(priority_lists(queue).values())
        self.workers: list[tuple[str, Lease, RevocationWatch, Heartbeat, JobAdvert]] = []
        for i in range(workers):
            owner = f"sim-{i}@fleet:{i}"
            task_id = f"job-{i:05d}"
            lease = Lease(self.client, task_id, self.settings.lease_ttl, owner)
            assert lease.acquire({"spec": "{}", "queue": queue, "attempt": 1, "worker": owner}, renewing=False)
            watch = RevocationWatch(self.client, owner)  # its thread is not started: `read_all` is its poll
            watch.watch(task_id)
            heartbeat = Heartbeat(
                self.client,
                hostname=owner,
                models=["tiny-sd15"],
                queues=[queue],
                interval=self.settings.heartbeat_interval,
                ttl=self.settings.heartbeat_ttl,
            )
            heartbeat.beat()
            advert = JobAdvert(self.client, owner, self.registry)
            advert.job_started(task_id)
            self.workers.append((task_id, lease, watch, heartbeat, advert))
        self.scanner = self.app.recovery_scanner

    def schedule(self) -> list[tuple[float, int, str, float]]:
        s = self.settings
        every = {
            "renew": s.lease_ttl / 3,
            "revocations": s.revocation_poll_interval,
            "progress": s.progress_interval,
            "heartbeat": s.heartbeat_interval,
            "celery-heartbeat": CELERY_HEARTBEAT,
            "poll": BROKER_POLL,
            "scan": s.recovery_interval,
        }
        heap = []
        for index in range(len(self.workers)):
            for action, period in every.items():  # each worker's phase is its own, as in a real fleet
                heapq.heappush(heap, (period * ((index * 7919) % 1000) / 1000, index, action, period))
        return heap

    def act(self, index: int, action: str, step: int) -> None:
        task_id, lease, watch, heartbeat, advert = self.workers[index]
        if action == "renew":
            lease.renew()
        elif action == "revocations":
            watch.read_all()
        elif action == "progress":
            advert.progress(step, 10_000)
            self.app.backend.store_result(task_id, {"step": step, "total": 10_000}, "PROGRESS")
            self.events.send("task-progress", uuid=task_id, step=step, total=10_000)
        elif action == "heartbeat":
            heartbeat.beat()
        elif action == "celery-heartbeat":
            self.events.send("worker-heartbeat", freq=CELERY_HEARTBEAT, active=1, processed=0)
        elif action == "poll":
            self.client.rpop(self.lists[0])
        elif action == "scan":
            self.scanner.tick()

    def run(self, seconds: float) -> tuple[float, float, float, float]:
        """Simulate `seconds`; Redis's command, byte and CPU counts over them, and the bytes of the events sent, as
        one subscriber (Flower) receives them: gossip had every worker receive them too."""
        heap = self.schedule()
        listener = EventBytes(self.client)
        before = counters(self.client)
        step = 0
        while heap and heap[0][0] < seconds:
            due, index, action, period = heapq.heappop(heap)
            step += 1
            self.act(index, action, step)
            heapq.heappush(heap, (due + period, index, action, period))
        after = counters(self.client)
        return after[0] - before[0], after[1] - before[1], after[2] - before[2], listener.stop()

    def time(self, call: Callable[[], Any]) -> tuple[float, float]:
        before = counters(self.client)[0]
        started = time.perf_counter()
        call()
        return time.perf_counter() - started, counters(self.client)[0] - before  # INFO itself is not counted

    def close(self) -> None:
        self.events.close()
        self.client.close()
        self.app.close()


def measure(url: str, workers: int, seconds: float) -> FleetLoad:
    fleet = Fleet(url, workers)
    try:
        commands, net, cpu, event_bytes = fleet.run(seconds)
        scan_seconds, _ = fleet.time(fleet.scanner.scan_once)
        legacy_seconds, legacy_commands = fleet.time(lambda: legacy_scan(fleet.client))
        return FleetLoad(
            workers,
            seconds,
            commands / seconds,
            net / seconds,
            cpu / seconds,
            scan_seconds,
            legacy_commands,
            legacy_seconds,
            event_bytes / seconds,
        )
    finally:
        fleet.close()


def run(fleets: tuple[int, ...] = (10, 100, 1000), seconds: float = 20.0) -> tuple[Section, list[FleetLoad]]:
    section = Section(
        "Control plane at fleet scale: Redis load per worker",
        f"`bench/bench_fleet.py`: N simulated workers with a running job each, on one redis-server, running the "
        f"worker's real control-plane code on the default intervals for {seconds:.0f} simulated seconds (see the "
        "module docstring); Redis's own counters per simulated second. Before: every worker scanning every "
        "running job each interval (one such scan measured, counted N times per interval) and gossip "
        "(every event fanned out to N workers).",
    )
    work = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    loads = []
    with RedisServer(workdir=work) as server:
        for workers in fleets:
            loads.append(measure(server.url, workers, seconds))
    rows = []
    for load in loads:
        n = load.workers
        rows.append(
            [
                str(n),
                f"{load.before_commands:,.0f}",
                f"{load.commands:,.0f}",
                f"{load.before_commands / n:.1f}",
                f"{load.commands / n:.1f}",
                f"{load.before_bytes / 1e6:.2f}",
                f"{load.net_bytes / 1e6:.2f}",
                f"{load.cpu / n * 1e3:.3f}",
                f"{load.legacy_scan_seconds * 1e3:.1f}",
                f"{load.scan_seconds * 1e3:.1f}",
            ]
        )
    section.table(
        [
            "workers",
            "commands/s before",
            "commands/s",
            "per worker before",
            "per worker",
            "MB/s before",
            "MB/s",
            "redis CPU ms/s per worker",
            "scan ms before",
            "scan ms",
        ],
        rows,
    )
    per_worker = [load.commands / load.workers for load in loads]
    flat = max(per_worker) / min(per_worker)
    largest = loads[-1]
    section.line(
        f"- commands/s per worker from N={loads[0].workers} to N={largest.workers}: x{flat:.2f} "
        f"(target within 2x): **{'met' if flat <= 2 else 'NOT met'}**"
    )
    section.line(
        f"- at N={largest.workers}: {largest.commands:,.0f} commands/s and {largest.net_bytes / 1e6:.2f} MB/s "
        f"(targets under {TARGET_COMMANDS:,} and {TARGET_BYTES / 1e6:.0f} MB/s at 1,000): **"
        f"{'met' if largest.commands < TARGET_COMMANDS and largest.net_bytes < TARGET_BYTES else 'NOT met'}**"
    )
    return section, loads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fleets of 10 and 100, 10 simulated seconds")
    parser.add_argument("--fleets", default="10,100,1000")
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    started = time.monotonic()
    if args.quick:
        run((10, 100), 10.0)
    else:
        run(tuple(int(n) for n in args.fleets.split(",")), args.seconds)
    print(f"(took {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()

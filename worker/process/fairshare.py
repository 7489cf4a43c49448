"""Fair share between tenants at dequeue: one script, run where the worker polls its queues.

Each tenant's jobs for a queue wait in their own kombu lists (`team-a@render.sd15`, one per priority;
`producer.keys.tenant_queue`), the default tenant's in the queue's own. A worker's poll (`POP`, which replaces
`worker.process.transport`'s plain pop) goes through its lists in its order of preference (priority first, then its
loaded model: `worker.process.affinity`), and for each takes the next job from the tenants in weighted turn:

- stride scheduling: every tenant with jobs waiting in the list has a pass (`render:fair:<list>`, a sorted set);
  the lowest pass goes next and its pass grows by 1/weight, so a weight-2 tenant gets two jobs to a weight-1
  tenant's one. A tenant that runs out leaves the set; one that (re)appears starts at the lowest pass there, ahead
  of the tenants at that pass, so it neither waits for the others' backlog nor gets credit for the time it was idle.
- FIFO inside a tenant (its list), and priorities still win across tenants (the lists are polled in priority order,
  every tenant's high list before any normal one).
- `max_gpus`: a tenant holding that many jobs (`render:gpus:<tenant>`, one entry per job a worker took, removed
  when it ends; kept for capped tenants only) is passed over: its jobs wait while the other tenants' are taken.

A worker whose farm declares no tenants (the default one alone, uncapped) pops as before: no turn, no slots.

The pop records the message in kombu's unacked hash in the same atomic step, as before (`transport` says why), and
returns the list the worker consumes (the queue's own), so kombu delivers it to that queue's consumer; the message's
routing key still names the tenant's queue, so a restore or a re-send puts it back on the tenant's list.

Cost: per list polled, one ZRANGE and a ZSCORE per tenant, then the pops until one answers (an empty tenant list
costs one RPOP); all inside one EVALSHA, one round trip as before (bench/bench_fairshare.py measures it).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping

import redis

from producer.keys import DEFAULT_TENANT, RUNNING_TASKS, TENANT_SEPARATOR, fair_key, gpus_key, tenant_of
from producer.tenants import TenantConfig

log = logging.getLogger(__name__)

TENANTS_OPTION = "render_tenants"  # broker_transport_options: [[name, weight, max_gpus or 0], ...] (JSON-safe)

# KEYS: kombu's unacked hash, its index, then the lists in order of preference (with the global key prefix);
# ARGV: the time of the delivery, the global key prefix, the tenants as JSON ([[name, weight, max_gpus], ...]).
# Returns {list, item, delivery tag or nil}, or nil. An item that is not a kombu envelope is popped and returned
# unrecorded: the worker drops it. No shebang flags: it runs on a full (noeviction) Redis as BRPOP did.
POP = f"""
local prefix = ARGV[2]
local tenants = cjson.decode(ARGV[3])
local function deliver(list, item, tenant, capped)
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
      local id = type(message.headers) == 'table' and message.headers.id
      if capped and type(id) == 'string' then
        redis.call('ZADD', prefix .. '{gpus_key("")}' .. tenant, ARGV[1], id)
      end
    end
  end
  return {{list, item, tag}}
end
if #tenants == 1 and tenants[1][3] <= 0 then  -- one tenant, uncapped: no turn to keep, the plain pop
  for i = 3, #KEYS do
    local item = redis.call('RPOP', KEYS[i])
    if item then return deliver(KEYS[i], item, tenants[1][1], false) end
  end
  return false
end
for i = 3, #KEYS do
  local list = KEYS[i]
  local bare = string.sub(list, #prefix + 1)
  local fair = prefix .. '{fair_key("")}' .. bare
  local lowest = redis.call('ZRANGE', fair, 0, 0, 'WITHSCORES')[2]
  lowest = lowest and tonumber(lowest) or 0
  local turn = {{}}
  for _, t in ipairs(tenants) do
    local pass = redis.call('ZSCORE', fair, t[1])
    turn[#turn + 1] = {{t[1], t[2], t[3], pass and tonumber(pass) or lowest, pass and true or false}}
  end
  table.sort(turn, function(a, b)
    if a[4] ~= b[4] then return a[4] < b[4] end
    if a[5] ~= b[5] then return b[5] end
    return a[1] < b[1]
  end)
  for _, t in ipairs(turn) do
    local name = t[1]
    if t[3] <= 0 or redis.call('ZCARD', prefix .. '{gpus_key("")}' .. name) < t[3] then
      local key = list
      if name ~= '{DEFAULT_TENANT}' then key = prefix .. name .. '{TENANT_SEPARATOR}' .. bare end
      local item = redis.call('RPOP', key)
      if item then
        if redis.call('LLEN', key) > 0 then
          redis.call('ZADD', fair, math.max(t[4], lowest) + 1 / t[2], name)
        elseif t[5] then
          redis.call('ZREM', fair, name)
        end
        return deliver(list, item, name, t[3] > 0)
      elseif t[5] then
        redis.call('ZREM', fair, name)
      end
    end
  end
end
return false
"""
POP_SHA = hashlib.sha1(POP.encode()).hexdigest()


def tenants_option(tenants: Mapping[str, TenantConfig]) -> dict[str, list[list[object]]]:
    """The broker transport option that gives a worker's polls the farm's tenants: `default` and each declared one,
    with its weight and `max_gpus` (0: no cap). JSON-safe: Celery's `inspect stats` sends the options."""
    every = {DEFAULT_TENANT: TenantConfig(), **tenants}
    return {TENANTS_OPTION: [[name, c.weight, c.max_gpus or 0] for name, c in sorted(every.items())]}


def tenants_arg(option: object) -> str:
    """ARGV[3] of `POP`: the tenants of a worker's transport options, or the default tenant alone."""
    if isinstance(option, list) and option:
        return json.dumps(option)
    return json.dumps([[DEFAULT_TENANT, 1.0, 0]])


def capped(tenants: Mapping[str, TenantConfig]) -> list[str]:
    """The tenants whose jobs hold GPU slots (`max_gpus` set): those `free_gpu` and `sweep_gpus` look after."""
    return sorted(name for name, config in tenants.items() if config.max_gpus is not None)


def free_gpu(client: redis.Redis, task_id: str) -> None:
    """The job no longer holds a GPU of its tenant's (`max_gpus`): it ended, was handed back, or was never started.
    Best effort: an entry left by a Redis error is swept by `sweep_gpus`. Only for a capped tenant's job (`capped`):
    no other job took a slot."""
    try:
        client.zrem(gpus_key(tenant_of(task_id)), task_id)
    except redis.RedisError as exc:
        log.warning("could not free the tenant GPU slot of %s (the recovery scan sweeps it): %s", task_id, exc)


def sweep_gpus(client: redis.Redis, tenants: list[str], *, grace: float, now: float) -> int:
    """Remove the slots of jobs no worker runs (not in `render:running`) taken more than `grace` seconds ago: their
    worker died between the pop and the lease, or its release failed. Returns how many were removed."""
    removed = 0
    for tenant in tenants:
        key = gpus_key(tenant)
        old: list[bytes] = client.zrangebyscore(key, "-inf", now - grace)  # type: ignore[assignment]
        if not old:
            continue
        running = client.hmget(RUNNING_TASKS, old)
        gone = [task_id for task_id, record in zip(old, running, strict=True) if record is None]
        if gone:
            removed += int(client.zrem(key, *gone))
    return removed

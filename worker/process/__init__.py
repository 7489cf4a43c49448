"""The worker process around its jobs: the thin Celery task, the Celery-free job runner, the per-process services
(started by a Celery bootstep), the GPU thread, leases, revocation, progress, recovery, the fleet advert, webhooks
and the Redis transport. The only part of the worker that talks to Celery and Redis."""

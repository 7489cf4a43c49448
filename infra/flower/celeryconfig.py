"""Celery settings for Flower behind Redis Sentinel (docker-compose.sentinel.yml mounts this as /data/celeryconfig.py,
which Celery's default loader reads): the broker URL names the sentinels, this names the master they watch."""

broker_transport_options = {"master_name": "farm"}

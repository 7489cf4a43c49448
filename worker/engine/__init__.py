"""The engine: `render()` of one job or one shared call (prepare, denoise, store, record) and its step callbacks.
No Celery, no Redis: what watches a job reaches it through step hooks (`worker.hooks`)."""

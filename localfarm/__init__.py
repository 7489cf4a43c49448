"""The farm on one machine, for people working on it: `render demo`, and the private Redis server and worker
processes the demo, the benchmarks and the tests start. Not part of the worker image (infra/worker.Dockerfile copies
`producer/` and `worker/` only)."""

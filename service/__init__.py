"""`render serve`: the farm's HTTP job API and web console, a stateless layer over the producer library.

Any number of replicas can run behind a load balancer: everything they know is in Redis (jobs, batches, the
fleet's adverts) and in the farm's storage (the files). Nothing here imports torch or diffusers.
"""

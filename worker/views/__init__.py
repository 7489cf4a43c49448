"""What the `render` command shows people: batch rows, live job boards, contact sheets. Never imported by the
worker process."""

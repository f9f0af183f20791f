"""The chaos soak (`make soak`): thousands of downloads through several real workers on one
persistent Redis while children are killed, workers restarted, Redis crashed and the origin
misbehaves; then every accepted download is accounted for. The report goes to docs/soak.md."""

"""The running stack: build the images, start/stop them with docker compose, wait for readiness,
explain failures. `vlkit up/down/logs/status/build/download/caption/clean/bench` live in cli.py."""

"""Tests that start real components as processes (broker, stream worker, sink, trainer, services,
Chromium): slower, and each with a timeout sized to it."""

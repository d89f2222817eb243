"""Training, in one place: the offline harness (``offline``, ``pretrain``), the online trainer
(``online_core``: pure stream examples and metrics; ``online``: one model's incremental training;
``online_metrics``: what a version measured) and the Kafka loop that drives it (``stream_loop``)."""

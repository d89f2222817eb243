"""A/B testing: the statistics engine and the ClickHouse analytics around it.

- ``abtest.stats``: pure statistics over per-user arrays or sufficient statistics (no I/O);
- ``abtest.clickhouse``: the ClickHouse adapter (client, schema, inserts, parameterised queries);
- ``abtest.sink``: the Kafka consumer group that copies the events topic into ClickHouse;
- ``abtest.metrics``: per-user metrics of one experiment, computed in SQL;
- ``abtest.readout``: every metric and treatment against control, with the SRM check.

Nothing is imported here, so the pure statistics load without the ClickHouse and Kafka clients.
"""

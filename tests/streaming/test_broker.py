"""The embedded broker, as the CLI starts it: readiness, persistence across a clean restart."""

from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from core.errors import BrokerError
from streaming.broker import LocalBroker
from tests.conftest import free_port

pytestmark = pytest.mark.integration


def test_start_status_stop_and_data_survives_a_clean_restart(tmp_path: Path) -> None:
    broker = LocalBroker(tmp_path, port=free_port())
    assert not broker.status().running
    status = broker.start()
    try:
        assert status.running and status.ready and status.pid is not None
        assert broker.start().pid == status.pid  # starting again is a no-op
        producer = KafkaProducer(bootstrap_servers=broker.address, acks="all")
        for i in range(500):
            producer.send("kept", key=b"k", value=f"message {i}".encode())
        producer.flush()
        producer.close()
        assert broker.stop() is True
        assert not broker.status().running
        assert broker.stop() is False

        broker.start()
        consumer = KafkaConsumer(
            bootstrap_servers=broker.address,
            auto_offset_reset="earliest",
            consumer_timeout_ms=5000,
        )
        partitions = [TopicPartition("kept", p) for p in consumer.partitions_for_topic("kept")]
        consumer.assign(partitions)
        assert sum(consumer.end_offsets(partitions).values()) == 500
        values = [record.value for record in consumer]
        consumer.close()
        assert values == [f"message {i}".encode() for i in range(500)]
    finally:
        broker.stop()


def test_a_port_in_use_is_a_clear_error(tmp_path: Path, broker: LocalBroker) -> None:
    clash = LocalBroker(tmp_path, host=broker.host, port=broker.port)
    with pytest.raises(BrokerError, match=f"port {broker.port}.*HYMIREC_BROKER_PORT"):
        clash.start()

from pathlib import Path

from bench.ports import free_ports


def test_ports_are_outside_the_ephemeral_range_and_never_handed_out_twice() -> None:
    low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = [p for _ in range(50) for p in free_ports(4)]
    assert len(set(ports)) == len(ports) == 200
    assert not any(low <= p <= high for p in ports)
    assert all(1024 < p < 65536 for p in ports)

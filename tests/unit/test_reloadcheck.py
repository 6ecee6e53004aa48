"""reloadcheck.listening_ports: which of a process's sockets listen, from /proc/<pid>/net/tcp's text (pure)."""

from __future__ import annotations

from aube.shared.reloadcheck import listening_ports

TABLE = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1092 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0 100 0 0 10 0
   1: 00000000:2016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 777 1 0 100 0 0 10 0
   2: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 999 1 0 100 0 0 10 0
   3: 0100007F:1092 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 4242 1 0 100 0 0 10 0
"""


def test_only_the_processs_own_listening_sockets_count() -> None:
    # 999 listens but belongs to another process; 4242 is the process's, but an established connection.
    assert listening_ports(TABLE, {"12345", "777", "4242"}) == [("127.0.0.1", 4242), ("0.0.0.0", 8214)]
    assert listening_ports(TABLE, set()) == []
    assert listening_ports("header only\n", {"12345"}) == []

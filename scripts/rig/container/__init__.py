"""What runs inside the rig's host and plane containers (from the read-only checkout at /opt/aube)."""

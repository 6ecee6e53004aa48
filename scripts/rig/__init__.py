"""The test rig of scripts/cluster.sh (issue 10): NATS cluster, Docker-in-Docker hosts and the plane on one machine."""

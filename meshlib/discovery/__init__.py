"""Discovery and configuration from etcd: client, watches, registration, snapshots."""

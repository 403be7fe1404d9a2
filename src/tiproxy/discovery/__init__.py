"""Where backends come from: the static list, TiDB's topology in etcd, DNS names."""

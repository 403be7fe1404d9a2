"""High availability of the proxies themselves: TiProxy's virtual IP (`[ha]`).

election.py elects one owner among the proxies in PD's etcd, address.py puts the address on an
interface and announces it, vip.py ties them together with TiProxy's semantics.
"""

"""Watchers: each turns its world into snapshots of links, nothing more.

nm.py (NetworkManager over D-Bus), netlink.py (the kernel), leases.py (DHCP lease
files). They never decide; the engine merges their snapshots (mark and sweep per
source) and the policy decides.
"""

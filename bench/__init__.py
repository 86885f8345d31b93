"""Load generator for securechatd: `python -m bench WORKLOAD [options]`.

It replays the peer baseline's workloads (/work/shared/peers/xmpp_load.py,
run against Prosody) with the same measurement rules, so the two servers
can be compared line by line. Each run prints one JSON line.
"""

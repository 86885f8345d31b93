"""Safety numbers: 60 digits two people read to each other to check they see the same devices (docs/E2EE.md, "Safety numbers").

Signal's construction (iterated SHA-512, 30 digits per party, the two sorted
so both sides show the same number) over each user's current device chain:
any device added or revoked on either side changes the number.
"""

import hashlib

from securechatd.e2ee.encoding import enc, labelled

ITERATIONS = 5200  # Signal's: makes finding another key set with the same 30 digits cost 5200 hashes a try
LABEL = "securechatd/safety/v1"
GROUP = 5


def fingerprint(user, sig_pubs):
    """The 30 digits of `user` with the devices whose Ed25519 keys are `sig_pubs` (order does not matter)."""
    if not sig_pubs:
        raise ValueError(f"{user!r} has no devices to verify")
    keys = enc(sorted(sig_pubs))
    value = labelled(LABEL, [user, keys])
    for _ in range(ITERATIONS):
        value = hashlib.sha512(value + keys).digest()
    return "".join(f"{int.from_bytes(value[at : at + 5], 'big') % 100000:05d}" for at in range(0, 30, 5))


def safety_number(chain_a, chain_b):
    """The safety number of two users from their verified chains (chain.ChainState): 12 groups of 5 digits, the same both ways."""
    digits = "".join(sorted(fingerprint(chain.user, [d.keys.sig_pub for d in chain.devices.values()]) for chain in (chain_a, chain_b)))
    return " ".join(digits[at : at + GROUP] for at in range(0, len(digits), GROUP))

"""Hivemart's wire protocol: identities and signatures, framing of messages and tensors,
job tickets and work receipts. Pure Python plus ``cryptography`` and ``msgpack``; tensor
framing imports torch only when used."""

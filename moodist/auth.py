"""How the ranks of a group prove membership to each other, on a page.

Everything is keyed by the group's *key*: the out-of-band secret every rank
was given (env ``MOODIST_SECRET`` or ``secret=``), or else a random one agreed
through the store.  The key itself never goes into the store or onto the
wire; only HMAC-SHA256 digests of it do, each under its own label (so no
digest made for one purpose is valid for another):

* ``membership_proof``: each rank publishes one with its hello, so a rank
  given a different secret is named at once, before any socket is opened.
* PLAIN (default): rank A connecting to rank B sends, as its ZMTP PLAIN
  password, ``HMAC(key, "plain", B's address, B's nonce, A, B)``.  B's nonce
  is random, made when B's listening socket is; binding B's address means a
  rank that is sent a wrong address through the store hands the attacker a
  password that B refuses.  The password is the same on every reconnect, so
  whoever can *sniff* the connection can replay it to B while B lives:
  PLAIN keeps out those who cannot see the traffic, no more.
* The bulk lane (PLAIN only; see :mod:`moodist.bulk`): each connection is
  a mutual challenge and response, ``HMAC(key, "bulk server" or "bulk
  client", client, server, both nonces)``, fresh on every connection.
* CURVE (``encrypt=True``): each rank makes a key pair and publishes its
  public key with ``HMAC(key, "curve key", rank, public key)``.  Keys whose
  tag does not check are refused before anything connects, so whoever
  writes the store cannot substitute a key; the CURVE handshake then proves
  each side holds the secret key of its tagged public key, afresh on every
  connection (a challenge-response, with forward secrecy).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

import zmq
import zmq.utils.z85

__all__ = ["Authenticator", "AuthenticationError", "derive", "membership_proof"]


class AuthenticationError(ValueError):
    """Ranks of a group cannot authenticate each other: a different secret, or
    credentials in the store that were not made with this group's secret."""


def derive(key: bytes, label: str, *fields: Any) -> bytes:
    """HMAC-SHA256 of ``label`` and ``fields`` keyed by ``key``.  Each part is
    length-prefixed, so distinct inputs never collide."""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in (label, *fields):
        data = part if isinstance(part, bytes) else str(part).encode()
        mac.update(len(data).to_bytes(4, "little") + data)
    return mac.digest()


def membership_proof(key: bytes, where: str, rank: int, nonce: str) -> str:
    """What ``rank`` publishes in its hello to show which key it holds (hex)."""
    return derive(key, "member", where, rank, nonce).hex()


class Authenticator:
    """One rank's credentials in a group, and its check of everyone else's.

    Order of use: :meth:`server_options` for the listening socket,
    :meth:`listening_at` its address once bound (exactly what the rank
    publishes), :meth:`offer` for the store; :meth:`learn` every rank's
    offer; then :meth:`client_options` and :meth:`member` answer for
    connections out and in.  Holds the key; never prints it.
    """

    def __init__(self, key: bytes, rank: int, size: int, curve: bool) -> None:
        if not key:
            raise ValueError("the group's key must not be empty")
        self._key = key
        self.rank = rank
        self.size = size
        self.nonce = secrets.token_hex(16)
        self.curve_keypair = zmq.curve_keypair() if curve else None  # (public, secret), z85
        self._addresses: list[str] = []
        self._nonces: list[str] = []
        self.curve_keys: list[bytes] = []  # z85 public keys, by rank, all tags checked
        self._curve_ranks: dict[bytes, int] = {}  # binary public key -> rank
        self._passwords: list[bytes] = []  # what each client rank must present to us

    def listening_at(self, address: str) -> None:
        """This rank's listening address, exactly as it publishes it."""
        self._passwords = [self._password(client, self.rank, address, self.nonce)
                           for client in range(self.size)]

    def __repr__(self) -> str:
        return f"Authenticator(rank={self.rank}, curve={self.curve_keypair is not None})"

    def _password(self, client: int, server: int, address: str, nonce: str) -> bytes:
        return derive(self._key, "plain", address, nonce, client, server).hex().encode()

    def _curve_tag(self, rank: int, public_key: bytes) -> str:
        return derive(self._key, "curve key", rank, public_key).hex()

    def offer(self) -> dict[str, str]:
        """What this rank publishes (JSON-able): its nonce and, with CURVE, its
        public key and that key's tag."""
        offer = {"nonce": self.nonce}
        if self.curve_keypair is not None:
            public = self.curve_keypair[0]
            offer.update(curve=public.decode(), curve_tag=self._curve_tag(self.rank, public))
        return offer

    def learn(self, addresses: list[str], offers: list[dict[str, str]]) -> None:
        """Take every rank's address and offer (index = rank).  Raises
        AuthenticationError naming the ranks whose CURVE key does not carry a
        tag made with this group's key: none of them is ever connected to or
        accepted."""
        if len(addresses) != self.size or len(offers) != self.size:
            raise ValueError("need one address and one offer per rank")
        self._addresses = list(addresses)
        self._nonces = [str(o.get("nonce", "")) for o in offers]
        if self.curve_keypair is None:
            return
        keys = [str(o.get("curve", "")).encode() for o in offers]
        tags = [str(o.get("curve_tag", "")).encode() for o in offers]
        bad = [r for r in range(self.size)
               if not hmac.compare_digest(tags[r], self._curve_tag(r, keys[r]).encode())]
        if bad:
            raise AuthenticationError(
                f"the CURVE public keys in the store for ranks {bad} are not signed with this "
                f"group's secret: someone who can write to the store replaced them, or those "
                f"ranks were given a different secret; refusing to connect"
            )
        self.curve_keys = keys
        self._curve_ranks = {zmq.utils.z85.decode(k): r for r, k in enumerate(keys)}

    def server_options(self) -> dict[str, Any]:
        """Socket options of this rank's listening (ROUTER) socket."""
        if self.curve_keypair is None:
            return {"plain_server": True}
        return {"curve_server": True, "curve_secretkey": self.curve_keypair[1]}

    def client_options(self, server: int) -> dict[str, Any]:
        """Socket options of this rank's connection to ``server``."""
        if self.curve_keypair is None:
            password = self._password(self.rank, server, self._addresses[server],
                                      self._nonces[server])
            return {"plain_username": str(self.rank).encode(), "plain_password": password}
        return {"curve_publickey": self.curve_keypair[0], "curve_secretkey": self.curve_keypair[1],
                "curve_serverkey": self.curve_keys[server]}

    def bulk_proof(self, role: str, client: int, server: int, nonces: bytes) -> bytes:
        """What each side of a bulk-lane connection from ``client`` to
        ``server`` shows (``role`` "client" or "server"), over both sides'
        fresh nonces: see :mod:`moodist.bulk`."""
        return derive(self._key, "bulk " + role, client, server, nonces)

    def member(self, mechanism: bytes, credentials: list[bytes]) -> int | None:
        """The rank that a connection's ZMTP credentials (as a ZAP request
        carries them) prove, or None: refuse it."""
        if self.curve_keypair is None:
            if mechanism != b"PLAIN" or len(credentials) != 2:
                return None
            user, password = credentials
            if not (user.isdigit() and len(user) <= 9 and int(user) < self.size):
                return None
            client = int(user)
            return client if hmac.compare_digest(password, self._passwords[client]) else None
        if mechanism != b"CURVE" or len(credentials) != 1:
            return None
        return self._curve_ranks.get(credentials[0])

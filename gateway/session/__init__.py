"""Sessions and login transactions: sealed cookies (pure) and session stores.

crypto.py       Sealer: AES-256-GCM with HKDF-derived, purpose-bound keys
model.py        Session, Proof, expired()
stores.py       SessionStore protocol; CookieStore, MemoryStore
factory.py      make_store(): the store a configuration asks for
redis_store.py  RedisStore: sessions, their indexes and transactions in Redis
redis_url.py    which Redis URLs are supported; Sentinel URL parsing
transaction.py  Transaction, TransactionCodec, per-transaction cookie names
cookies.py      cookie names (__Host-) and Set-Cookie attributes
"""

from gateway.session.cookies import (
    cookie_name,
    delete_cookie_kwargs,
    set_cookie_kwargs,
)
from gateway.session.crypto import Sealer
from gateway.session.factory import make_store
from gateway.session.model import MAX_PROOFS, Proof, Session, expired, new_session_id
from gateway.session.redis_store import RedisStore
from gateway.session.stores import (
    CookieStore,
    MemoryStore,
    SessionStore,
    SessionTooLarge,
)
from gateway.session.transaction import (
    MAX_IN_FLIGHT,
    TX_COOKIE_BASE,
    Transaction,
    TransactionCodec,
    tx_cookie_name,
    tx_cookie_names,
    tx_cookies_to_drop,
)

__all__ = [
    "MAX_IN_FLIGHT",
    "MAX_PROOFS",
    "TX_COOKIE_BASE",
    "CookieStore",
    "MemoryStore",
    "Proof",
    "RedisStore",
    "Sealer",
    "Session",
    "SessionStore",
    "SessionTooLarge",
    "Transaction",
    "TransactionCodec",
    "cookie_name",
    "delete_cookie_kwargs",
    "expired",
    "make_store",
    "new_session_id",
    "set_cookie_kwargs",
    "tx_cookie_name",
    "tx_cookie_names",
    "tx_cookies_to_drop",
]
